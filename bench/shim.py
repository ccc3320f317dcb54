#!/usr/bin/env python3
"""containerd benchmark: `io.containerd.carapace.v2` against
`io.containerd.runc.v2` under one private containerd (Debian's 1.6).

Starts containerd on a temporary config, root, state and socket (CRI off,
the Carapace binaries first on its PATH), imports a busybox OCI image built
with umoci, and, for each runtime in the same run:
  - `ctr run --rm IMAGE ID true` rounds: median wall time (for carapace a
    VM boot, the container, the VM's shutdown);
  - one long-running `sleep` container: host memory of the pod, PSS (from
    /proc/PID/smaps_rollup) of its shim and every descendant of it: the
    shim and the VMM for carapace, the shim and the container's processes
    for runc;
  - --pods `ctr run -d ... sleep` at once: the time until all are running,
    and the PSS of all their shims and descendants, per pod (PSS splits
    pages shared between the pods, so the per-pod figure falls with N).
On a kvm_pvm host (emulated guest kernels) many guests booting at once on a
small machine can outlast the 300 s boot timeout: give --config a file with
a larger `boot_timeout_secs`. Figures, never assertions; bench/ is not part
of CI. Exits non-zero if any
step fails, and removes its tasks, containers, containerd and temporary
directory even then. Run as root.

usage: bench/shim.py [--rounds N] [--pods N] [--timeout S] [--config FILE]
       (--config: a Carapace config file, given to the shim as the runtime
        options' ConfigPath (`ctr run --runtime-config-path`);
        assets from CARAPACE_KERNEL / CARAPACE_INITRAMFS / CARAPACE_BIN_DIR,
        else build/guest and target/release)
"""
import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import _common
from _common import REPO

CARAPACE = "io.containerd.carapace.v2"
RUNC = "io.containerd.runc.v2"
IMAGE = "docker.io/library/carapace-bench-busybox:latest"
NAMESPACE = "carapace-bench"


class BenchError(Exception):
    pass


def asset(env, default):
    try:
        return _common.asset_path(env, default)
    except FileNotFoundError as e:
        raise BenchError(str(e)) from None


def run(args, timeout, **kw):
    """Runs a command to completion; raises BenchError unless it succeeds."""
    try:
        r = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(args)}: no answer within {timeout} s")
    if r.returncode != 0:
        raise BenchError(f"{' '.join(args)}: exit {r.returncode}: {(r.stdout + r.stderr).strip()[-2000:]}")
    return r.stdout


class Containerd:
    """A private containerd in `dir`, stopped (with all it runs) by stop()."""

    def __init__(self, dir, env, timeout):
        self.dir, self.env, self.timeout = dir, env, timeout
        self.sock = os.path.join(dir, "containerd.sock")
        os.makedirs(dir)
        with open(os.path.join(dir, "config.toml"), "w") as f:
            f.write(f"""version = 2
root = "{dir}/root"
state = "{dir}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[debug]
  address = "{dir}/debug.sock"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"
""")
        self.log = open(os.path.join(dir, "containerd.log"), "ab")
        self.proc = subprocess.Popen(["containerd", "--config", os.path.join(dir, "config.toml")], env=env,
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        end = time.monotonic() + 60
        while subprocess.run(self.ctr_args("version"), capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > end:
                raise BenchError(f"containerd did not start; see {dir}/containerd.log:\n{self.log_tail()}")
            time.sleep(0.2)

    def ctr_args(self, *args):
        return ["ctr", "--address", self.sock, "--namespace", NAMESPACE, *args]

    def ctr(self, *args, timeout=None):
        return run(self.ctr_args(*args), timeout or self.timeout)

    def log_tail(self, lines=40):
        try:
            with open(os.path.join(self.dir, "containerd.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def shims(self):
        """{container id: pid} of the shims serving this containerd."""
        out = {}
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if argv and os.path.basename(argv[0]).startswith("containerd-shim") and self.sock in argv \
                    and "-id" in argv:
                i = argv.index("-id")
                if i + 1 < len(argv):
                    out[argv[i + 1]] = int(p)
        return out

    def cleanup_tasks(self):
        """Kills and deletes every task and container (errors ignored)."""
        r = subprocess.run(self.ctr_args("containers", "list", "--quiet"), capture_output=True, text=True)
        ids = r.stdout.split()
        for cid in ids:
            subprocess.run(self.ctr_args("task", "kill", "--signal", "SIGKILL", cid), capture_output=True)
        for cid in ids:
            subprocess.run(self.ctr_args("task", "delete", "--force", cid), capture_output=True, timeout=self.timeout)
            subprocess.run(self.ctr_args("containers", "delete", cid), capture_output=True)

    def stop(self):
        try:
            self.cleanup_tasks()
        finally:
            leftover = self.shims()
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            # Shims of ours a failed delete left (a carapace shim's VMM dies with it).
            for pid in leftover.values():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.log.close()


def busybox_image(work):
    """A busybox OCI image (umoci), as a tar `ctr images import` takes."""
    layout, unpacked = os.path.join(work, "layout"), os.path.join(work, "unpacked")
    image = f"{layout}:latest"
    run(["umoci", "init", "--layout", layout], 60)
    run(["umoci", "new", "--image", image], 60)
    run(["umoci", "unpack", "--image", image, unpacked], 60)
    rootfs = os.path.join(unpacked, "rootfs")
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "root"):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    shutil.copy("/bin/busybox", os.path.join(rootfs, "bin/busybox"))
    for applet in run(["/bin/busybox", "--list"], 60).split():
        if applet != "busybox":
            os.symlink("busybox", os.path.join(rootfs, "bin", applet))
    with open(os.path.join(rootfs, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    run(["umoci", "repack", "--image", image, unpacked], 120)
    run(["umoci", "config", "--image", image, "--config.cmd", "sh"], 60)
    tar = os.path.join(work, "busybox-oci.tar")
    run(["tar", "-C", layout, "-cf", tar, "."], 60)
    return tar


def descendants(pid):
    """`pid` and all its descendants."""
    children = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def pss_kib(pid):
    try:
        return _common.pss_kib(pid)
    except RuntimeError as e:
        raise BenchError(str(e)) from None


def comm(pid):
    """The program's name (comm would cut both shims to `containerd-shim`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.path.basename(f.read().split(b"\0")[0].decode(errors="replace")) or "?"
    except OSError:
        return "?"


def pod_pss(c, ids):
    """PSS in KiB of the shims serving `ids` and their descendants, by process name."""
    shims = c.shims()
    missing = [i for i in ids if i not in shims]
    if missing:
        raise BenchError(f"no shim found for {missing}")
    # One shim may serve several ids (a pod): count each process once.
    pids = sorted({p for i in ids for p in descendants(shims[i])})
    by_name = {}
    for p in pids:
        by_name[comm(p)] = by_name.get(comm(p), 0) + pss_kib(p)
    return by_name


def run_args(runtime, config, *rest):
    args = ["run", "--runtime", runtime, "--snapshotter", "native"]
    if config and runtime == CARAPACE:
        args += ["--runtime-config-path", config]
    return args + list(rest)


def task_running(c, cid):
    for line in c.ctr("task", "ls").splitlines()[1:]:
        f = line.split()
        if f and f[0] == cid:
            return f[2] == "RUNNING"
    return False


def bench_runtime(c, name, runtime, args, tmp):
    """{'run': [s...], 'mem': {comm: kib}, 'pods_s': s, 'pods_mem': {comm: kib}}."""
    out = {"run": []}
    for i in range(args.rounds):
        start = time.monotonic()
        c.ctr(*run_args(runtime, args.config, "--rm", IMAGE, f"{name}-run-{i}", "true"))
        out["run"].append(time.monotonic() - start)
        print(f"round {i + 1} {name:<9} ctr run --rm: {out['run'][-1]:8.3f} s", flush=True)

    cid = f"{name}-mem"
    c.ctr(*run_args(runtime, args.config, "-d", IMAGE, cid, "sleep", "1000000"))
    if not task_running(c, cid):
        raise BenchError(f"{cid} is not running after ctr run -d")
    time.sleep(2)  # let start-up settle
    out["mem"] = pod_pss(c, [cid])
    print(f"{name:<9} one pod: {sum(out['mem'].values()) / 1024:.1f} MiB PSS", flush=True)
    c.cleanup_tasks()

    ids = [f"{name}-pod-{i}" for i in range(args.pods)]
    start = time.monotonic()
    procs = []
    for cid in ids:
        procs.append((cid, subprocess.Popen(c.ctr_args(*run_args(runtime, args.config, "-d", IMAGE, cid, "sleep", "1000000")),
                                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True)))
    failed = []
    for cid, p in procs:
        try:
            text, _ = p.communicate(timeout=max(1, args.timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            failed.append(f"{cid}: no answer within {args.timeout} s")
            continue
        if p.returncode != 0:
            failed.append(f"{cid}: exit {p.returncode}: {text.strip()[-500:]}")
    out["pods_s"] = time.monotonic() - start
    if failed:
        raise BenchError(f"{len(failed)} of {args.pods} pods failed:\n" + "\n".join(failed))
    not_running = [cid for cid in ids if not task_running(c, cid)]
    if not_running:
        raise BenchError(f"not running after ctr run -d: {not_running}")
    print(f"{name:<9} {args.pods} pods running after {out['pods_s']:.1f} s", flush=True)
    time.sleep(2)
    out["pods_mem"] = pod_pss(c, ids)
    c.cleanup_tasks()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pods", type=int, default=10)
    ap.add_argument("--timeout", type=int, default=900, help="per command (and for all pods), seconds")
    ap.add_argument("--config", help="Carapace config file (the runtime options' ConfigPath)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise BenchError("run as root (containerd and both runtimes need it)")
    if args.rounds < 1 or args.pods < 1:
        raise BenchError("--rounds and --pods must be at least 1")
    if args.config:
        args.config = os.path.abspath(args.config)

    env = dict(os.environ)
    env["CARAPACE_KERNEL"] = asset("CARAPACE_KERNEL", "build/guest/vmlinux")
    env["CARAPACE_INITRAMFS"] = asset("CARAPACE_INITRAMFS", "build/guest/initramfs.cpio")
    bin_dir = os.environ.get("CARAPACE_BIN_DIR") or os.path.join(REPO, "target/release")
    env["CARAPACE_BIN_DIR"] = bin_dir
    for b in ("containerd-shim-carapace-v2", "carapace-vmm"):
        if not os.path.exists(os.path.join(bin_dir, b)):
            raise BenchError(f"{bin_dir}/{b} missing (cargo build --release)")
    for tool in ("containerd", "ctr", "umoci", "runc", "containerd-shim-runc-v2"):
        if not shutil.which(tool):
            raise BenchError(f"{tool} not found (apt containerd umoci runc; scripts/setup.sh installs them)")
    if not os.path.exists("/bin/busybox"):
        raise BenchError("/bin/busybox missing (apt busybox-static)")
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")

    tmp = tempfile.mkdtemp(prefix="carapace-bench-shim-")
    env["CARAPACE_SHIM_ROOT"] = os.path.join(tmp, "shim")
    c = None
    results = {}
    try:
        c = Containerd(os.path.join(tmp, "containerd"), env, args.timeout)
        c.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], "--snapshotter", "native",
              busybox_image(tmp))
        for name, runtime in (("carapace", CARAPACE), ("runc", RUNC)):
            results[name] = bench_runtime(c, name, runtime, args, tmp)
    except BenchError as e:
        if c is not None:
            e.args = (f"{e}\n--- containerd.log (tail) ---\n{c.log_tail()}",)
        raise
    finally:
        if c is not None:
            c.stop()
        # Mounts a killed shim left under tmp (a rootfs), then the files.
        with open("/proc/self/mountinfo") as f:
            points = [l.split()[4] for l in f if l.split()[4].startswith(tmp)]
        for p in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", p], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median
    print(f"\nctr run --rm (busybox `true`), median of {args.rounds}")
    t = {n: med(r["run"]) for n, r in results.items()}
    print(f"  carapace {t['carapace']:8.3f} s   runc {t['runc']:8.3f} s   ratio {t['carapace'] / t['runc']:.1f}x")

    def show(label, parts, per):
        total = sum(parts.values()) / per
        detail = " + ".join(f"{n} {kib / per / 1024:.1f}" for n, kib in sorted(parts.items()))
        print(f"  {label:<9} {total / 1024:8.1f} MiB per pod  ({detail} MiB)")
        return total

    print("\nhost memory of one running pod (busybox `sleep`; PSS of the shim and its descendants)")
    one = {n: show(n, r["mem"], 1) for n, r in results.items()}
    print(f"  ratio {one['carapace'] / one['runc']:.1f}x")
    print(f"\n{args.pods} pods at once (`ctr run -d ... sleep` in parallel)")
    for n, r in results.items():
        print(f"  {n:<9} all running after {r['pods_s']:8.1f} s")
    many = {n: show(n, r["pods_mem"], args.pods) for n, r in results.items()}
    print(f"  ratio {many['carapace'] / many['runc']:.1f}x")


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so that the cleanup runs.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        main()
    except BenchError as e:
        sys.exit(f"bench: {e}")
    except KeyboardInterrupt:
        sys.exit("bench: interrupted")
