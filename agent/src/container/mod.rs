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
pub mod namespaces;
pub mod executor;
pub mod process;
pub mod spec;
pub mod stdio;

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use carapace_protocol::agent;
use libcgroups::common::CgroupManager;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container as LcContainer;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use ttrpc::Code;

use self::cgroup::Cgroup;
use self::console::{ConsoleListener, ConsoleSockets};
use self::executor::AgentExecutor;
use self::process::Process;
use self::spec::SpecError;
use self::stdio::{Dialer, StdioError, StdioPorts};
use crate::reaper::{Reaper, Registry};

/// How long RemoveContainer waits for killed processes to go.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

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
#[derive(Debug)]
pub struct ContainerManager {
    config: ManagerConfig,
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

/// `GuestSettings.shared_pid_namespace`, and who holds that namespace.
#[derive(Debug, Default)]
struct SharedPid {
    enabled: bool,
    holder: Option<String>,
}

/// Frees a reserved id when creation ends, whichever way.
struct Reservation<'a> {
    manager: &'a ContainerManager,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(&self.manager.creating).remove(&self.id);
    }
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

/// The mount points of this mount namespace.
fn mount_points() -> HashSet<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| {
            text.lines()
                .filter_map(|l| l.split(' ').nth(4))
                .map(|p| PathBuf::from(unescape_mountinfo(p)))
                .collect()
        })
        .unwrap_or_default()
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Unmounts (lazily, deepest first) what is mounted under `rootfs` now and
/// was not in `before`.
fn unmount_new_under(rootfs: &Path, before: &HashSet<PathBuf>) {
    let mut new: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|p| p.starts_with(rootfs) && !before.contains(p))
        .collect();
    new.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in new {
        if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(path = %p.display(), error = %e, "unmounting a container mount");
        }
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
        Self {
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

    /// From now on the containers share one PID namespace: the first
    /// created with a PID namespace of its own keeps it, and later ones
    /// that ask for their own join it instead (unless CreateContainer's
    /// `join_namespaces` names another).
    pub fn share_pid_namespace(&self) {
        lock(&self.shared_pid).enabled = true;
    }

    /// The namespaces a new container enters: `join_namespaces`, and the
    /// shared PID namespace (see [`Self::share_pid_namespace`]). Also
    /// whether the new container becomes the holder of the shared one.
    fn namespace_joins(
        &self,
        req: &agent::CreateContainerRequest,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<(Vec<namespaces::Join>, bool)> {
        let lookup = |id: &str| {
            self.get(id).ok().map(|c| namespaces::JoinTarget {
                pid: c.init.pid(),
                exited: c.init.has_exited(),
            })
        };
        let mut joins = namespaces::resolve(&req.join_namespaces, Path::new("/proc"), lookup)?;
        let shared = lock(&self.shared_pid);
        let mut holds = false;
        let explicit = joins.iter().any(|j| j.typ == oci_spec::runtime::LinuxNamespaceType::Pid);
        if shared.enabled && !explicit && namespaces::wants_new_pid_namespace(spec) {
            match shared.holder.as_deref().and_then(|h| lookup(h).filter(|t| !t.exited)) {
                Some(target) => joins.push(namespaces::Join {
                    typ: oci_spec::runtime::LinuxNamespaceType::Pid,
                    path: PathBuf::from(format!("/proc/{}/ns/pid", target.pid)),
                }),
                None => holds = true,
            }
        }
        Ok((joins, holds))
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

    /// CreateContainer.
    pub fn create(&self, req: &agent::CreateContainerRequest) -> Result<u32> {
        let id = req.container_id.as_str();
        check_id("container_id", id)?;
        let _span = tracing::info_span!("create_container", id).entered();
        {
            let containers = lock(&self.containers);
            let mut creating = lock(&self.creating);
            if containers.contains_key(id) || !creating.insert(id.to_string()) {
                return Err(ContainerError::AlreadyExists(format!("container {id:?}")));
            }
        }
        let _reservation = Reservation {
            manager: self,
            id: id.to_string(),
        };

        let (mut spec, rootfs) = spec::parse_spec(&req.oci_spec_json, &req.rootfs_path)?;
        let (joins, holds_shared_pid) = self.namespace_joins(req, &spec)?;
        namespaces::apply(&mut spec, &joins)?;
        let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
        if let Some(resources) = &resources {
            self.check_controllers(resources, "linux.resources")?;
        }
        spec::prepare_for_libcontainer(&mut spec, id, &rootfs, &self.config.default_env);
        let cgroup = Cgroup::new(&self.config.cgroup_root, &spec::cgroup_path(&spec, id));
        if cgroup.exists() {
            return Err(ContainerError::FailedPrecondition(format!(
                "linux.cgroupsPath: the cgroup {} already exists",
                cgroup.dir().display()
            )));
        }
        let bundle = self.bundles_dir().join(id);
        if self.libcontainer_root().join(id).exists() || bundle.exists() {
            return Err(ContainerError::AlreadyExists(format!(
                "state of container {id:?} (left by an earlier container)"
            )));
        }
        let mounts_before = (!spec::has_mount_namespace(&spec)).then(mount_points);

        let cleanup = |mounts_before: &Option<HashSet<PathBuf>>| {
            if let Some(before) = mounts_before {
                unmount_new_under(&rootfs, before);
            }
            if let Err(e) = cgroup.remove() {
                tracing::warn!(error = %e, "removing the cgroup of a failed container");
            }
            let _ = std::fs::remove_dir_all(self.libcontainer_root().join(id));
            let _ = std::fs::remove_dir_all(&bundle);
        };
        let result = self.create_in(id, &spec, resources.as_ref(), &rootfs, &bundle, &cgroup, mounts_before.clone(), req);
        match result {
            Ok(container) => {
                let pid = container.init.pid();
                lock(&self.containers).insert(id.to_string(), Arc::new(container));
                if holds_shared_pid {
                    lock(&self.shared_pid).holder = Some(id.to_string());
                }
                tracing::info!(pid, "container created");
                u32::try_from(pid).map_err(|_| ContainerError::InvalidArgument("pid".into()))
            }
            Err(e) => {
                tracing::warn!(error = %e, "creating the container failed; cleaning up");
                cleanup(&mounts_before);
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create_in(
        &self,
        id: &str,
        spec: &oci_spec::runtime::Spec,
        resources: Option<&oci_spec::runtime::LinuxResources>,
        rootfs: &Path,
        bundle: &Path,
        cgroup: &Cgroup,
        mounts_before: Option<HashSet<PathBuf>>,
        req: &agent::CreateContainerRequest,
    ) -> Result<Container> {
        std::fs::create_dir_all(bundle)
            .map_err(|e| ContainerError::io(format!("creating {}", bundle.display()), e))?;
        write_json(&bundle.join("config.json"), spec)?;

        let process = spec.process().as_ref();
        let terminal = process.and_then(|p| p.terminal()).unwrap_or(false);
        let console_size = process.and_then(|p| p.console_size()).map(|b| (b.height(), b.width()));
        let ports = req.stdio.as_ref().map(StdioPorts::from).unwrap_or_default();
        let (pending, child) = {
            let _span = tracing::debug_span!("stdio").entered();
            stdio::prepare(&self.config.dialer, ports, terminal)?
        };
        let console = if terminal {
            Some(self.consoles.bind()?)
        } else {
            None
        };

        let mut builder = self.builder(id)?;
        if let Some(child) = child {
            builder = builder
                .with_stdin(child.stdin)
                .with_stdout(child.stdout)
                .with_stderr(child.stderr);
        }
        if let Some(console) = &console {
            builder = builder.with_console_socket(Some(console.path().to_path_buf()));
        }
        let init_builder = builder
            .as_init(bundle)
            .with_systemd(false)
            .with_detach(true);

        let saved = SelfState::save(process.and_then(|p| p.oom_score_adj()).is_some());
        let mut registry = self.reaper.registry();
        let built = {
            let _span = tracing::debug_span!("libcontainer_build").entered();
            init_builder.build()
        };
        saved.restore();
        let lc = built.map_err(|e| ContainerError::libcontainer("creating the container", &e))?;
        if let Some(resources) = resources {
            if let Err(e) = cgroup.fix_libcgroups(resources) {
                if let Some(pid) = lc.pid() {
                    let _ = kill(Pid::from_raw(pid.as_raw()), Signal::SIGKILL);
                }
                return Err(ContainerError::io("linux.resources", e));
            }
        }
        let pid = lc
            .pid()
            .map(|p| p.as_raw())
            .ok_or_else(|| ContainerError::FailedPrecondition("libcontainer reported no init pid".into()))?;
        let started = self.start_process_io(&mut registry, pid, pending, console.as_ref(), console_size, id, cgroup);
        drop(registry);
        let init = match started {
            Ok(init) => init,
            Err(e) => {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(e);
            }
        };
        Ok(Container {
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
            cgroup: cgroup.clone(),
            mounts_before,
            rootfs: rootfs.to_path_buf(),
            init,
            inner: Mutex::new(Inner {
                lc,
                started: false,
                execs: HashMap::new(),
            }),
        })
    }

    /// With the registry held: receives the pty master (terminal), starts
    /// the copiers and registers the exit waiter of `pid`.
    #[allow(clippy::too_many_arguments)]
    fn start_process_io(
        &self,
        registry: &mut Registry,
        pid: i32,
        pending: stdio::PendingIo,
        console: Option<&ConsoleListener>,
        console_size: Option<(u64, u64)>,
        name: &str,
        cgroup: &Cgroup,
    ) -> Result<Arc<Process>> {
        let master = match console {
            Some(console) => {
                let master = console.receive_master()?;
                if let Some((rows, cols)) = console_size {
                    stdio::set_winsize(
                        master.as_fd(),
                        u16::try_from(rows).unwrap_or(u16::MAX),
                        u16::try_from(cols).unwrap_or(u16::MAX),
                    )?;
                }
                Some(master)
            }
            None => None,
        };
        let io = pending.start(name, master)?;
        let process = Arc::new(Process::new(pid, io, cgroup.oom_kills()));
        let waiter = process.clone();
        registry.on_exit(pid, Box::new(move |exit| waiter.record_exit(exit)));
        Ok(process)
    }

    /// StartContainer.
    pub fn start(&self, id: &str) -> Result<u32> {
        let c = self.get(id)?;
        let _span = tracing::info_span!("start_container", id).entered();
        let mut inner = lock(&c.inner);
        if inner.started {
            return Err(ContainerError::FailedPrecondition(format!("container {id:?} is already started")));
        }
        if c.init.has_exited() {
            return Err(ContainerError::FailedPrecondition(format!("container {id:?} has stopped")));
        }
        c.init.set_oom_baseline(c.cgroup.oom_kills());
        {
            let _registry = self.reaper.registry();
            inner
                .lc
                .start()
                .map_err(|e| ContainerError::libcontainer("starting the container", &e))?;
        }
        inner.started = true;
        drop(inner);
        let pid = u32::try_from(c.init.pid()).map_err(|_| ContainerError::InvalidArgument("pid".into()))?;
        wait_for_exec(pid, || c.init.has_exited());
        Ok(pid)
    }

    /// ExecProcess.
    pub fn exec(&self, req: &agent::ExecProcessRequest) -> Result<u32> {
        let id = req.container_id.as_str();
        let exec_id = req.exec_id.as_str();
        check_id("exec_id", exec_id)?;
        let c = self.get(id)?;
        let _span = tracing::info_span!("exec_process", id, exec_id).entered();
        let mut process = spec::parse_process(&req.process_json)?;
        process.set_terminal(Some(req.terminal));
        spec::normalize_process(&mut process);
        spec::ensure_home(&mut process, &c.rootfs);
        spec::add_default_env(&mut process, &self.config.default_env);
        let console_size = process.console_size().map(|b| (b.height(), b.width()));

        let mut inner = lock(&c.inner);
        if !inner.started || c.init.has_exited() {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id:?} is not running"
            )));
        }
        if inner.execs.contains_key(exec_id) {
            return Err(ContainerError::AlreadyExists(format!("process {exec_id:?} in container {id:?}")));
        }
        let process_file = c.bundle.join(format!("exec-{exec_id}.json"));
        write_json(&process_file, &process)?;
        let ports = req.stdio.as_ref().map(StdioPorts::from).unwrap_or_default();
        let result = (|| {
            let (pending, child) = stdio::prepare(&self.config.dialer, ports, req.terminal)?;
            let console = if req.terminal {
                Some(self.consoles.bind()?)
            } else {
                None
            };
            let mut builder = self.builder(id)?;
            if let Some(child) = child {
                builder = builder
                    .with_stdin(child.stdin)
                    .with_stdout(child.stdout)
                    .with_stderr(child.stderr);
            }
            if let Some(console) = &console {
                builder = builder.with_console_socket(Some(console.path().to_path_buf()));
            }
            let tenant = builder
                .as_tenant()
                .with_process(Some(process_file.clone()))
                .with_detach(true);
            let saved = SelfState::save(process.oom_score_adj().is_some());
            let mut registry = self.reaper.registry();
            let built = {
                let _span = tracing::debug_span!("libcontainer_exec").entered();
                tenant.build()
            };
            saved.restore();
            let pid = built
                .map_err(|e| ContainerError::libcontainer("executing the process", &e))?
                .as_raw();
            let name = format!("{id}/{exec_id}");
            let started = self.start_process_io(&mut registry, pid, pending, console.as_ref(), console_size, &name, &c.cgroup);
            if started.is_err() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            started
        })();
        let _ = std::fs::remove_file(&process_file);
        let process = result?;
        let pid = process.pid();
        inner.execs.insert(exec_id.to_string(), process);
        tracing::info!(pid, "process started");
        u32::try_from(pid).map_err(|_| ContainerError::InvalidArgument("pid".into()))
    }

    /// SignalProcess.
    pub fn signal(&self, req: &agent::SignalProcessRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        let signal = i32::try_from(req.signal)
            .ok()
            .and_then(|n| Signal::try_from(n).ok())
            .ok_or_else(|| ContainerError::InvalidArgument(format!("signal: {} is not a signal", req.signal)))?;
        let _span = tracing::debug_span!("signal_process", id = %req.container_id, exec_id = %req.exec_id, %signal).entered();
        if req.all {
            return self.signal_all(&c, signal);
        }
        let process = c.process(&req.exec_id)?;
        if process.has_exited() {
            return Err(ContainerError::ProcessExited {
                id: c.id.clone(),
                exec_id: req.exec_id.clone(),
            });
        }
        match kill(Pid::from_raw(process.pid()), signal) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(e) => Err(ContainerError::io("kill", e.into())),
        }
    }

    fn signal_all(&self, c: &Container, signal: Signal) -> Result<()> {
        let pids = c
            .cgroup
            .pids()
            .map_err(|e| ContainerError::io(format!("reading {}", c.cgroup.dir().display()), e))?;
        for pid in pids {
            let Ok(pid) = i32::try_from(pid) else { continue };
            match kill(Pid::from_raw(pid), signal) {
                Ok(()) | Err(nix::Error::ESRCH) => {}
                Err(e) => return Err(ContainerError::io(format!("kill {pid}"), e.into())),
            }
        }
        Ok(())
    }

    /// WaitProcess: blocks until the process has exited and its output has
    /// been drained to the host.
    pub fn wait(&self, req: &agent::WaitProcessRequest) -> Result<agent::WaitProcessResponse> {
        let c = self.get(&req.container_id)?;
        let process = c.process(&req.exec_id)?;
        let record = process.wait();
        let oom = process.oom_killed(|| c.cgroup.oom_kills());
        let mut resp = agent::WaitProcessResponse::new();
        resp.exit_code = record.exit.exit_code();
        resp.signal = record.exit.signal();
        resp.oom_killed = oom;
        resp.exited_at_unix_nano = record.at_unix_nano;
        resp.pid = u32::try_from(record.exit.pid).unwrap_or(0);
        Ok(resp)
    }

    /// ResizeTty.
    pub fn resize(&self, req: &agent::ResizeTtyRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        let process = c.process(&req.exec_id)?;
        let rows = u16::try_from(req.rows).map_err(|_| ContainerError::InvalidArgument("rows: too large".into()))?;
        let cols = u16::try_from(req.cols).map_err(|_| ContainerError::InvalidArgument("cols: too large".into()))?;
        if process.io().resize(rows, cols)? {
            Ok(())
        } else {
            Err(ContainerError::FailedPrecondition(format!(
                "process {:?} of container {:?} has no terminal",
                req.exec_id, req.container_id
            )))
        }
    }

    /// CloseStdin.
    pub fn close_stdin(&self, req: &agent::CloseStdinRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        c.process(&req.exec_id)?.io().close_stdin();
        Ok(())
    }

    /// StatsContainer.
    pub fn stats(&self, id: &str) -> Result<agent::StatsContainerResponse> {
        let c = self.get(id)?;
        let mut resp = agent::StatsContainerResponse::new();
        resp.cgroup = Some(c.cgroup.stats()).into();
        resp.timestamp_unix_nano = process::now_unix_nano();
        Ok(resp)
    }

    /// ListProcesses.
    pub fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let c = self.get(id)?;
        c.cgroup
            .pids()
            .map_err(|e| ContainerError::io(format!("reading {}", c.cgroup.dir().display()), e))
    }

    /// UpdateContainer.
    pub fn update(&self, req: &agent::UpdateContainerRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        let resources = spec::parse_resources(&req.resources_json)?;
        self.check_controllers(&resources, "resources_json")?;
        let cgroup_path = Path::new("/").join(
            c.cgroup
                .dir()
                .strip_prefix(&self.config.cgroup_root)
                .unwrap_or(c.cgroup.dir()),
        );
        let manager = libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
            cgroup_path,
            systemd_cgroup: false,
            container_name: c.id.clone(),
        })
        .map_err(|e| ContainerError::FailedPrecondition(format!("cgroup: {e}")))?;
        manager
            .apply(&libcgroups::common::ControllerOpt {
                resources: &spec::resources_for_libcgroups(&resources),
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| ContainerError::Libcontainer {
                step: "updating resources",
                message: e.to_string(),
                invalid: false,
            })?;
        c.cgroup
            .fix_libcgroups(&resources)
            .map_err(|e| ContainerError::io("resources_json", e))
    }

    /// PauseContainer.
    pub fn pause(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let mut inner = lock(&c.inner);
        inner
            .lc
            .pause()
            .map_err(|e| ContainerError::libcontainer("pausing", &e))
    }

    /// ResumeContainer.
    pub fn resume(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let mut inner = lock(&c.inner);
        inner
            .lc
            .resume()
            .map_err(|e| ContainerError::libcontainer("resuming", &e))
    }

    /// RemoveContainer.
    pub fn remove(&self, id: &str, force: bool) -> Result<()> {
        let c = self.get(id)?;
        let _span = tracing::info_span!("remove_container", id, force).entered();
        let mut inner = lock(&c.inner);
        if inner.started && !c.init.has_exited() && !force {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id:?} is running; stop it first or remove with force"
            )));
        }
        // Whatever still runs goes: the init (and with it a PID namespace),
        // then anything left in the cgroup (exec'd processes without one).
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            let mut left = c.cgroup.pids().unwrap_or_default();
            if !c.init.has_exited() {
                left.push(u32::try_from(c.init.pid()).unwrap_or(0));
            }
            left.retain(|&p| p != 0);
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ContainerError::FailedPrecondition(format!(
                    "container {id:?}: processes {left:?} did not die within {KILL_TIMEOUT:?}"
                )));
            }
            // Frozen processes die of SIGKILL too (cgroup v2).
            for pid in left {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        {
            let _registry = self.reaper.registry();
            if let Err(e) = inner.lc.delete(true) {
                tracing::warn!(error = %e, "libcontainer delete; cleaning up by hand");
            }
        }
        if let Some(before) = &c.mounts_before {
            unmount_new_under(&c.rootfs, before);
        }
        let mut problems = Vec::new();
        if let Err(e) = c.cgroup.remove() {
            problems.push(format!("removing {}: {e}", c.cgroup.dir().display()));
        }
        for dir in [self.libcontainer_root().join(id), c.bundle.clone()] {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => problems.push(format!("removing {}: {e}", dir.display())),
            }
        }
        inner.execs.clear();
        drop(inner);
        lock(&self.containers).remove(id);
        if problems.is_empty() {
            tracing::info!("container removed");
            Ok(())
        } else {
            Err(ContainerError::io(
                "removing the container",
                io::Error::other(problems.join("; ")),
            ))
        }
    }
}

/// How long StartContainer waits for the init to run its startContainer
/// hooks and exec the user's program.
const EXEC_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Waits until process `pid` runs another program than this one (the
/// container's init has run the startContainer hooks and exec'd the user
/// process), or it exited, or [`EXEC_WAIT`] passed. StartContainer returns
/// only then, so that the runtime's poststart hooks come after the process
/// started, as the OCI spec orders them.
fn wait_for_exec(pid: u32, exited: impl Fn() -> bool) {
    use std::os::unix::fs::MetadataExt;
    let ours = std::fs::metadata("/proc/self/exe").map(|m| (m.dev(), m.ino())).ok();
    let start = std::time::Instant::now();
    while start.elapsed() < EXEC_WAIT && !exited() {
        match std::fs::metadata(format!("/proc/{pid}/exe")).map(|m| (m.dev(), m.ino())) {
            Ok(exe) if Some(exe) != ours => return,
            Ok(_) => {}
            // Gone, or not readable any more: nothing left to wait for.
            Err(_) => return,
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
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

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b\\011c"), "/a b\tc");
    }
}

