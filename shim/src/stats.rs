//! Container statistics in containerd's format: the agent's cgroup v2
//! figures as `io.containerd.cgroups.v2.Metrics`, what `ctr task metrics`
//! and the CRI plugin decode.

use carapace_protocol::agent::StatsContainerResponse;
use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;

/// The type URL containerd's typeurl registry knows the message by (bare,
/// without the `type.googleapis.com/` prefix protobuf's `Any::pack` adds).
pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// Converts the agent's answer.
pub fn metrics(s: &StatsContainerResponse) -> Metrics {
    let c = s.cgroup.clone().unwrap_or_default();
    let cpu = c.cpu.clone().unwrap_or_default();
    let mem = c.memory.clone().unwrap_or_default();
    let pids = c.pids.clone().unwrap_or_default();
    let io = c.io.clone().unwrap_or_default();
    let stat = |k: &str| mem.stat.get(k).copied().unwrap_or(0);
    // Kernels since 5.9 split workingset_* into _anon and _file.
    let split = |k: &str| mem.stat.get(k).copied().unwrap_or_else(|| stat(&format!("{k}_anon")) + stat(&format!("{k}_file")));

    let mut m = Metrics::new();
    // containerd's cgroups library reports pids.max "max" as 0, memory.max
    // "max" as u64::MAX: do as it does.
    let pids_limit = if pids.limit == u64::MAX { 0 } else { pids.limit };
    m.pids = Some(PidsStat { current: pids.current, limit: pids_limit, ..Default::default() }).into();
    m.cpu = Some(CPUStat {
        usage_usec: cpu.usage_usec,
        user_usec: cpu.user_usec,
        system_usec: cpu.system_usec,
        nr_periods: cpu.nr_periods,
        nr_throttled: cpu.nr_throttled,
        throttled_usec: cpu.throttled_usec,
        ..Default::default()
    })
    .into();
    m.memory = Some(MemoryStat {
        anon: mem.anon,
        file: mem.file,
        kernel_stack: stat("kernel_stack"),
        slab: stat("slab"),
        sock: stat("sock"),
        shmem: mem.shmem,
        file_mapped: stat("file_mapped"),
        file_dirty: stat("file_dirty"),
        file_writeback: stat("file_writeback"),
        anon_thp: stat("anon_thp"),
        inactive_anon: stat("inactive_anon"),
        active_anon: stat("active_anon"),
        inactive_file: stat("inactive_file"),
        active_file: stat("active_file"),
        unevictable: stat("unevictable"),
        slab_reclaimable: stat("slab_reclaimable"),
        slab_unreclaimable: stat("slab_unreclaimable"),
        pgfault: stat("pgfault"),
        pgmajfault: stat("pgmajfault"),
        workingset_refault: split("workingset_refault"),
        workingset_activate: split("workingset_activate"),
        workingset_nodereclaim: stat("workingset_nodereclaim"),
        pgrefill: stat("pgrefill"),
        pgscan: stat("pgscan"),
        pgsteal: stat("pgsteal"),
        pgactivate: stat("pgactivate"),
        pgdeactivate: stat("pgdeactivate"),
        pglazyfree: stat("pglazyfree"),
        pglazyfreed: stat("pglazyfreed"),
        thp_fault_alloc: stat("thp_fault_alloc"),
        thp_collapse_alloc: stat("thp_collapse_alloc"),
        usage: mem.current,
        usage_limit: mem.limit,
        swap_usage: mem.swap_current,
        swap_limit: mem.swap_limit,
        max_usage: mem.peak,
        ..Default::default()
    })
    .into();
    m.memory_events = Some(MemoryEvents { oom: mem.oom, oom_kill: mem.oom_kill, ..Default::default() }).into();
    m.io = Some(IOStat {
        usage: io
            .devices
            .iter()
            .map(|d| IOEntry {
                major: d.major.into(),
                minor: d.minor.into(),
                rbytes: d.rbytes,
                wbytes: d.wbytes,
                rios: d.rios,
                wios: d.wios,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
    .into();
    m
}

/// Packs metrics the way containerd's typeurl does.
pub fn to_any(m: &Metrics) -> Result<Any, containerd_shim::protos::protobuf::Error> {
    Ok(Any { type_url: METRICS_TYPE_URL.into(), value: m.write_to_bytes()?, ..Default::default() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_protocol::agent::{CgroupStats, CpuStats, IoDeviceStats, IoStats, MemoryStats, PidsStats};

    #[test]
    fn converts_every_group_and_round_trips() {
        let mut s = StatsContainerResponse::new();
        let mut c = CgroupStats::new();
        c.cpu = Some(CpuStats { usage_usec: 1500, user_usec: 1000, system_usec: 500, ..Default::default() }).into();
        let mut mem = MemoryStats { current: 4096, limit: u64::MAX, peak: 8192, anon: 100, oom_kill: 1, ..Default::default() };
        mem.stat.insert("pgfault".into(), 42);
        mem.stat.insert("workingset_refault_anon".into(), 2);
        mem.stat.insert("workingset_refault_file".into(), 3);
        c.memory = Some(mem).into();
        c.pids = Some(PidsStats { current: 3, limit: 100, ..Default::default() }).into();
        let dev = IoDeviceStats { major: 254, minor: 1, rbytes: 10, wbytes: 20, ..Default::default() };
        c.io = Some(IoStats { devices: vec![dev], ..Default::default() }).into();
        s.cgroup = Some(c).into();

        let m = metrics(&s);
        assert_eq!(m.cpu.usage_usec, 1500);
        assert_eq!((m.memory.usage, m.memory.usage_limit, m.memory.max_usage), (4096, u64::MAX, 8192));
        assert_eq!((m.memory.anon, m.memory.pgfault, m.memory.workingset_refault), (100, 42, 5));
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!((m.pids.current, m.pids.limit), (3, 100));
        assert_eq!((m.io.usage[0].major, m.io.usage[0].wbytes), (254, 20));

        let any = to_any(&m).expect("pack");
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        assert_eq!(Metrics::parse_from_bytes(&any.value).expect("unpack"), m);
    }

    #[test]
    fn empty_answer_gives_zeros() {
        let m = metrics(&StatsContainerResponse::new());
        assert_eq!(m.memory.usage, 0);
        let mut s = StatsContainerResponse::new();
        s.cgroup.mut_or_insert_default().pids = Some(PidsStats { current: 1, limit: u64::MAX, ..Default::default() }).into();
        assert_eq!(metrics(&s).pids.limit, 0, "pids.max \"max\" is 0, as containerd reports it");
        assert!(m.io.usage.is_empty());
    }
}
