//! Reading a container's cgroup v2 files: statistics, OOM kills, its
//! processes. One open/read/close per file; the numbers are parsed here.

use std::io;
use std::path::{Path, PathBuf};

use carapace_protocol::agent::{CgroupStats, CpuStats, IoDeviceStats, IoStats, MemoryStats, PidsStats};

use crate::init::{self, InitError};
use crate::sys::Syscall;

/// Where the cgroup v2 hierarchy is mounted (by PID 1).
pub const CGROUP_ROOT: &str = init::CGROUP_ROOT;

/// A container's cgroup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    dir: PathBuf,
}

/// The spare's path. No container's default path (`/carapace/<id>`) can
/// be it: an id has no `@`.
pub const SPARE_PATH: &str = "/carapace/@spare";

/// A container cgroup made at boot, for the first container whose spec
/// names none (the default location is ours to choose).
///
/// Making a cgroup with every controller costs ~0.5 s of guest time where
/// the guest kernel is emulated (kvm_pvm hosts): a css and its files for
/// each controller, the memory controller's per-cpu statistics. The agent
/// makes one before it serves, so a VM template carries it; it has never
/// held a process, so it is what a new one would be (every counter zero).
/// A cgroup v2 directory cannot be renamed, hence a path of its own.
#[derive(Debug, Default)]
pub struct SpareCgroup(std::sync::Mutex<Option<Cgroup>>);

impl SpareCgroup {
    /// Makes [`SPARE_PATH`] under `root` as libcgroups makes a container's
    /// cgroup: its parent with every controller it has enabled for children
    /// (as PID 1 enables them at the root: [`init::enable_controllers`]).
    pub fn make(&self, sys: &dyn Syscall, root: &Path) -> Result<(), InitError> {
        let spare = Cgroup::new(root, Path::new(SPARE_PATH));
        let parent = spare.dir.parent().unwrap_or(root);
        let mkdir = |path: &Path| match std::fs::create_dir(path) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(InitError::Mkdir { path: path.to_path_buf(), cause: e }),
            _ => Ok(()),
        };
        mkdir(parent)?;
        init::enable_controllers(sys, parent)?;
        mkdir(&spare.dir)?;
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(spare);
        Ok(())
    }

    /// The spare, once.
    pub fn take(&self) -> Option<Cgroup> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// "max" → u64::MAX, a number → itself.
fn parse_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        Some(u64::MAX)
    } else {
        t.parse().ok()
    }
}

/// `key value` lines (cpu.stat, memory.stat, memory.events).
fn parse_flat_keyed(text: &str) -> impl Iterator<Item = (&str, u64)> {
    text.lines().filter_map(|line| {
        let (k, v) = line.split_once(' ')?;
        Some((k, v.trim().parse().ok()?))
    })
}

/// The controllers enabled at the root of the hierarchy (what children can
/// use): `cgroup.subtree_control` of the root, else `cgroup.controllers`.
pub fn root_controllers(root: &Path) -> Vec<String> {
    let read = |name: &str| {
        crate::sys::read_small_file(&root.join(name))
            .map(|s| s.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let enabled = read("cgroup.subtree_control");
    if enabled.is_empty() {
        read("cgroup.controllers")
    } else {
        enabled
    }
}

/// cgroup v2 io.weight for an OCI blkio weight (10-1000 → 1-10000,
/// linear, as runc maps it).
pub fn io_weight_v2(weight: u16) -> u32 {
    1 + u32::from(weight.clamp(10, 1000) - 10) * 9999 / 990
}

impl Cgroup {
    /// Corrects what libcgroups 0.7 gets wrong when it applies
    /// `resources` (called after it did, before the process runs):
    /// - `memory.swap` equal to `memory.limit` means "no swap"
    ///   (memory.swap.max 0), which libcgroups skips writing, leaving max;
    /// - the blkio weight's conversion to io.weight overflows a u16 in
    ///   libcgroups (500 becomes 51).
    pub fn fix_libcgroups(&self, resources: &oci_spec::runtime::LinuxResources) -> io::Result<()> {
        if let Some(memory) = resources.memory() {
            if let (Some(limit), Some(swap)) = (memory.limit(), memory.swap()) {
                if limit >= 0 && swap == limit {
                    std::fs::write(self.dir.join("memory.swap.max"), "0")?;
                }
            }
        }
        if let Some(weight) = resources.block_io().as_ref().and_then(|b| b.weight()) {
            if weight > 0 && !self.dir.join("io.bfq.weight").exists() {
                std::fs::write(self.dir.join("io.weight"), format!("default {}", io_weight_v2(weight)))?;
            }
        }
        Ok(())
    }

    /// The cgroup at `path` (absolute, as in the prepared spec) under `root`.
    pub fn new(root: &Path, path: &Path) -> Self {
        let rel = path.strip_prefix("/").unwrap_or(path);
        Self { dir: root.join(rel) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read(&self, name: &str) -> Option<String> {
        crate::sys::read_small_file(&self.dir.join(name)).ok()
    }

    /// `oom_kill` of memory.events (0 without the memory controller).
    pub fn oom_kills(&self) -> u64 {
        self.read("memory.events").and_then(|t| parse_flat_keyed(&t).find(|(k, _)| *k == "oom_kill").map(|(_, v)| v)).unwrap_or(0)
    }

    /// The PIDs in cgroup.procs of this cgroup and of its descendants.
    pub fn pids(&self) -> io::Result<Vec<u32>> {
        let mut pids = Vec::new();
        collect_pids(&self.dir, &mut pids)?;
        Ok(pids)
    }

    /// Whether the cgroup is frozen (cgroup.freeze says 1).
    pub fn frozen(&self) -> bool {
        self.read("cgroup.freeze").is_some_and(|v| v.trim() == "1")
    }

    /// Whether the directory still exists.
    pub fn exists(&self) -> bool {
        self.dir.exists()
    }

    /// Removes the (empty) cgroup and its empty descendants, deepest first.
    pub fn remove(&self) -> io::Result<()> {
        remove_tree(&self.dir)
    }

    /// The statistics the API reports.
    pub fn stats(&self) -> CgroupStats {
        let mut stats = CgroupStats::new();

        let mut cpu = CpuStats::new();
        if let Some(text) = self.read("cpu.stat") {
            for (k, v) in parse_flat_keyed(&text) {
                match k {
                    "usage_usec" => cpu.usage_usec = v,
                    "user_usec" => cpu.user_usec = v,
                    "system_usec" => cpu.system_usec = v,
                    "nr_periods" => cpu.nr_periods = v,
                    "nr_throttled" => cpu.nr_throttled = v,
                    "throttled_usec" => cpu.throttled_usec = v,
                    _ => {}
                }
            }
        }
        stats.cpu = Some(cpu).into();

        let mut memory = MemoryStats::new();
        let number = |name: &str| self.read(name).and_then(|t| parse_limit(&t)).unwrap_or(0);
        memory.current = number("memory.current");
        memory.limit = number("memory.max");
        memory.peak = number("memory.peak");
        memory.swap_current = number("memory.swap.current");
        memory.swap_limit = number("memory.swap.max");
        if let Some(text) = self.read("memory.events") {
            for (k, v) in parse_flat_keyed(&text) {
                match k {
                    "oom" => memory.oom = v,
                    "oom_kill" => memory.oom_kill = v,
                    _ => {}
                }
            }
        }
        if let Some(text) = self.read("memory.stat") {
            for (k, v) in parse_flat_keyed(&text) {
                match k {
                    "anon" => memory.anon = v,
                    "file" => memory.file = v,
                    "kernel" => memory.kernel = v,
                    "shmem" => memory.shmem = v,
                    _ => {}
                }
                memory.stat.insert(k.to_string(), v);
            }
        }
        stats.memory = Some(memory).into();

        let mut pids = PidsStats::new();
        pids.current = number("pids.current");
        pids.limit = number("pids.max");
        stats.pids = Some(pids).into();

        let mut io = IoStats::new();
        if let Some(text) = self.read("io.stat") {
            io.devices = parse_io_stat(&text);
        }
        stats.io = Some(io).into();
        stats
    }
}

fn collect_pids(dir: &Path, out: &mut Vec<u32>) -> io::Result<()> {
    let text = crate::sys::read_small_file(&dir.join("cgroup.procs"))?;
    out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            collect_pids(&entry.path(), out)?;
        }
    }
    Ok(())
}

fn remove_tree(dir: &Path) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// `254:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0` per line.
fn parse_io_stat(text: &str) -> Vec<IoDeviceStats> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (major, minor) = parts.next()?.split_once(':')?;
            let mut dev = IoDeviceStats::new();
            dev.major = major.parse().ok()?;
            dev.minor = minor.parse().ok()?;
            for kv in parts {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                let v: u64 = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => dev.rbytes = v,
                    "wbytes" => dev.wbytes = v,
                    "rios" => dev.rios = v,
                    "wios" => dev.wios = v,
                    "dbytes" => dev.dbytes = v,
                    "dios" => dev.dios = v,
                    _ => {}
                }
            }
            Some(dev)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spare_is_made_under_a_parent_with_the_roots_controllers_and_taken_once() {
        let root = tempfile::tempdir().expect("tempdir");
        // What the kernel shows in /carapace: the controllers the root
        // enables for its children.
        let parent = root.path().join("carapace");
        std::fs::create_dir(&parent).expect("mkdir");
        std::fs::write(parent.join("cgroup.controllers"), "cpu memory pids\n").expect("write");
        std::fs::write(parent.join("cgroup.subtree_control"), "").expect("write");
        let spare = SpareCgroup::default();
        assert_eq!(spare.take(), None);
        spare.make(&crate::sys::LinuxSyscall, root.path()).expect("make");
        assert_eq!(std::fs::read_to_string(parent.join("cgroup.subtree_control")).expect("read"), "+cpu +memory +pids");
        let taken = spare.take().expect("made");
        assert_eq!(taken.dir(), parent.join("@spare"));
        assert!(taken.exists());
        assert_eq!(spare.take(), None, "taken once");
        // An id cannot name it: the default path of any container differs.
        assert!(super::super::check_id("id", "@spare").is_err());
    }

    #[test]
    fn reads_a_fake_cgroup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cg = Cgroup::new(dir.path(), Path::new("/carapace/c1"));
        std::fs::create_dir_all(cg.dir().join("sub")).expect("mkdir");
        let write = |name: &str, text: &str| std::fs::write(cg.dir().join(name), text).expect("write");
        write("cpu.stat", "usage_usec 100\nuser_usec 60\nsystem_usec 40\nnr_periods 3\n");
        write("memory.current", "4096\n");
        write("memory.max", "max\n");
        write("memory.events", "low 0\nhigh 0\nmax 5\noom 2\noom_kill 1\n");
        write("memory.stat", "anon 1024\nfile 2048\nkernel 10\nshmem 0\nsock 0\n");
        write("pids.current", "3\n");
        write("pids.max", "10\n");
        write("io.stat", "254:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n");
        write("cgroup.procs", "7\n8\n");
        std::fs::write(cg.dir().join("sub/cgroup.procs"), "9\n").expect("write");

        let stats = cg.stats();
        assert_eq!(stats.cpu.usage_usec, 100);
        assert_eq!(stats.cpu.nr_periods, 3);
        assert_eq!(stats.memory.current, 4096);
        assert_eq!(stats.memory.limit, u64::MAX);
        assert_eq!((stats.memory.oom, stats.memory.oom_kill), (2, 1));
        assert_eq!(stats.memory.anon, 1024);
        assert_eq!(stats.memory.stat.get("sock"), Some(&0));
        assert_eq!((stats.pids.current, stats.pids.limit), (3, 10));
        assert_eq!(stats.io.devices.len(), 1);
        assert_eq!(stats.io.devices[0].major, 254);
        assert_eq!(stats.io.devices[0].wbytes, 20);
        assert_eq!(cg.oom_kills(), 1);
        let mut pids = cg.pids().expect("pids");
        pids.sort_unstable();
        assert_eq!(pids, [7, 8, 9]);
    }

    #[test]
    fn io_weights() {
        assert_eq!(io_weight_v2(10), 1);
        assert_eq!(io_weight_v2(500), 4950);
        assert_eq!(io_weight_v2(1000), 10000);
        assert_eq!(io_weight_v2(5), 1);
    }

    #[test]
    fn fixes_swap_and_io_weight() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cg = Cgroup::new(dir.path(), Path::new("/c"));
        std::fs::create_dir_all(cg.dir()).expect("mkdir");
        let resources: oci_spec::runtime::LinuxResources =
            serde_json::from_str(r#"{"memory": {"limit": 100, "swap": 100}, "blockIO": {"weight": 500}}"#).expect("json");
        cg.fix_libcgroups(&resources).expect("fix");
        assert_eq!(std::fs::read_to_string(cg.dir().join("memory.swap.max")).expect("swap"), "0");
        assert_eq!(std::fs::read_to_string(cg.dir().join("io.weight")).expect("io"), "default 4950");
    }

    #[test]
    fn limits() {
        assert_eq!(parse_limit("max\n"), Some(u64::MAX));
        assert_eq!(parse_limit("42"), Some(42));
        assert_eq!(parse_limit("x"), None);
    }
}
