//! Containers inside the guest: created, started, exec'd into, signalled,
//! waited for and removed with youki's libcontainer (cgroup v2, seccomp
//! through libseccomp).
//!
//! - [`spec`]: validation that names the field at fault, and the changes
//!   made before libcontainer sees a spec;
//! - [`stdio`]: each process's stdin/stdout/stderr over streams to the host;
//! - [`process`]: a process's exit status (from the agent's reaper) and the
//!   wait for it;
//! - [`cgroup`]: statistics, OOM kills and processes from cgroup v2 files;
//! - [`executor`]: the exec at the end of libcontainer's init.
//!
//! libcontainer forks: the agent's process clones an intermediate process,
//! which clones the container's init as the agent's child (`CLONE_PARENT`)
//! and exits; libcontainer then `waitpid`s the intermediate itself. Every
//! libcontainer call that forks or waits is therefore made with the
//! reaper's registry held ([`crate::reaper::Reaper::registry`]): the reaper
//! does not reap meanwhile, and the new process's waiter is registered
//! before any status can be dispatched. The same lock serializes those
//! calls, which matters because libcontainer changes the process's working
//! directory and `oom_score_adj` while it builds a container.
//!
//! State on disk, under the agent's state directory: `bundles/<id>/`
//! (config.json as libcontainer reads it, exec process files),
//! `containers/<id>/` (libcontainer's state) and `tty/<n>.sock` (console
//! sockets, [`console`]: short paths whatever the ids).

pub mod cgroup;
pub mod console;
pub mod executor;
pub mod mountinfo;
pub mod namespaces;
pub mod process;
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
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container as LcContainer;
use libcontainer::syscall::syscall::SyscallType;
use ttrpc::Code;

use self::cgroup::Cgroup;
use self::console::{ConsoleListener, ConsoleSockets};
use self::executor::AgentExecutor;
use self::process::Process;
use self::spec::SpecError;
use self::stdio::{Dialer, StdioError, StdioPorts};
use crate::reaper::{Reaper, Registry};
use crate::sys::{LinuxSyscall, Syscall};

/// Why a container call failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("invalid argument: {0}")]
    InvalidSpec(SpecError),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("container {0:?} not found")]
    NotFound(String),
    #[error("process {exec_id:?} of container {id:?} not found")]
    ProcessNotFound { id: String, exec_id: String },
    #[error("process {exec_id:?} of container {id:?} has already exited")]
    ProcessExited { id: String, exec_id: String },
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("stdio: {0}")]
    Stdio(StdioError),
    /// libcontainer failed; `invalid` when it judged the input.
    #[error("{step}: {message}")]
    Libcontainer {
        step: &'static str,
        message: String,
        invalid: bool,
    },
    #[error("{what}: {cause}")]
    Io {
        what: String,
        cause: io::Error,
    },
}

impl ContainerError {
    /// The ttrpc status code the host sees.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidSpec(_) | Self::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Self::NotFound(_) | Self::ProcessNotFound { .. } | Self::ProcessExited { .. } => Code::NOT_FOUND,
            Self::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Self::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Self::Libcontainer { invalid: true, .. } => Code::INVALID_ARGUMENT,
            Self::Stdio(_) | Self::Libcontainer { .. } | Self::Io { .. } => Code::INTERNAL,
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            cause: source,
        }
    }

    fn libcontainer(step: &'static str, err: &libcontainer::error::LibcontainerError) -> Self {
        use libcontainer::error::{ErrInvalidID, ErrInvalidSpec, LibcontainerError, MissingSpecError};
        let mut message = err.to_string();
        let mut invalid = false;
        let mut wrong_state = matches!(err, LibcontainerError::IncorrectStatus(_));
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
        let mut first = true;
        while let Some(e) = source {
            if e.is::<ErrInvalidSpec>() || e.is::<MissingSpecError>() || e.is::<ErrInvalidID>() {
                invalid = true;
            }
            // `#[error(transparent)]` variants hide their inner error from
            // the source chain: look at the variant itself.
            match e.downcast_ref::<LibcontainerError>() {
                Some(
                    LibcontainerError::InvalidSpec(_)
                    | LibcontainerError::MissingSpec(_)
                    | LibcontainerError::InvalidID(_)
                    | LibcontainerError::InvalidInput(_),
                ) => invalid = true,
                Some(LibcontainerError::IncorrectStatus(_)) => wrong_state = true,
                _ => {}
            }
            if !first {
                let text = e.to_string();
                if !message.contains(&text) {
                    message.push_str(": ");
                    message.push_str(&text);
                }
            }
            first = false;
            source = e.source();
        }
        if wrong_state {
            return Self::FailedPrecondition(format!("{step}: {message}"));
        }
        Self::Libcontainer {
            step,
            message,
            invalid,
        }
    }
}

// By hand, not `#[from]` (which would also make the inner error the
// source): the message already prints it, and a cause is printed once.
impl From<SpecError> for ContainerError {
    fn from(e: SpecError) -> Self {
        Self::InvalidSpec(e)
    }
}

impl From<StdioError> for ContainerError {
    fn from(e: StdioError) -> Self {
        Self::Stdio(e)
    }
}

impl From<ContainerError> for ttrpc::Error {
    fn from(e: ContainerError) -> Self {
        carapace_protocol::rpc_error(e.code(), e.to_string())
    }
}

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
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    lc: LcContainer,
    started: bool,
    execs: HashMap<String, Arc<Process>>,
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
            .ok_or_else(|| ContainerError::ProcessNotFound {
                id: self.id.clone(),
                exec_id: exec_id.to_string(),
            })
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
}

impl std::fmt::Debug for ContainerManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerManager")
            .field("config", &self.config)
            .field("containers", &self.containers)
            .finish_non_exhaustive()
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
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::InvalidArgument(format!(
            "{field}: {id:?} is not a valid id (1-128 of [A-Za-z0-9_+.-])"
        )))
    }
}

/// What libcontainer changes in the agent's own process while it builds a
/// container (`oom_score_adj`, dumpable), put back afterwards.
struct SelfState {
    oom_score_adj: Option<String>,
}

impl SelfState {
    fn save(touches_oom: bool) -> Self {
        let oom_score_adj = touches_oom
            .then(|| std::fs::read_to_string("/proc/self/oom_score_adj").ok())
            .flatten();
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
    let bytes = serde_json::to_vec(value)
        .map_err(|e| ContainerError::io(format!("encoding {}", path.display()), e.into()))?;
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
            controllers: OnceLock::new(),
            config,
        }
    }

    fn bundles_dir(&self) -> PathBuf {
        self.config.state_dir.join("bundles")
    }

    fn libcontainer_root(&self) -> PathBuf {
        self.config.state_dir.join("containers")
    }

    fn get(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))
    }

    /// How many containers exist.
    pub fn count(&self) -> usize {
        lock(&self.containers).len() + lock(&self.creating).len()
    }

    /// Refuses resources whose cgroup controller this guest does not have
    /// (libcontainer would silently skip them).
    fn check_controllers(&self, resources: &oci_spec::runtime::LinuxResources, field: &str) -> Result<()> {
        let available = self
            .controllers
            .get_or_init(|| cgroup::root_controllers(&self.config.cgroup_root));
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

    fn builder(&self, id: &str) -> Result<ContainerBuilder> {
        let root = self.libcontainer_root();
        std::fs::create_dir_all(&root)
            .map_err(|e| ContainerError::io(format!("creating {}", root.display()), e))?;
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
    fn errors_map_to_status_codes() {
        let cases: Vec<(ContainerError, Code)> = vec![
            (SpecError::new("process.cwd", "relative").into(), Code::INVALID_ARGUMENT),
            (ContainerError::NotFound("c".into()), Code::NOT_FOUND),
            (
                ContainerError::ProcessExited { id: "c".into(), exec_id: "e".into() },
                Code::NOT_FOUND,
            ),
            (ContainerError::AlreadyExists("c".into()), Code::ALREADY_EXISTS),
            (ContainerError::FailedPrecondition("x".into()), Code::FAILED_PRECONDITION),
            (
                ContainerError::Libcontainer { step: "s", message: "m".into(), invalid: true },
                Code::INVALID_ARGUMENT,
            ),
            (
                ContainerError::Libcontainer { step: "s", message: "m".into(), invalid: false },
                Code::INTERNAL,
            ),
        ];
        for (err, code) in cases {
            let message = err.to_string();
            let status: ttrpc::Error = err.into();
            assert_eq!(carapace_protocol::rpc_code(&status), Some(code), "{message}");
        }
        let invalid = ContainerError::from(SpecError::new("linux.namespaces[1].type", "unknown"));
        assert!(invalid.to_string().contains("linux.namespaces[1].type"));
    }

    /// The whole chain as `{:#}`-style printers show it.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut out = e.to_string();
        let mut next = e.source();
        while let Some(cause) = next {
            out.push_str(": ");
            out.push_str(&cause.to_string());
            next = cause.source();
        }
        out
    }

    #[test]
    fn a_cause_is_printed_once() {
        let cases = [
            ContainerError::io("binding x", io::Error::other("boom")),
            ContainerError::from(StdioError::DevNull(io::Error::other("boom"))),
            ContainerError::from(SpecError::new("process.args", "boom")),
        ];
        for e in cases {
            assert_eq!(chain(&e).matches("boom").count(), 1, "{}", chain(&e));
        }
    }

    #[test]
    fn libcontainer_errors_are_classified() {
        use libcontainer::error::{ErrInvalidSpec, LibcontainerError};
        let e = ContainerError::libcontainer("creating", &LibcontainerError::InvalidSpec(ErrInvalidSpec::UnsupportedVersion));
        assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{e}");
        let e = ContainerError::libcontainer(
            "pausing",
            &LibcontainerError::IncorrectStatus(libcontainer::container::ContainerStatus::Stopped),
        );
        assert_eq!(e.code(), Code::FAILED_PRECONDITION, "{e}");
        let e = ContainerError::libcontainer("creating", &LibcontainerError::Other("boom".into()));
        assert_eq!(e.code(), Code::INTERNAL, "{e}");
    }

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

