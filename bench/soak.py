#!/usr/bin/env python3
"""Soak: many sandboxes in a row and at once, and a long-running sandbox's
exec loop, with the host checked for leaks before and after.

  1. --cycles sequential `carapace run` of a busybox `true` (each run is
     create, start, wait, delete: its own VM);
  2. --parallel sandboxes at once (`run --detach` of `sleep`, then
     `delete --force` of each);
  3. one sandbox kept running through --execs `carapace exec` calls: the
     VMM's RSS and open fds after a warm-up and at the end.

Prints its figures, and fails (exit 1) on a leak: state directories,
carapace or VMM processes, mounts, or lock files left after the cycles;
the host's allocated file handles (/proc/sys/fs/file-nr) grown by more than
--fd-slack; the VMM's fds grown during the exec loop, or its RSS grown by
more than --rss-slack-kib. Run as root. CI runs a short version
(tests/tests/soak.rs); the issue's size is the default:
    python3 bench/soak.py [--cycles 100] [--parallel 8] [--execs 100]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from _common import REPO, asset_path


def asset(env, default):
    try:
        return asset_path(env, default)
    except FileNotFoundError as e:
        sys.exit(f"soak: {e}")


def busybox_bundle(carapace, env, path, args):
    rootfs = os.path.join(path, "rootfs")
    for d in ("bin", "proc", "sys", "dev", "tmp"):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    shutil.copy("/bin/busybox", os.path.join(rootfs, "bin/busybox"))
    for applet in subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True).stdout.split():
        if applet != "busybox":
            os.symlink("busybox", os.path.join(rootfs, "bin", applet))
    subprocess.run([carapace, "spec", "--bundle", path], check=True, env=env)
    with open(os.path.join(path, "config.json")) as f:
        spec = json.load(f)
    spec["process"]["terminal"] = False
    spec["process"]["args"] = args
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(spec, f)
    return path


def pids_matching(needle):
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if needle.encode() in f.read():
                    out.append(int(p))
        except OSError:
            pass
    return out


def file_handles():
    with open("/proc/sys/fs/file-nr") as f:
        return int(f.read().split()[0])


def mounts():
    with open("/proc/self/mountinfo") as f:
        return len(f.readlines())


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Carapace:
    def __init__(self, binary, root, env, timeout):
        self.binary, self.root, self.env, self.timeout = binary, root, env, timeout

    def __call__(self, *args, check=True):
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            r = subprocess.run([self.binary, "--root", self.root, *args], stdin=subprocess.DEVNULL,
                               stdout=out, stderr=err, env=self.env, timeout=self.timeout)
            out.seek(0)
            err.seek(0)
            r.stdout, r.stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        if check and r.returncode != 0:
            raise RuntimeError(f"carapace {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def leftovers(self):
        left = []
        if os.path.isdir(self.root):
            left += [f"state entry {n}" for n in os.listdir(self.root)]
        left += [f"process {p}" for p in pids_matching(self.root) if p != os.getpid()]
        return left


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--execs", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--fd-slack", type=int, default=64)
    ap.add_argument("--rss-slack-kib", type=int, default=4096)
    a = ap.parse_args()

    bin_dir = os.environ.get("CARAPACE_BIN_DIR") or os.path.join(REPO, "target/release")
    env = dict(os.environ,
               CARAPACE_KERNEL=asset("CARAPACE_KERNEL", "build/guest/vmlinux"),
               CARAPACE_INITRAMFS=asset("CARAPACE_INITRAMFS", "build/guest/initramfs.cpio"),
               CARAPACE_BIN_DIR=bin_dir)
    carapace_bin = os.path.join(bin_dir, "carapace")
    if not os.path.exists(carapace_bin):
        sys.exit(f"soak: {carapace_bin} missing (run scripts/setup.sh or set CARAPACE_BIN_DIR)")
    work = tempfile.mkdtemp(prefix="carapace-soak-")
    failures = []
    try:
        c = Carapace(carapace_bin, os.path.join(work, "root"), env, a.timeout)
        true_b = busybox_bundle(carapace_bin, env, os.path.join(work, "true"), ["true"])
        sleep_b = busybox_bundle(carapace_bin, env, os.path.join(work, "sleep"), ["sleep", "100000"])
        handles0, mounts0 = file_handles(), mounts()

        start = time.monotonic()
        for i in range(a.cycles):
            r = c("run", "--bundle", true_b, f"seq{i}", check=False)
            if r.returncode != 0:
                failures.append(f"run seq{i}: exit {r.returncode}: {r.stderr.strip()}")
        seq_s = time.monotonic() - start
        left = c.leftovers()
        print(f"sequential: {a.cycles} run/delete cycles in {seq_s:.0f} s "
              f"({seq_s / max(a.cycles, 1):.1f} s each); left: {len(left)}")
        failures += [f"after the cycles: {x}" for x in left]

        start = time.monotonic()
        # stderr into files: the containers keep their stdio open.
        errs = [tempfile.TemporaryFile() for _ in range(a.parallel)]
        procs = [subprocess.Popen([carapace_bin, "--root", c.root, "run", "--detach", "--bundle", sleep_b, f"par{i}"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errs[i], env=env)
                 for i in range(a.parallel)]
        for i, p in enumerate(procs):
            p.wait(timeout=a.timeout)
            if p.returncode != 0:
                errs[i].seek(0)
                err = errs[i].read().decode(errors="replace").strip()
                failures.append(f"run --detach par{i}: exit {p.returncode}: {err}")
            errs[i].close()
        running = sum(1 for s in json.loads(c("list", "--format", "json").stdout or "[]") if s["status"] == "running")
        vmms = len(pids_matching(f"{c.root}/par"))
        for i in range(a.parallel):
            c("delete", "--force", f"par{i}", check=False)
        par_s = time.monotonic() - start
        left = c.leftovers()
        print(f"parallel: {a.parallel} sandboxes at once ({running} running, {vmms} VMMs) "
              f"up and deleted in {par_s:.0f} s; left: {len(left)}")
        failures += [f"after the parallel sandboxes: {x}" for x in left]

        c("run", "--detach", "--bundle", sleep_b, "long")
        vmm = int(json.loads(c("state", "long").stdout)["annotations"]["io.carapace.vmm-pid"])
        warmup = min(5, a.execs)
        # Settle before each measurement: a finished exec's vsock streams are
        # closed by the VMM up to a couple of seconds later.
        settle = 3
        for i in range(a.execs):
            if i == warmup:
                time.sleep(settle)
                rss0, fds0 = rss_kib(vmm), fds(vmm)
            r = c("exec", "long", "true", check=False)
            if r.returncode != 0:
                failures.append(f"exec {i}: exit {r.returncode}: {r.stderr.strip()}")
        time.sleep(settle)
        if a.execs <= warmup:
            rss0, fds0 = rss_kib(vmm), fds(vmm)
        rss1, fds1 = rss_kib(vmm), fds(vmm)
        c("delete", "--force", "long")
        print(f"exec loop: {a.execs} execs; VMM RSS {rss0} -> {rss1} KiB, fds {fds0} -> {fds1}")
        # One fd of slack: a stream the VMM is still closing; a leak per
        # exec shows as one fd per exec after the warm-up.
        if fds1 > fds0 + 1:
            failures.append(f"the VMM's fds grew from {fds0} to {fds1} over the exec loop")
        if rss1 - rss0 > a.rss_slack_kib:
            failures.append(f"the VMM's RSS grew by {rss1 - rss0} KiB over the exec loop")

        time.sleep(1)
        handles1, mounts1 = file_handles(), mounts()
        print(f"host: file handles {handles0} -> {handles1}, mounts {mounts0} -> {mounts1}")
        if mounts1 != mounts0:
            failures.append(f"mounts changed from {mounts0} to {mounts1}")
        if handles1 - handles0 > a.fd_slack:
            failures.append(f"allocated file handles grew by {handles1 - handles0}")
        failures += [f"at the end: {x}" for x in c.leftovers()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print("LEAKS OR FAILURES:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("ok: nothing leaked")


if __name__ == "__main__":
    main()
