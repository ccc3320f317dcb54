#!/usr/bin/env python3
"""CLI benchmark: `carapace` against Debian's `runc` on the same OCI bundle.

Builds one bundle (Debian's static busybox, config.json from `runc spec`,
process `true`) and, in turns, for each runtime under its own --root:
  - `run` rounds: the wall time of `RUNTIME run` in the foreground
    (create, start, wait for the exit, delete);
  - step rounds: `create`, `start`, (wait for `stopped`, not timed),
    `delete`, each timed on its own;
then the medians side by side, and the host memory of a running sandbox:
a `sleep` container started with `run --detach`, PSS (from
/proc/PID/smaps_rollup) of carapace's VMM (the state's pid) plus its monitor
(the pid file's pid), against runc's container process. Figures, never
assertions: run it on a quiet machine. Run as root.

usage: bench/cli.py [--rounds N] [--timeout S]
       (assets from CARAPACE_KERNEL / CARAPACE_INITRAMFS / CARAPACE_BIN_DIR,
        else build/guest and target/release)
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _common import REPO, asset_path, pss_kib


def asset(env, default):
    try:
        return asset_path(env, default)
    except FileNotFoundError as e:
        sys.exit(f"bench: {e}")


def carapace_and_runc():
    """The environment naming the guest assets, and the carapace and runc
    binaries; exits with what to install when one is missing."""
    env = dict(os.environ)
    env["CARAPACE_KERNEL"] = asset("CARAPACE_KERNEL", "build/guest/vmlinux")
    env["CARAPACE_INITRAMFS"] = asset("CARAPACE_INITRAMFS", "build/guest/initramfs.cpio")
    env["CARAPACE_BIN_DIR"] = os.environ.get("CARAPACE_BIN_DIR") or os.path.join(REPO, "target/release")
    carapace = os.path.join(env["CARAPACE_BIN_DIR"], "carapace")
    runc = shutil.which("runc")
    if not os.path.exists(carapace) or not runc or not os.path.exists("/bin/busybox"):
        sys.exit("bench: needs target/release/carapace, runc (apt runc) and /bin/busybox (apt busybox-static)")
    return env, carapace, runc


class Runtime:
    def __init__(self, name, binary, root, timeout, env=None):
        self.name, self.binary, self.root, self.timeout = name, binary, root, timeout
        self.env = env

    def cmd(self, *args, check=True):
        """Runs `binary --root ROOT args...` with no stdio; returns (seconds, result)."""
        # Files, not pipes: `create` hands its stdio to the container, and a
        # pipe would stay open (and be waited for) until the container ends.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.monotonic()
            r = subprocess.run([self.binary, "--root", self.root, *args], stdin=subprocess.DEVNULL,
                               stdout=out, stderr=err, env=self.env, timeout=self.timeout)
            elapsed = time.monotonic() - start
            out.seek(0)
            err.seek(0)
            r.stdout, r.stderr = out.read(), err.read()
        if check and r.returncode != 0:
            raise RuntimeError(f"{self.name} {' '.join(args)}: exit {r.returncode}: "
                               f"{r.stderr.decode(errors='replace').strip()}")
        return elapsed, r

    def state(self, cid):
        _, r = self.cmd("state", cid)
        return json.loads(r.stdout)

    def wait_stopped(self, cid):
        end = time.monotonic() + self.timeout
        while time.monotonic() < end:
            if self.state(cid)["status"] == "stopped":
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: {cid} did not stop within {self.timeout} s")

    def cleanup(self):
        r = subprocess.run([self.binary, "--root", self.root, "list", "--quiet"],
                           capture_output=True, text=True, env=self.env)
        for cid in r.stdout.split():
            subprocess.run([self.binary, "--root", self.root, "delete", "--force", cid],
                           capture_output=True, env=self.env, timeout=self.timeout)


def busybox_bundle(path, args):
    rootfs = os.path.join(path, "rootfs")
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "root"):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    shutil.copy("/bin/busybox", os.path.join(rootfs, "bin/busybox"))
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for a in applets:
        if a != "busybox":
            os.symlink("busybox", os.path.join(rootfs, "bin", a))
    with open(os.path.join(rootfs, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    subprocess.run(["runc", "spec", "--bundle", path], check=True)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = args
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return path


def run_round(rt, bundle, cid):
    t, _ = rt.cmd("run", "--bundle", bundle, cid)
    return t


def step_round(rt, bundle, cid):
    t_create, _ = rt.cmd("create", "--bundle", bundle, cid)
    t_start, _ = rt.cmd("start", cid)
    rt.wait_stopped(cid)
    t_delete, _ = rt.cmd("delete", cid)
    return t_create, t_start, t_delete


def memory(rt, bundle, tmp):
    """PSS in KiB of the sandbox's host processes while `sleep` runs: {label: kib}."""
    cid = f"{rt.name}-mem"
    pid_file = os.path.join(tmp, f"{cid}.pid")
    rt.cmd("run", "--detach", "--bundle", bundle, "--pid-file", pid_file, cid)
    try:
        time.sleep(2)  # let start-up settle
        state_pid = rt.state(cid)["pid"]
        with open(pid_file) as f:
            file_pid = int(f.read().strip())
        if rt.name == "carapace":
            vmm_pid = int(rt.state(cid)["annotations"]["io.carapace.vmm-pid"])
            return {"VMM": pss_kib(vmm_pid), "monitor (state pid = pid file)": pss_kib(file_pid)}
        return {"container process": pss_kib(state_pid)}
    finally:
        rt.cmd("kill", cid, "SIGKILL", check=False)
        try:
            rt.wait_stopped(cid)
        except RuntimeError:
            pass
        rt.cmd("delete", "--force", cid, check=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--timeout", type=int, default=600, help="per command, seconds")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (both runtimes need it)")

    env, carapace, runc = carapace_and_runc()

    tmp = tempfile.mkdtemp(prefix="carapace-bench-cli-")
    runtimes = [Runtime("carapace", carapace, os.path.join(tmp, "carapace-root"), args.timeout, env),
                Runtime("runc", runc, os.path.join(tmp, "runc-root"), args.timeout)]
    try:
        true_bundle = busybox_bundle(os.path.join(tmp, "true"), ["true"])
        sleep_bundle = busybox_bundle(os.path.join(tmp, "sleep"), ["sleep", "100000"])
        runs = {rt.name: [] for rt in runtimes}
        steps = {rt.name: [] for rt in runtimes}
        for i in range(args.rounds):
            for rt in runtimes:
                t = run_round(rt, true_bundle, f"run-{i}")
                runs[rt.name].append(t)
                c, s, d = step_round(rt, true_bundle, f"step-{i}")
                steps[rt.name].append((c, s, d))
                print(f"round {i + 1} {rt.name:<8} run {t:8.3f} s   create {c:8.3f} s  start {s:7.3f} s  "
                      f"delete {d:7.3f} s", flush=True)
        mem = {rt.name: memory(rt, sleep_bundle, tmp) for rt in runtimes}
    finally:
        for rt in runtimes:
            rt.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    med = lambda xs: statistics.median(xs)
    rows = [("run (create+start+wait+delete)", {n: med(v) for n, v in runs.items()})]
    for k, label in enumerate(("create", "start", "delete")):
        rows.append((label, {n: med([r[k] for r in v]) for n, v in steps.items()}))
    rows.append(("create+start+delete", {n: med([sum(r) for r in v]) for n, v in steps.items()}))
    print(f"\nmedians over {args.rounds} rounds (busybox `true`, same bundle)")
    print(f"{'':<32}{'carapace':>12}{'runc':>12}{'ratio':>10}")
    for label, m in rows:
        ratio = m["carapace"] / m["runc"] if m["runc"] > 0 else float("inf")
        print(f"{label:<32}{m['carapace']:>10.3f} s{m['runc']:>10.3f} s{ratio:>9.1f}x")

    print("\nhost memory of a running sandbox (busybox `sleep`, PSS from smaps_rollup)")
    totals = {}
    for name, parts in mem.items():
        totals[name] = sum(parts.values())
        detail = " + ".join(f"{label} {kib / 1024:.1f} MiB" for label, kib in parts.items())
        print(f"{name:<9} {totals[name] / 1024:8.1f} MiB  ({detail})")
    if totals["runc"] > 0:
        print(f"ratio carapace/runc {totals['carapace'] / totals['runc']:.1f}x")


if __name__ == "__main__":
    main()
