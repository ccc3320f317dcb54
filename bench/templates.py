#!/usr/bin/env python3
"""VM templates benchmark: `carapace` started from a template, `carapace`
booting cold (`vm_templates = false`), and `runc`, on one busybox bundle.

In one run, each under its own --root (and carapace with its own config
file and template directory):
  - step rounds: `create`, `start`, (the exit: until `state` says stopped),
    `delete`, each timed, for a `true` container;
  - VMM start to the agent's first answer, from the monitor's debug log
    (`agent serving elapsed=...`), template vs cold;
  - host memory of N sandboxes at once (`sleep`, `run --detach`): the sum of
    PSS (smaps_rollup) of every VMM and monitor, template vs cold, and runc's
    container processes.
The template is made before the rounds (its cold boot is printed, not
counted). Figures, never assertions: run it on a quiet machine, as root.

usage: bench/templates.py [--rounds N] [--sandboxes N] [--timeout S]
       (assets from CARAPACE_KERNEL / CARAPACE_INITRAMFS / CARAPACE_BIN_DIR,
        else build/guest and target/release)
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _common import pss_kib
from cli import Runtime, busybox_bundle, carapace_and_runc

ELAPSED = re.compile(r"agent serving.*?elapsed=([0-9.]+)(ms|s|µs)")


def seconds(value, unit):
    return float(value) * {"s": 1.0, "ms": 1e-3, "µs": 1e-6}[unit]


def agent_answer(log_path):
    """The last `agent serving elapsed=` of a monitor log, in seconds."""
    with open(log_path, errors="replace") as f:
        found = ELAPSED.findall(f.read())
    return seconds(*found[-1]) if found else float("nan")


def step_round(rt, bundle, cid, log):
    args = ["--debug", "--log", log] if log else []
    t_create, _ = rt.cmd(*args, "create", "--bundle", bundle, cid)
    t_start, _ = rt.cmd("start", cid)
    start = time.monotonic()
    rt.wait_stopped(cid)
    t_exit = time.monotonic() - start
    t_delete, _ = rt.cmd("delete", cid)
    return t_create, t_start, t_exit, t_delete


def many(rt, bundle, n, tmp):
    """PSS (KiB) of n sleeping sandboxes at once, and how long starting them took."""
    ids = [f"{rt.name}-many-{i}" for i in range(n)]
    start = time.monotonic()
    procs = []
    for cid in ids:
        pid_file = os.path.join(tmp, f"{cid}.pid")
        # A file, not a pipe: the detached container keeps its stderr open.
        err = tempfile.TemporaryFile()
        procs.append((cid, pid_file, err, subprocess.Popen(
            [rt.binary, "--root", rt.root, "run", "--detach", "--bundle", bundle, "--pid-file", pid_file, cid],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=rt.env)))
    for cid, _, err, p in procs:
        p.wait(timeout=rt.timeout)
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{rt.name} run {cid}: {err.read().decode(errors='replace')}")
    procs = [(cid, pid_file, p) for cid, pid_file, _, p in procs]
    took = time.monotonic() - start
    time.sleep(2)
    total = 0
    for cid, pid_file, _ in procs:
        state = rt.state(cid)
        if "io.carapace.vmm-pid" in (state.get("annotations") or {}):
            total += pss_kib(int(state["annotations"]["io.carapace.vmm-pid"]))
            with open(pid_file) as f:
                total += pss_kib(int(f.read().strip()))
        else:
            total += pss_kib(state["pid"])
    for cid in ids:
        rt.cmd("delete", "--force", cid, check=False)
    return total, took


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sandboxes", type=int, default=10)
    ap.add_argument("--timeout", type=int, default=900, help="per command, seconds")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root")
    env, carapace, runc = carapace_and_runc()

    tmp = tempfile.mkdtemp(prefix="carapace-bench-templates-")
    runtimes = []
    for name, templates in (("template", "true"), ("cold", "false")):
        cfg = os.path.join(tmp, f"{name}.toml")
        with open(cfg, "w") as f:
            f.write(f'vm_templates = {templates}\ntemplate_dir = "{tmp}/templates"\n')
        runtimes.append(Runtime(name, carapace, os.path.join(tmp, f"{name}-root"), args.timeout,
                                dict(env, CARAPACE_CONFIG=cfg)))
    runtimes.append(Runtime("runc", runc, os.path.join(tmp, "runc-root"), args.timeout))
    try:
        true_bundle = busybox_bundle(os.path.join(tmp, "true"), ["true"])
        sleep_bundle = busybox_bundle(os.path.join(tmp, "sleep"), ["sleep", "100000"])
        # The template is made by the first templated sandbox: not a round.
        t, _ = runtimes[0].cmd("run", "--bundle", true_bundle, "warm-up")
        print(f"making the template (cold boot + snapshot + first restore): {t:.1f} s", flush=True)
        steps = {rt.name: [] for rt in runtimes}
        answers = {"template": [], "cold": []}
        for i in range(args.rounds):
            for rt in runtimes:
                log = os.path.join(tmp, f"{rt.name}-{i}.log") if rt.name != "runc" else None
                r = step_round(rt, true_bundle, f"step-{i}", log)
                steps[rt.name].append(r)
                if log:
                    answers[rt.name].append(agent_answer(log))
                print(f"round {i + 1} {rt.name:<9} create {r[0]:8.3f} s  start {r[1]:7.3f} s  exit {r[2]:7.3f} s  "
                      f"delete {r[3]:7.3f} s", flush=True)
        mem = {rt.name: many(rt, sleep_bundle, args.sandboxes, tmp) for rt in runtimes}
    finally:
        for rt in runtimes:
            rt.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median
    names = [rt.name for rt in runtimes]
    print(f"\nmedians over {args.rounds} rounds (busybox `true`, same bundle)")
    print(f"{'':<24}" + "".join(f"{n:>14}" for n in names) + f"{'cold/template':>15}")
    for k, label in enumerate(("create", "start", "exit recorded", "delete")):
        m = {n: med([r[k] for r in steps[n]]) for n in names}
        print(f"{label:<24}" + "".join(f"{m[n]:>12.3f} s" for n in names) + f"{m['cold'] / m['template']:>14.1f}x")
    total = {n: med([sum(r) for r in steps[n]]) for n in names}
    print(f"{'all four':<24}" + "".join(f"{total[n]:>12.3f} s" for n in names)
          + f"{total['cold'] / total['template']:>14.1f}x")
    a = {n: med(answers[n]) for n in answers}
    print(f"\nVMM start to agent answer: template {a['template']:.3f} s, cold {a['cold']:.3f} s "
          f"({a['cold'] / a['template']:.0f}x)")
    print(f"\nhost PSS of {args.sandboxes} sandboxes at once (sleep; VMMs + monitors, runc: container processes)")
    for n in names:
        kib, took = mem[n]
        print(f"{n:<9} {kib / 1024:8.1f} MiB  ({kib / 1024 / args.sandboxes:.1f} MiB each; all started in {took:.1f} s)")


if __name__ == "__main__":
    main()
