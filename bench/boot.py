#!/usr/bin/env python3
"""Boot benchmark: carapace-vmm against `qemu-system-x86_64 -M microvm`.

Boots the same kernel and initramfs with both VMMs, in turns, and prints for
each: time to the agent's first console line, the VMM process's CPU time up
to that point, and its RSS beyond guest memory; then the ratio ours/QEMU of
the medians. Figures, never assertions: run it on a quiet machine.

usage: bench/boot.py [--rounds N] [--mem-mib M] [--vcpus V]
       (assets from CARAPACE_KERNEL / CARAPACE_INITRAMFS / CARAPACE_BIN_DIR,
        else build/guest and target/release)
"""
import argparse
import os
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = b"carapace-agent"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def asset(env, default):
    path = os.environ.get(env) or os.path.join(REPO, default)
    if not os.path.exists(path):
        sys.exit(f"bench: {path} missing (run scripts/setup.sh or set {env})")
    return path


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_beyond_guest_kib(pid, mem_mib):
    """RSS of every mapping except the guest RAM one(s) (size >= guest RAM)."""
    total = guest = 0
    size = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
                total += rss
                if size is not None and size >= mem_mib * 1024:
                    guest += rss
    return total - guest


def boot_once(argv, mem_mib, timeout):
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen = b""
    try:
        while time.monotonic() - start < timeout:
            if not sel.select(timeout=1):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
            if MARKER in seen:
                elapsed = time.monotonic() - start
                return elapsed, cpu_seconds(proc.pid), rss_beyond_guest_kib(proc.pid, mem_mib)
        tail = seen[-2000:].decode(errors="replace")
        raise RuntimeError(f"{argv[0]}: no agent line within {timeout}s; output tail:\n{tail}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mem-mib", type=int, default=256)
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=300)
    args = ap.parse_args()

    kernel = asset("CARAPACE_KERNEL", "build/guest/vmlinux")
    initramfs = asset("CARAPACE_INITRAMFS", "build/guest/initramfs.cpio")
    vmm = os.path.join(os.environ.get("CARAPACE_BIN_DIR") or os.path.join(REPO, "target/release"),
                       "carapace-vmm")
    qemu = shutil.which("qemu-system-x86_64")
    if not os.path.exists(vmm) or not qemu:
        sys.exit("bench: needs target/release/carapace-vmm and qemu-system-x86_64 (apt qemu-system-x86)")

    # The command line carapace-vmm would give this guest, so both boot the same way.
    cmdline = subprocess.run([vmm, "--print-cmdline", "--kernel", kernel], check=True,
                             capture_output=True, text=True).stdout.strip()
    tmp = tempfile.mkdtemp(prefix="carapace-bench-")
    ours = lambda i: [vmm, "--kernel", kernel, "--initramfs", initramfs, "--serial", "stdout",
                      "--mem-mib", str(args.mem_mib), "--vcpus", str(args.vcpus),
                      "--vsock-uds", os.path.join(tmp, f"v{i}.sock"), "--cid", "3"]
    theirs = lambda i: [qemu, "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on",
                        "-enable-kvm", "-cpu", "host,-arch-capabilities", "-smp", str(args.vcpus),
                        "-m", f"{args.mem_mib}M", "-nodefaults", "-no-user-config",
                        "-display", "none", "-serial", "stdio", "-kernel", kernel,
                        "-initrd", initramfs, "-append", cmdline]
    results = {"carapace-vmm": [], "qemu microvm": []}
    for i in range(args.rounds):
        for name, argv in (("carapace-vmm", ours(i)), ("qemu microvm", theirs(i))):
            r = boot_once(argv, args.mem_mib, args.timeout)
            results[name].append(r)
            print(f"round {i + 1} {name:<13} agent line {r[0]:7.2f} s  cpu {r[1]:7.2f} s  "
                  f"rss beyond guest {r[2] / 1024:7.1f} MiB", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nmedians over {args.rounds} rounds ({args.vcpus} vCPU, {args.mem_mib} MiB):")
    med = {n: [statistics.median(x[k] for x in rs) for k in range(3)] for n, rs in results.items()}
    for n, (t, c, r) in med.items():
        print(f"  {n:<13} agent line {t:7.2f} s  cpu {c:7.2f} s  rss beyond guest {r / 1024:7.1f} MiB")
    (t1, c1, r1), (t2, c2, r2) = med["carapace-vmm"], med["qemu microvm"]
    print(f"  ratio ours/qemu: time {t1 / t2:.2f}  cpu {c1 / c2:.2f}  rss {r1 / r2:.2f}")


if __name__ == "__main__":
    main()
