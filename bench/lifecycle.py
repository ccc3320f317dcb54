#!/usr/bin/env python3
"""Container lifecycle benchmark: each step of one busybox `/bin/true`
bundle, host wall time beside what it cost inside the guest, against runc.

For each runtime under its own --root, in each round:
  - create, start, exit (from `start` returning to `state` saying
    `stopped`), delete of the `true` bundle;
  - exec: `exec ID true` in a running `sleep` container (its create and
    start are not timed; the exec comes --settle seconds after the start,
    once the program's own start-up is over), then `exec again`: a second
    one in the same container.
Host wall time of each command (`time.monotonic` around it). For carapace,
also the guest figures the agent puts in its answers (`GuestUsage`, logged
by the runtime at debug level: see agent/src/usage.rs): guest wall time,
CPU (user+system), system calls (our guest kernel's per-task count,
patch 0008), minor/major page faults and voluntary/involuntary context
switches of the agent and the processes it forked, for the verb of the
step (create: CreateContainer; start: StartContainer; exit: from the
reaping of the process to the WaitProcess answer; exec: ExecProcess plus
its WaitProcess). `exit recorded` is how long after the guest reaped the
process the monitor wrote `stopped` (host clock minus guest clock, which
was set from the host's).

Figures, never assertions: run it on a quiet machine. Run as root.

usage: bench/lifecycle.py [--rounds N] [--timeout S] [--settle S]
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

from cli import Runtime, busybox_bundle, carapace_and_runc

STEPS = ("create", "start", "exit", "delete", "exec", "exec again")
# The agent answers whose usage makes each step's guest figures.
GUEST_CALLS = {"create": ["CreateContainer"], "start": ["StartContainer"], "exit": ["WaitProcess"],
               "delete": ["RemoveContainer"], "exec": ["ExecProcess", "WaitProcess"],
               "exec again": ["ExecProcess", "WaitProcess"]}
FIELDS = ("wall_us", "user_us", "system_us", "syscalls", "minor_faults", "major_faults", "voluntary_switches",
          "involuntary_switches")


class LoggedRuntime(Runtime):
    """carapace with global flags that send its logs (and its monitors') to a file."""

    def __init__(self, *a, flags, **kw):
        super().__init__(*a, **kw)
        self.flags = flags

    def cmd(self, *args, check=True):
        return super().cmd(*self.flags, *args, check=check)


class Log:
    """The JSON log carapace and its monitors append to; read by offset."""

    def __init__(self, path):
        self.path, self.offset = path, 0
        open(path, "a").close()

    def mark(self):
        self.offset = os.path.getsize(self.path)

    def events(self):
        """The events written since the last mark, as `fields` dicts."""
        with open(self.path) as f:
            f.seek(self.offset)
            text = f.read()
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line).get("fields", {}))
            except json.JSONDecodeError:
                pass
        return out


def guest_usage(events, calls):
    """Sum of the usage of the named calls among events; None if absent."""
    total, seen = {k: 0 for k in FIELDS}, False
    for call in calls:
        for e in events:
            if e.get("message") == "guest usage" and e.get("call") == call:
                for k in FIELDS:
                    total[k] += int(e.get(k, 0))
                seen = True
                break
    return total if seen else None


def exit_recorded_ms(events):
    for e in events:
        if e.get("message") == "exit recorded":
            return int(e["after_exit_us"]) / 1000
    return None


def timed_steps(rt, log, true_bundle, sleep_bundle, i, settle):
    """{step: (host seconds, guest usage or None)} for one round."""
    res = {}

    def step(name, *args):
        log and log.mark()
        t, _ = rt.cmd(*args)
        return t

    cid = f"life-{i}"
    t = step("create", "create", "--bundle", true_bundle, cid)
    res["create"] = (t, log and guest_usage(log.events(), GUEST_CALLS["create"]))
    t = step("start", "start", cid)
    res["start"] = (t, log and guest_usage(log.events(), GUEST_CALLS["start"]))
    log and log.mark()
    t0 = time.monotonic()
    rt.wait_stopped(cid)
    t = time.monotonic() - t0
    events = log.events() if log else []
    res["exit"] = (t, log and guest_usage(events, GUEST_CALLS["exit"]))
    res["exit recorded"] = exit_recorded_ms(events)
    t = step("delete", "delete", cid)
    res["delete"] = (t, log and guest_usage(log.events(), GUEST_CALLS["delete"]))

    sid = f"life-sleep-{i}"
    rt.cmd("create", "--bundle", sleep_bundle, sid)
    rt.cmd("start", sid)
    # `start` returns once the program is exec'd; its own start-up (on a
    # fresh microVM, busybox read through virtio-fs into the page cache)
    # goes on in the guest after that and would be counted in the exec.
    time.sleep(settle)
    try:
        for name in ("exec", "exec again"):
            t = step(name, "exec", sid, "true")
            res[name] = (t, log and guest_usage(log.events(), GUEST_CALLS[name]))
    finally:
        rt.cmd("kill", sid, "SIGKILL", check=False)
        try:
            rt.wait_stopped(sid)
        except RuntimeError:
            pass
        rt.cmd("delete", "--force", sid, check=False)
    return res


def fmt_usage(u):
    if u is None:
        return f"{'-':>9}{'-':>9}{'-':>9}{'-':>8}{'-':>7}{'-':>7}{'-':>7}"
    cpu = (u["user_us"] + u["system_us"]) / 1e6
    return (f"{u['wall_us'] / 1e6:>8.3f}s{cpu:>8.3f}s{u['syscalls']:>9}{u['minor_faults']:>8}{u['major_faults']:>7}"
            f"{u['voluntary_switches']:>7}{u['involuntary_switches']:>7}")


def median_usage(us):
    us = [u for u in us if u is not None]
    if not us:
        return None
    return {k: int(statistics.median(u[k] for u in us)) for k in FIELDS}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=600, help="per command, seconds")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds between the sleep container's start and the first exec")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (both runtimes need it)")

    env, carapace, runc = carapace_and_runc()
    # Only the figures this script reads (and warnings) go to the log.
    env["CARAPACE_LOG"] = "warn,carapace_runtime::guest=debug,carapace_runtime::monitor=debug"

    tmp = tempfile.mkdtemp(prefix="carapace-bench-lifecycle-")
    log = Log(os.path.join(tmp, "carapace.log"))
    carapace_rt = LoggedRuntime("carapace", carapace, os.path.join(tmp, "carapace-root"), args.timeout, env,
                                flags=["--debug", "--log", log.path, "--log-format", "json"])
    runtimes = [(carapace_rt, log), (Runtime("runc", runc, os.path.join(tmp, "runc-root"), args.timeout), None)]
    results = {rt.name: [] for rt, _ in runtimes}
    try:
        true_bundle = busybox_bundle(os.path.join(tmp, "true"), ["true"])
        sleep_bundle = busybox_bundle(os.path.join(tmp, "sleep"), ["sleep", "100000"])
        for i in range(args.rounds):
            for rt, rt_log in runtimes:
                r = timed_steps(rt, rt_log, true_bundle, sleep_bundle, i, args.settle)
                results[rt.name].append(r)
                print(f"round {i + 1} {rt.name:<8} " + "  ".join(f"{s} {r[s][0]:.3f} s" for s in STEPS), flush=True)
    finally:
        for rt, _ in runtimes:
            rt.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median
    print(f"\nmedians over {args.rounds} rounds (busybox `true`; exec: `true` in a running `sleep`)")
    print(f"{'step':<8}{'runc':>9}{'carapace':>10} | guest:{'wall':>7}{'cpu':>9}{'syscalls':>9}{'minflt':>8}{'majflt':>7}"
          f"{'vcsw':>7}{'ivcsw':>7}")
    for s in STEPS:
        h_runc = med(r[s][0] for r in results["runc"])
        h_car = med(r[s][0] for r in results["carapace"])
        u = median_usage([r[s][1] for r in results["carapace"]])
        print(f"{s:<8}{h_runc:>8.3f}s{h_car:>9.3f}s |       {fmt_usage(u)}")
    rec = [r["exit recorded"] for r in results["carapace"] if r["exit recorded"] is not None]
    if rec:
        print(f"exit recorded {med(rec):.0f} ms after the guest reaped the process (carapace monitor)")


if __name__ == "__main__":
    main()
