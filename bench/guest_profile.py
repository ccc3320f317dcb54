#!/usr/bin/env python3
"""Symbolize the guest samples of `CARAPACE_VMM_PROFILE=FILE carapace-vmm`.

Each line of FILE is `<unix time> <vmm pid> <vcpu> <rip hex> <cpl> <cr3 hex>
<delay us> [<per-cpu word hex>]` (see vmm/src/profile.rs). When the VMM ran
with CARAPACE_VMM_PROFILE_PERCPU=<offset of __preempt_count in System.map>,
kernel samples are also split by context (hard IRQ, soft IRQ, task), and
--context limits the tables to one of them. Kernel RIPs (CPL 0) are named from the guest
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
import re
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


# Rough kernel areas, first match wins (names of a 6.1 x86-64 kernel). The
# tick group holds what only the periodic tick and timekeeping run; load
# tracking (`update_load_avg`...) runs on every tick and on every enqueue,
# dequeue and switch, so it is a group of its own.
GROUPS = [
    ("tick, timers, timekeeping", r"^(timekeeping_|update_wall_time|tick_|__tick|hrtimer_|__hrtimer_|__run_hrtimer|ktime_get|update_vsyscall|"
     r"pvclock_|kvm_clock|read_tsc|native_sched_clock|sched_clock|scheduler_tick|task_tick|update_process_times|rcu_sched_clock_irq|"
     r"rcu_pending|perf_event_task_tick|account_process_tick|account_user_time|account_system|irqtime|run_local_timers|"
     r"__next_timer_interrupt|get_next_timer_interrupt|calc_global_load|trigger_load_balance|clockevents_|lapic_next|"
     r"native_apic|x2apic|sysvec_apic_timer|__sysvec_apic_timer|local_apic_timer|timer_|run_timer|__run_timers|"
     r"cpuacct_charge|cgroup_account_cputime|__cgroup_account_cputime|kvm_sched_clock|kvm_steal_clock|run_posix_cpu_timers|"
     r"second_overflow|timerqueue_|__mod_timer|lock_timer_base|mod_timer)"),
    ("sched: load tracking", r"^(__update_load_avg|update_load_avg|update_cfs_group|reweight_entity|update_curr|update_min_vruntime|"
     r"__calc_delta|sched_slice|update_rq_clock|__accumulate_pelt|decay_load|attach_entity|detach_entity|propagate_entity)"),
    ("sched: switch, wakeup", r"^(__schedule|schedule|__switch_to|finish_task_switch|pick_next|put_prev|set_next_entity|"
     r"enqueue|dequeue|try_to_wake_up|ttwu|wake_up|check_preempt|select_task_rq|activate_task|resched)"),
    ("entry, exceptions, irq", r"^(entry_|error_entry|error_return|swapgs_|sync_regs|asm_|exc_|irq_|__irq|irqentry_|"
     r"common_interrupt|sysvec_|handle_|restore_regs|native_irq_return|fixup_bad_iret|syscall_|do_syscall|__x64_sys_ni)"),
    ("percpu allocator", r"^pcpu_"),
    ("RCU", r"^(rcu_|__rcu|call_rcu|note_gp_changes|__note_gp_changes|swake_up|kfree_rcu)"),
    ("spinlocks", r"^_raw_(spin|read|write)_"),
    ("mm: VMAs (maple tree)", r"^(mas_|mtree_|mab_|mt_|vm_area_|vma_|__vma|find_vma|mmap_region|do_mmap|__do_munmap|do_vmi)"),
    ("page tables: fork copy, unmap", r"^(copy_page_range|copy_p.._range|copy_pte|copy_present|unmap_|zap_|free_pgtables|"
     r"free_p.._range|tlb_|release_pages|free_pages_and_swap|page_remove_rmap|__tlb|dup_mm|dup_mmap|exit_mmap)"),
    ("page faults, page cache mapping", r"^(filemap_|next_uptodate_page|do_set_pte|handle_mm_fault|__handle_mm_fault|do_fault|"
     r"do_read_fault|do_cow_fault|do_anonymous_page|do_wp_page|wp_page|set_pte|page_add_|folio_add|lock_page|unlock_page|"
     r"__do_fault|finish_fault|do_user_addr_fault|pte_alloc|__pte_alloc|pmd_alloc|__pmd_alloc|__pud_alloc|"
     r"alloc_pages|__alloc_pages|get_page_from_freelist|rmqueue|clear_page|copy_page|__free_pages|free_unref|free_pcppages|"
     r"__folio|folio_|vma_alloc_folio|mem_cgroup_|__mod_memcg|__mod_lruvec|mod_lruvec|memcg_|__count_memcg|lru_|"
     r"__lru|page_counter)"),
    ("slab", r"^(kmem_cache_|kmalloc|__kmalloc|kfree|___cache_free|cache_alloc|____cache_alloc|free_block|cache_flusharray|"
     r"__kmem_cache|slab_|cache_grow|alloc_block)"),
    ("path lookup, dcache", r"^(link_path_walk|walk_component|step_into|lookup_|__lookup|d_alloc|__d_lookup|d_lookup|dput|"
     r"path_|filename_|do_filp_open|getname|putname|terminate_walk|complete_walk|legitimize|try_to_unlazy|"
     r"generic_permission|inode_permission|may_open|__d_|d_|follow_|pick_link|nd_|set_root|mntput|mntget|"
     r"vfs_|do_dentry_open|alloc_empty_file|__fput|fput)"),
    ("proc, sysfs, kernfs", r"^(proc_|pid_|kernfs_|sysfs_|seq_|show_|render_)"),
    ("fuse", r"^fuse_"),
    ("cgroups", r"^(cgroup|css_|__cgroup|rstat|mem_cgroup_css|init_cgroup)"),
    ("memcpy, string, usercopy", r"^(memcpy|memset|memmove|__memcpy|__memset|strn?cpy|strn?cmp|strlen|copy_user|"
     r"_copy_to_user|_copy_from_user|copy_from_user|copy_to_user|rep_movs|__get_user|__put_user|strncpy_from_user|"
     r"clear_user|__clear_user)"),
    ("idle", r"^(default_idle|arch_cpu_idle|do_idle|cpu_idle|native_safe_halt|pv_native_safe_halt|cpuidle)"),
]


def group_of(name):
    for title, pattern in GROUPS:
        if re.search(pattern, name):
            return title
    return "other kernel"


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
    p.add_argument("--context", choices=["hardirq", "softirq", "task"], help="only kernel samples in this context")
    p.add_argument("--top-kernel", type=int, default=40)
    p.add_argument("--top-user", type=int, default=30)
    p.add_argument("--width", type=int, default=100, help="longest name printed")
    a = p.parse_args()

    kernel = Resolver(a.vmlinux, False)
    user = Resolver(a.user, True) if a.user else None
    kfun, ufun = collections.Counter(), collections.Counter()
    n = nk = nu = nother = 0
    spaces = collections.Counter()
    contexts = collections.Counter()
    delays = {"kernel": [], "user": []}
    t_first, t_last = None, None
    with open(a.samples) as f:
        for line in f:
            fields = line.split()
            if len(fields) not in (6, 7, 8):
                continue
            try:
                t, pid, rip, cpl = float(fields[0]), int(fields[1]), int(fields[3], 16), int(fields[4])
            except ValueError:
                continue
            if not a.t0 <= t <= a.t1 or (a.pid is not None and pid != a.pid):
                continue
            ctx = None
            if len(fields) == 8 and fields[7] != "-" and (cpl == 0 or rip >= 0xFFFF800000000000):
                w = int(fields[7], 16)
                ctx = "hardirq" if w & 0xFF0000 else "softirq" if w & 0x100 else "task"
            if a.context and ctx != a.context:
                continue
            if ctx:
                contexts[ctx] += 1
            n += 1
            t_first = t if t_first is None else t_first
            t_last = t
            spaces[fields[5]] += 1
            kernel_mode = cpl == 0 or rip >= 0xFFFF800000000000
            if len(fields) >= 7:
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
    if contexts:
        table("kernel samples by context (preempt count)", contexts, n, 3, a.width)
    groups = collections.Counter()
    for name, count in kfun.items():
        groups[group_of(name)] += count
    table("kernel time by area (rough)", groups, n, len(GROUPS) + 1, a.width)
    table("top kernel functions", kfun, n, a.top_kernel, a.width)
    table("top user functions", ufun, n, a.top_user, a.width)


if __name__ == "__main__":
    main()
