//! Containers inside the guest: created, started, exec'd into, signalled,
//! waited for and removed, by the agent's own launcher ([`launch`]) where
//! the spec allows it and with youki's libcontainer otherwise (cgroup v2,
//! seccomp through libseccomp).
//!
//! - [`spec`]: validation that names the field at fault, and the changes
//!   made before libcontainer sees a spec;
//! - [`stdio`]: each process's stdin/stdout/stderr over streams to the host;
//! - [`process`]: a process's exit status (from the agent's reaper) and the
//!   wait for it;
//! - [`cgroup`]: statistics, OOM kills and processes from cgroup v2 files;
//! - [`executor`]: the exec at the end of libcontainer's init (and runc's
//!   lookup of the program);
//! - [`launch`]: inits and exec'd processes started without forking the
//!   agent (children sharing its memory until their exec);
//! - [`console`]: the sockets a terminal's pty master comes back on;
//! - [`namespaces`]: the namespaces a container joins (its pod's);
//! - [`mountinfo`]: the mount table, and undoing a container's mounts;
//! - one file a verb, each adding its call to [`ContainerManager`]:
//!   `container_create.rs`, `container_start.rs`, `container_exec.rs`,
//!   `container_signal.rs`, `container_wait.rs`, `container_resize.rs`,
//!   `container_close_stdin.rs`, `container_stats.rs`,
//!   `container_list_processes.rs`, `container_update.rs`,
//!   `container_pause.rs`, `container_resume.rs`, `container_remove.rs`.
//!   Signals and unmounts go through [`crate::sys::Syscall`]; the verbs'
//!   unit tests run without root (`test_utils.rs`).
//!
//! libcontainer forks: the agent's process clones an intermediate process,
//! which clones the container's init as the agent's child (`CLONE_PARENT`)
//! and exits; libcontainer then `waitpid`s the intermediate itself. Every
//! libcontainer call that forks or waits is therefore made with the
//! reaper's registry held ([`crate::reaper::Reaper::registry`]): the reaper
//! does not reap meanwhile, and the new process's waiter is registered
//! before any status can be dispatched. The same lock serializes those
//! calls, which matters because libcontainer changes the process's working
//! directory and `oom_score_adj` while it builds a container. The launcher
//! holds it too: a process forked meanwhile would keep copies of its pipes.
//!
//! State on disk, under the agent's state directory (none for a container
//! the launcher made): `bundles/<id>/` (config.json as libcontainer reads
//! it, exec process files),
//! `containers/<id>/` (libcontainer's state) and `tty/<n>.sock` (console
//! sockets, [`console`]: short paths whatever the ids).

pub mod cgroup;
pub mod console;
mod error;
pub mod executor;
pub mod launch;
pub mod mountinfo;
pub mod namespaces;
pub mod process;
pub mod spare;
pub mod spec;
pub mod stdio;

// One file a verb (youki's shape): each adds its call to ContainerManager.
mod container_close_stdin;
mod container_create;
mod container_exec;
mod container_list_processes;
mod container_pause;
mod container_remove;
mod container_resize;
mod container_resume;
mod container_signal;
mod container_start;
mod container_stats;
mod container_update;
mod container_wait;
#[cfg(test)]
mod test_utils;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container as LcContainer;
use libcontainer::syscall::syscall::SyscallType;

use self::cgroup::Cgroup;
use self::console::{ConsoleListener, ConsoleSockets};
use self::executor::AgentExecutor;
use self::process::Process;
use self::stdio::{Dialer, StdioPorts};
use crate::reaper::{Reaper, Registry};
use crate::sys::{LinuxSyscall, Syscall};

pub use self::error::ContainerError;

type Result<T> = std::result::Result<T, ContainerError>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where things live and how the host is reached.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// The agent's state directory (`/run/carapace-agent` in the guest).
    pub state_dir: PathBuf,
    /// How stdio streams reach the host.
    pub dialer: Dialer,
    /// The cgroup v2 mount.
    pub cgroup_root: PathBuf,
    /// `KEY=VALUE` entries every container process gets unless its spec
    /// sets KEY (see [`crate::xstate`]).
    pub default_env: Vec<String>,
}

/// One container.
#[derive(Debug)]
pub struct Container {
    id: String,
    bundle: PathBuf,
    cgroup: Cgroup,
    /// Mounts in the agent's namespace before creation, when the spec has
    /// no mount namespace of its own (libcontainer's mounts then land in
    /// ours and are undone at removal).
    mounts_before: Option<HashSet<PathBuf>>,
    rootfs: PathBuf,
    init: Arc<Process>,
    /// Execs may skip libcontainer ([`launch::container_allows`]).
    direct_exec: bool,
    /// The init was made without libcontainer ([`launch::init_allows`]):
    /// `Inner::lc` is empty, and start, pause, resume and remove act on
    /// the init and the cgroup directly.
    direct_init: bool,
    /// The compiled `linux.seccomp` the launcher's children load.
    seccomp: Option<Arc<launch::seccomp::Filter>>,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    lc: LcContainer,
    /// A direct init until it has exec'd (or died).
    init_process: Option<launch::InitProcess>,
    started: bool,
    execs: HashMap<String, Arc<Process>>,
    /// The read end of a close-on-exec pipe whose only write end is the
    /// init's: it reads EOF once the init has exec'd the user's program
    /// (or died). StartContainer waits on it.
    exec_watch: Option<std::os::fd::OwnedFd>,
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.inner)
            .execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::ProcessNotFound { id: self.id.clone(), exec_id: exec_id.to_string() })
    }
}

/// Every container of the guest.
pub struct ContainerManager {
    config: ManagerConfig,
    /// Signals and unmounts go through it (tests record them).
    sys: Arc<dyn Syscall>,
    reaper: Arc<Reaper>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Ids being created (not in `containers` yet).
    creating: Mutex<HashSet<String>>,
    controllers: OnceLock<Vec<String>>,
    consoles: ConsoleSockets,
    /// The sandbox's containers share one PID namespace
    /// (`GuestSettings.shared_pid_namespace`): the id of the container
    /// whose namespace the others join, once there is one.
    shared_pid: Mutex<SharedPid>,
    /// The /etc/passwd files read for HOME.
    passwd: spec::PasswdCache,
    /// Namespaces made at boot for the first container (see [`spare`]).
    spares: spare::SpareNamespaces,
    /// See [`cgroup::SpareCgroup`].
    spare_cgroup: cgroup::SpareCgroup,
}

impl std::fmt::Debug for ContainerManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerManager").field("config", &self.config).field("containers", &self.containers).finish_non_exhaustive()
    }
}

/// `GuestSettings.shared_pid_namespace`, and who holds that namespace.
#[derive(Debug, Default)]
struct SharedPid {
    enabled: bool,
    holder: Option<String>,
}

/// The container ids (and exec ids) libcontainer accepts, which are also
/// safe as file names.
fn check_id(field: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 128
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::InvalidArgument(format!("{field}: {id:?} is not a valid id (1-128 of [A-Za-z0-9_+.-])")))
    }
}

/// What libcontainer changes in the agent's own process while it builds a
/// container (`oom_score_adj`, dumpable), put back afterwards.
struct SelfState {
    oom_score_adj: Option<String>,
}

impl SelfState {
    fn save(touches_oom: bool) -> Self {
        let oom_score_adj = touches_oom.then(|| std::fs::read_to_string("/proc/self/oom_score_adj").ok()).flatten();
        Self { oom_score_adj }
    }

    fn restore(self) {
        if let Some(v) = self.oom_score_adj {
            if let Err(e) = std::fs::write("/proc/self/oom_score_adj", v.trim()) {
                tracing::warn!(error = %e, "restoring the agent's oom_score_adj");
            }
        }
        // SAFETY: prctl(PR_SET_DUMPABLE, 1) only changes a flag of this
        // process.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
    }
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let bytes = serde_json::to_vec(value).map_err(|e| ContainerError::io(format!("encoding {}", path.display()), e.into()))?;
    std::fs::write(path, bytes).map_err(|e| ContainerError::io(format!("writing {}", path.display()), e))
}

impl ContainerManager {
    pub fn new(config: ManagerConfig, reaper: Arc<Reaper>) -> Self {
        Self::with_syscall(config, reaper, Arc::new(LinuxSyscall))
    }

    /// With signals and unmounts made through `sys`.
    pub fn with_syscall(config: ManagerConfig, reaper: Arc<Reaper>, sys: Arc<dyn Syscall>) -> Self {
        Self {
            sys,
            reaper,
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
            consoles: ConsoleSockets::new(&config.state_dir),
            shared_pid: Mutex::new(SharedPid::default()),
            passwd: spec::PasswdCache::default(),
            controllers: OnceLock::new(),
            spares: spare::SpareNamespaces::default(),
            spare_cgroup: cgroup::SpareCgroup::default(),
            config,
        }
    }

    /// Makes the namespaces the first container joins instead of
    /// unsharing (see [`spare`]) and the cgroup it takes when its spec
    /// names none ([`cgroup::SpareCgroup`]): in the guest, before serving.
    pub fn make_spares(&self) {
        let _span = tracing::info_span!("spares").entered();
        self.spares.make();
        if let Err(e) = self.spare_cgroup.make(self.sys.as_ref(), &self.config.cgroup_root) {
            tracing::warn!(error = %e, "making a spare cgroup");
        }
    }

    fn bundles_dir(&self) -> PathBuf {
        self.config.state_dir.join("bundles")
    }

    fn libcontainer_root(&self) -> PathBuf {
        self.config.state_dir.join("containers")
    }

    fn get(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.containers).get(id).cloned().ok_or_else(|| ContainerError::NotFound(id.to_string()))
    }

    /// The PID of a container's init, if the container exists.
    pub fn init_pid(&self, id: &str) -> Option<i32> {
        self.get(id).ok().map(|c| c.init.pid())
    }

    /// How many containers exist.
    pub fn count(&self) -> usize {
        lock(&self.containers).len() + lock(&self.creating).len()
    }

    /// Refuses resources whose cgroup controller this guest does not have
    /// (libcontainer would silently skip them).
    fn check_controllers(&self, resources: &oci_spec::runtime::LinuxResources, field: &str) -> Result<()> {
        let available = self.controllers.get_or_init(|| cgroup::root_controllers(&self.config.cgroup_root));
        for needed in spec::needed_controllers(resources) {
            if !available.iter().any(|c| c == needed) {
                return Err(ContainerError::FailedPrecondition(format!(
                    "{field}: needs the cgroup v2 {needed} controller, which this kernel does not offer \
                     (available: {available:?})"
                )));
            }
        }
        Ok(())
    }

    /// libcgroups' manager of the cgroup at `dir` (under the cgroup root).
    fn cgroup_manager(&self, id: &str, dir: &Path) -> Result<libcgroups::common::AnyCgroupManager> {
        let cgroup_path = Path::new("/").join(dir.strip_prefix(&self.config.cgroup_root).unwrap_or(dir));
        libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
            cgroup_path,
            systemd_cgroup: false,
            container_name: id.to_string(),
        })
        .map_err(|e| ContainerError::FailedPrecondition(format!("cgroup: {e}")))
    }

    /// Pause or resume of a container made without libcontainer, as
    /// libcontainer's: the init must be running, not stopped.
    fn freeze(&self, c: &Container, state: libcgroups::common::FreezerState) -> Result<()> {
        use libcgroups::common::CgroupManager;
        if c.init.has_exited() {
            return Err(ContainerError::FailedPrecondition(format!("container {:?} has stopped", c.id)));
        }
        let step = if state == libcgroups::common::FreezerState::Frozen { "pausing" } else { "resuming" };
        self.cgroup_manager(&c.id, c.cgroup.dir())?.freeze(state).map_err(ContainerError::libcgroups(step))
    }

    /// `resources` written into `cgroup` by libcgroups (through
    /// `manager`), with the agent's corrections ([`Cgroup::fix_libcgroups`]);
    /// errors name `step` and `field`. Shared by CreateContainer and
    /// UpdateContainer.
    fn apply_resources(
        &self,
        manager: &libcgroups::common::AnyCgroupManager,
        cgroup: &Cgroup,
        resources: &oci_spec::runtime::LinuxResources,
        step: &'static str,
        field: &str,
    ) -> Result<()> {
        use libcgroups::common::CgroupManager;
        let prepared = spec::resources_for_libcgroups(resources);
        let opt =
            libcgroups::common::ControllerOpt { resources: &prepared, disable_oom_killer: false, oom_score_adj: None, freezer_state: None };
        manager.apply(&opt).map_err(ContainerError::libcgroups(step))?;
        cgroup.fix_libcgroups(resources).map_err(|e| ContainerError::io(field, e))
    }

    /// A new process's stdio (the host ports dialled) and, with a
    /// terminal, its console socket; and a builder for container `id` wired
    /// to both. Shared by CreateContainer and ExecProcess.
    fn io_builder(
        &self,
        id: &str,
        ports: StdioPorts,
        terminal: bool,
    ) -> Result<(stdio::PendingIo, Option<ConsoleListener>, ContainerBuilder)> {
        let (pending, child) = {
            let _span = tracing::debug_span!("stdio").entered();
            stdio::prepare(&self.config.dialer, ports, terminal)?
        };
        let console = if terminal { Some(self.consoles.bind()?) } else { None };
        let mut builder = self.builder(id)?;
        if let Some(child) = child {
            builder = builder.with_stdin(child.stdin).with_stdout(child.stdout).with_stderr(child.stderr);
        }
        if let Some(console) = &console {
            builder = builder.with_console_socket(Some(console.path().to_path_buf()));
        }
        Ok((pending, console, builder))
    }

    fn builder(&self, id: &str) -> Result<ContainerBuilder> {
        let root = self.libcontainer_root();
        std::fs::create_dir_all(&root).map_err(|e| ContainerError::io(format!("creating {}", root.display()), e))?;
        ContainerBuilder::new(id.to_string(), SyscallType::default())
            .with_root_path(root)
            .map(|b| b.with_executor(AgentExecutor))
            .map_err(|e| ContainerError::libcontainer("state directory", &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        for good in ["c1", "a.b-c_d+e", &"x".repeat(128)] {
            check_id("container_id", good).expect(good);
        }
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(129)] {
            let err = check_id("container_id", bad).expect_err(bad);
            assert!(err.to_string().contains("container_id"), "{err}");
        }
    }
}
