#!/usr/bin/env python3
"""Symbolize the guest samples of `CARAPACE_VMM_PROFILE=FILE carapace-vmm`.

Each line of FILE is `<unix time> <vmm pid> <vcpu> <rip hex> <cpl> <cr3 hex>
<delay us>` (see vmm/src/profile.rs). Kernel RIPs (CPL 0) are named from the guest
kernel (`nm` of vmlinux, or a System.map); user RIPs (CPL 3) from a binary
with symbols, normally the agent (`nm -C`). The agent in an initramfs is
stripped: build the same source without `strip` (same flags otherwise,
see rootfs-image/build.sh) and check that its .text matches. User samples
outside that binary's text (busybox, the container's processes) count as
"other user".

    python3 bench/guest_profile.py --vmlinux build/guest/vmlinux \\
        --user target/x86_64-unknown-linux-gnu/release/carapace-agent \\
        --from 1796617295.76 --to 1796617315.67 run.txt
"""

import argparse
import bisect
import collections
import subprocess
import sys


def symbols(path, demangle):
    """Sorted (address, name) of the text symbols of an ELF file or System.map."""
    if path.endswith("System.map") or path.endswith(".map"):
        with open(path) as f:
            lines = f.read().splitlines()
    else:
        cmd = ["nm", "-n", "--defined-only"] + (["-C"] if demangle else []) + [path]
        lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()
    out = []
    for line in lines:
        parts = line.split(" ", 2)
        if len(parts) < 3 or parts[1] not in "tTwW":
            continue
        try:
            out.append((int(parts[0], 16), parts[2]))
        except ValueError:
            continue
    out.sort()
    return out


def text_range(path):
    """(start, end) of the .text section, or None (a System.map)."""
    if path.endswith(".map"):
        return None
    out = subprocess.run(["readelf", "-SW", path], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        f = line.replace("[ ", "[").split()
        if len(f) > 5 and f[1] == ".text":
            start, size = int(f[3], 16), int(f[5], 16)
            return start, start + size
    return None


class Resolver:
    def __init__(self, path, demangle):
        self.syms = symbols(path, demangle)
        self.addrs = [a for a, _ in self.syms]
        self.range = text_range(path)

    def name(self, rip):
        if self.range and not self.range[0] <= rip < self.range[1]:
            return None
        i = bisect.bisect_right(self.addrs, rip) - 1
        if i < 0:
            return None
        return self.syms[i][1]


def shorten(name, width):
    return name if len(name) <= width else name[: width - 3] + "..."


def table(title, counter, total, top, width):
    print(f"\n{title} (of {total} samples)")
    for name, n in counter.most_common(top):
        print(f"{n:7d} {100.0 * n / total:5.1f}%  {shorten(name, width)}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples")
    p.add_argument("--vmlinux", required=True, help="guest kernel ELF with symbols, or its System.map")
    p.add_argument("--user", help="user binary with symbols (the agent)")
    p.add_argument("--from", dest="t0", type=float, default=0.0, help="first unix time to count")
    p.add_argument("--to", dest="t1", type=float, default=float("inf"), help="last unix time to count")
    p.add_argument("--pid", type=int, help="only this VMM's samples")
    p.add_argument("--top-kernel", type=int, default=40)
    p.add_argument("--top-user", type=int, default=30)
    p.add_argument("--width", type=int, default=100, help="longest name printed")
    a = p.parse_args()

    kernel = Resolver(a.vmlinux, False)
    user = Resolver(a.user, True) if a.user else None
    kfun, ufun = collections.Counter(), collections.Counter()
    n = nk = nu = nother = 0
    spaces = collections.Counter()
    delays = {"kernel": [], "user": []}
    t_first, t_last = None, None
    with open(a.samples) as f:
        for line in f:
            fields = line.split()
            if len(fields) not in (6, 7):
                continue
            try:
                t, pid, rip, cpl = float(fields[0]), int(fields[1]), int(fields[3], 16), int(fields[4])
            except ValueError:
                continue
            if not a.t0 <= t <= a.t1 or (a.pid is not None and pid != a.pid):
                continue
            n += 1
            t_first = t if t_first is None else t_first
            t_last = t
            spaces[fields[5]] += 1
            kernel_mode = cpl == 0 or rip >= 0xFFFF800000000000
            if len(fields) == 7:
                delays["kernel" if kernel_mode else "user"].append(int(fields[6]))
            if kernel_mode:
                nk += 1
                kfun[kernel.name(rip) or f"?{rip:#x}"] += 1
                continue
            nu += 1
            name = user.name(rip) if user else None
            if name is None:
                nother += 1
                ufun["(other user)"] += 1
            else:
                ufun[name] += 1
    if n == 0:
        sys.exit("no samples in the range")
    span = (t_last - t_first) if n > 1 else 0.0
    print(f"{n} samples over {span:.2f} s ({n / span if span else 0:.0f}/s); {len(spaces)} address spaces (CR3)")
    print(f"kernel {nk} ({100.0 * nk / n:.1f}%), user {nu} ({100.0 * nu / n:.1f}%): "
          f"agent {nu - nother} ({100.0 * (nu - nother) / n:.1f}%), other user {nother} ({100.0 * nother / n:.1f}%)")
    for mode, d in delays.items():
        if d:
            d.sort()
            q = lambda f: d[min(len(d) - 1, int(f * len(d)))]
            print(f"delay after the kick, {mode}: median {q(0.5)} us, p90 {q(0.9)} us, p99 {q(0.99)} us")
    table("top kernel functions", kfun, n, a.top_kernel, a.width)
    table("top user functions", ufun, n, a.top_user, a.width)


if __name__ == "__main__":
    main()
