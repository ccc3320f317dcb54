//! Fixtures for unit tests of the container verbs without root: a manager
//! whose state, cgroup root and stdio sockets live in a temporary
//! directory and whose signals and unmounts are recorded, and containers
//! put in it directly (no libcontainer build).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use libcontainer::container::Container as LcContainer;

use super::cgroup::Cgroup;
use super::process::Process;
use super::stdio::{self, Dialer, StdioPorts};
use super::{Container, ContainerManager, Inner, ManagerConfig};
use crate::reaper::{ChildExit, ExitKind, Reaper};
use crate::sys::test_utils::RecordingSyscall;

/// A manager under `dir`, and the calls it makes.
pub fn manager(dir: &Path) -> (ContainerManager, Arc<RecordingSyscall>) {
    let sys = Arc::new(RecordingSyscall::default());
    let config = ManagerConfig {
        state_dir: dir.join("state"),
        dialer: Dialer::Unix { base: dir.join("agent.sock") },
        cgroup_root: dir.join("cgroup"),
        default_env: Vec::new(),
    };
    let manager = ContainerManager::with_syscall(config, Arc::new(Reaper::new()), sys.clone());
    (manager, sys)
}

/// A process with no stdio streams (/dev/null).
pub fn process(pid: i32) -> Arc<Process> {
    let (pending, _child) =
        stdio::prepare(&Dialer::Unix { base: "/nonexistent".into() }, StdioPorts::default(), false).expect("stdio to /dev/null");
    let io = pending.start("test", None).expect("start io");
    Arc::new(Process::new(pid, io, 0))
}

/// Marks a process exited with `code`.
pub fn exit(process: &Process, code: i32) {
    process.record_exit(ChildExit { pid: process.pid(), kind: ExitKind::Exited(code) });
}

/// Puts a container `id` with init `pid` in the manager; its cgroup is a
/// plain directory listing `cgroup_pids`.
pub fn add_container(manager: &ContainerManager, id: &str, pid: i32, started: bool, cgroup_pids: &[u32]) -> Arc<Container> {
    let cgroup = Cgroup::new(&manager.config.cgroup_root, &Path::new("/carapace").join(id));
    std::fs::create_dir_all(cgroup.dir()).expect("cgroup dir");
    let procs: String = cgroup_pids.iter().map(|p| format!("{p}\n")).collect();
    std::fs::write(cgroup.dir().join("cgroup.procs"), procs).expect("cgroup.procs");
    let bundle = manager.bundles_dir().join(id);
    std::fs::create_dir_all(&bundle).expect("bundle");
    let container = Arc::new(Container {
        id: id.to_string(),
        bundle,
        cgroup,
        mounts_before: None,
        rootfs: manager.config.state_dir.join("rootfs"),
        init: process(pid),
        direct_exec: false,
        direct_init: false,
        seccomp: None,
        inner: Mutex::new(Inner { lc: LcContainer::default(), init_process: None, started, execs: HashMap::new(), exec_watch: None }),
    });
    super::lock(&manager.containers).insert(id.to_string(), container.clone());
    container
}
