//! Container processes without forking the agent: an exec'd process
//! (ExecProcess) and a container's init (CreateContainer).
//!
//! libcontainer starts either by forking the agent twice (its
//! intermediate and init processes). On a kvm_pvm host every page-table
//! entry the kernel copies for those forks, every copy-on-write fault
//! after them and the unmapping at exec is emulated: forking the
//! 15-thread agent was most of an exec's guest time and a third of a
//! create's (bench/lifecycle.py).
//!
//! Here the process is started as posix_spawn starts one: children that
//! share the agent's memory (`CLONE_VM`) and so copy no page table. The
//! first child ("outer", `CLONE_VFORK`: the calling thread waits for it)
//! writes the process's `oom_score_adj`, joins the container's namespaces
//! (an exec: all of the init's at once, through a pidfd; an init also
//! makes its new ones); a PID namespace only applies to children, so it
//! clones the second (made the agent's child with `CLONE_PARENT`, which
//! the reaper then waits for).
//!
//! - An exec'd process ("inner", `CLONE_VFORK` again, so the agent's
//!   thread waits until it execs) is born in the container's cgroup
//!   (clone3 `CLONE_INTO_CGROUP`), joins the cgroup namespace and then
//!   does what libcontainer's init does for an exec,
//!   in its order: a new session, stdio, rlimits, no_new_privs, umask,
//!   cwd, groups and ids, close-on-exec of every other descriptor,
//!   capabilities, the signal mask, the program lookup (as
//!   [`super::executor::find_program`] does) and `execve`.
//! - A container's init runs on beside the agent until StartContainer:
//!   born in its cgroup when that exists already (the spare one, see
//!   `cgroup.rs`), else put there by the agent (libcgroups, as libcontainer
//!   does), and once told so, it enters or makes its cgroup namespace,
//!   builds the container's filesystem (`rootfs.rs`), does the process
//!   steps above, finds the program, tells the agent it is ready, and execs
//!   when told to. Its memory (the agent's) is kept until it has exec'd or
//!   died ([`InitProcess`]).
//!
//! Everything the children use is prepared here first (C strings, pointer
//! arrays, descriptors, capability masks): sharing the agent's memory with
//! its other threads running, they must not allocate (a malloc lock may be
//! held by a thread that is not there for them), and they make their
//! system calls without glibc (`raw.rs`): its wrappers write `errno` in the
//! cloning thread's storage, and act on "all threads of the process"
//! (set*id) that the children do not own. A child that fails writes the
//! step and errno into [`Report`] (shared memory) and exits; the agent
//! turns it into the error.
//!
//! With a terminal, the outer child of an exec opens the pty master in
//! the container's devpts (its `/dev/ptmx`, as libcontainer's init does)
//! into the agent's descriptor table (it shares it: `CLONE_FILES`), and
//! the inner one opens the slave from it (`TIOCGPTPEER`: no path lookup)
//! as its controlling terminal and stdio.
//!
//! Only what this covers goes this way; anything else goes through
//! libcontainer as before (see [`container_allows`], [`init_allows`],
//! [`Launch::prepare`] and `RootfsPlan::prepare`): a seccomp profile
//! with a notify action (the filter is otherwise compiled by the agent
//! and loaded by the child, `seccomp.rs`), a user or time namespace (setns
//! of those needs a process that shares no memory), AppArmor, SELinux,
//! I/O priority, scheduler, CPU affinity, personality, memory policy; for
//! an init also a terminal, hooks, and mounts it does not resolve the way
//! libcontainer does.

use std::ffi::{c_int, c_void, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

use libcontainer::capabilities::CapabilityExt;
use oci_spec::runtime::{Capability, LinuxNamespaceType, PosixRlimitType, Process, Spec};
use rootfs::RootfsPlan;

mod raw;
mod rootfs;
pub mod seccomp;

/// Each child's stack; a few pages of it are used.
const STACK_SIZE: usize = 64 * 1024;

/// Why the container's execs go through libcontainer, if they do.
pub fn container_allows(spec: &Spec) -> Result<(), &'static str> {
    let linux = spec.linux().as_ref().ok_or("no linux section")?;
    if linux.personality().is_some() {
        return Err("linux.personality");
    }
    if linux.memory_policy().is_some() {
        return Err("linux.memoryPolicy");
    }
    let namespaces = linux.namespaces().as_deref().unwrap_or_default();
    let has = |typ| namespaces.iter().any(|ns| ns.typ() == typ);
    if has(LinuxNamespaceType::User) {
        return Err("a user namespace");
    }
    if has(LinuxNamespaceType::Time) {
        return Err("a time namespace");
    }
    if !has(LinuxNamespaceType::Mount) {
        return Err("no mount namespace");
    }
    Ok(())
}

/// Why this process goes through libcontainer, if it does.
fn process_allows(process: &Process) -> Result<(), &'static str> {
    if process.apparmor_profile().is_some() {
        return Err("process.apparmorProfile");
    }
    if process.selinux_label().is_some() {
        return Err("process.selinuxLabel");
    }
    if process.io_priority().is_some() {
        return Err("process.ioPriority");
    }
    if process.scheduler().is_some() {
        return Err("process.scheduler");
    }
    if process.exec_cpu_affinity().is_some() {
        return Err("process.execCPUAffinity");
    }
    Ok(())
}

/// `Step`, each variant with what its failure says, listed once.
macro_rules! steps {
    ($($name:ident => $what:literal,)*) => {
        /// The step of a child that failed.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Step {
            $($name,)*
        }

        impl Step {
            const ALL: &[Step] = &[$(Step::$name,)*];

            fn what(self) -> &'static str {
                match self {
                    $(Step::$name => $what,)*
                }
            }
        }
    };
}

steps! {
    OomScoreAdj => "process.oomScoreAdj",
    Namespace => "joining the container's namespaces",
    Terminal => "opening a terminal in the container's /dev/pts",
    Clone => "cloning into the container's PID namespace and cgroup",
    CgroupNamespace => "joining the container's cgroup namespace",
    Session => "setsid",
    Stdio => "stdio",
    Rlimit => "process.rlimits",
    NoNewPrivileges => "process.noNewPrivileges",
    Chdir => "process.cwd",
    Groups => "process.user.additionalGids",
    Ids => "process.user",
    Descriptors => "closing the agent's descriptors",
    Capabilities => "process.capabilities",
    NotFound => "process.args[0]",
    Exec => "executing the program",
    Hostname => "hostname",
    Rootfs => "binding the rootfs",
    Mount => "mounts",
    Symlink => "a symlink in /dev",
    Device => "linux.devices",
    PivotRoot => "pivot_root into the rootfs",
    Sysctl => "linux.sysctl",
    ReadonlyRoot => "root.readonly",
    ReadonlyPath => "linux.readonlyPaths",
    MaskedPath => "linux.maskedPaths",
    Seccomp => "linux.seccomp",
}

impl Step {
    /// As stored in [`Report::step`] (0: no failure).
    fn code(self) -> i32 {
        Self::ALL.iter().position(|s| *s == self).and_then(|i| i32::try_from(i + 1).ok()).unwrap_or(-1)
    }

    fn from_code(v: i32) -> Option<Self> {
        usize::try_from(v).ok().and_then(|v| v.checked_sub(1)).and_then(|i| Self::ALL.get(i).copied())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("opening {path}: {cause}")]
    Open { path: String, cause: std::io::Error },
    #[error("{field}: {value:?} contains a NUL byte")]
    Nul { field: &'static str, value: String },
    #[error("process.capabilities: {0}")]
    Capabilities(String),
    #[error("{0}")]
    Program(String),
    #[error("cloning the process: {0}")]
    Clone(std::io::Error),
    #[error("creating the init's pipes: {0}")]
    Pipe(std::io::Error),
    #[error("{what}{detail}: {cause}")]
    Child { step: Step, what: &'static str, detail: String, cause: std::io::Error },
    #[error("the process's launcher ended without a result")]
    NoResult,
}

impl LaunchError {
    /// A fault of the request (its program), not of the guest.
    pub fn is_invalid(&self) -> bool {
        matches!(self, Self::Nul { .. } | Self::Program(_) | Self::Child { step: Step::NotFound | Step::Exec | Step::Chdir, .. })
    }
}

/// What a child reports; written by the children, read by the agent once
/// they are done (the vfork wait orders the accesses).
#[derive(Debug)]
struct Report {
    pid: AtomicI32,
    step: AtomicI32,
    errno: AtomicI32,
    index: AtomicI32,
    /// The pty master the outer child opened (-1: none).
    master: AtomicI32,
}

impl Default for Report {
    fn default() -> Self {
        Self {
            pid: AtomicI32::new(0),
            step: AtomicI32::new(0),
            errno: AtomicI32::new(0),
            index: AtomicI32::new(0),
            master: AtomicI32::new(-1),
        }
    }
}

/// The capability sets of `process.capabilities`, as kernel bit masks.
#[derive(Debug, Default)]
struct Caps {
    /// Supported capabilities not in `bounding`.
    drop_bounding: Vec<c_int>,
    effective: Option<u64>,
    permitted: Option<u64>,
    inheritable: Option<u64>,
    ambient: Option<Vec<c_int>>,
}

/// The namespaces of the container the process joins.
#[derive(Debug)]
pub struct Target<'a> {
    /// The container's init, whose namespaces are joined.
    pub init_pid: i32,
    /// The container's cgroup directory.
    pub cgroup_dir: &'a Path,
    /// The container's seccomp filter.
    pub seccomp: Option<&'a std::sync::Arc<seccomp::Filter>>,
}

/// An exec'd process or a container's init, prepared to be spawned.
#[derive(Debug)]
pub struct Launch {
    oom_score_adj: Option<CString>,
    terminal: bool,
    namespaces: Joins,
    /// CLONE_NEW* flags of the namespaces the outer child makes.
    unshare: c_int,
    cgroup_namespace: Option<OwnedFd>,
    /// The container's cgroup directory, which the process is cloned
    /// into: always for an exec; for an init when the directory exists
    /// before it (else the agent puts it there).
    cgroup: Option<OwnedFd>,
    init: Option<Init>,
    /// Loaded before the capabilities are dropped, or (with
    /// no_new_privileges) last, as libcontainer loads it.
    seccomp: Option<std::sync::Arc<seccomp::Filter>>,
    rlimits: Vec<(c_int, libc::rlimit64)>,
    no_new_privileges: bool,
    umask: Option<u32>,
    cwd: CString,
    groups: Option<Vec<libc::gid_t>>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    caps: Option<Caps>,
    candidates: Vec<CString>,
    argv: Vec<CString>,
    env: Vec<CString>,
    report: Report,
}

fn c_string(field: &'static str, value: &[u8]) -> Result<CString, LaunchError> {
    CString::new(value).map_err(|_| LaunchError::Nul { field, value: String::from_utf8_lossy(value).into_owned() })
}

fn mask(set: &Option<std::collections::HashSet<Capability>>) -> Option<u64> {
    set.as_ref().map(|s| s.iter().fold(0u64, |m, c| m | (1u64 << c.to_cap().index())))
}

fn supported_caps() -> &'static [c_int] {
    static SUPPORTED: std::sync::OnceLock<Vec<c_int>> = std::sync::OnceLock::new();
    SUPPORTED.get_or_init(|| {
        let mut all: Vec<c_int> = caps::runtime::thread_all_supported().iter().map(|c| c_int::from(c.index())).collect();
        all.sort_unstable();
        all
    })
}

fn rlimit_resource(typ: PosixRlimitType) -> c_int {
    use PosixRlimitType::*;
    let r = match typ {
        RlimitCpu => libc::RLIMIT_CPU,
        RlimitFsize => libc::RLIMIT_FSIZE,
        RlimitData => libc::RLIMIT_DATA,
        RlimitStack => libc::RLIMIT_STACK,
        RlimitCore => libc::RLIMIT_CORE,
        RlimitRss => libc::RLIMIT_RSS,
        RlimitNproc => libc::RLIMIT_NPROC,
        RlimitNofile => libc::RLIMIT_NOFILE,
        RlimitMemlock => libc::RLIMIT_MEMLOCK,
        RlimitAs => libc::RLIMIT_AS,
        RlimitLocks => libc::RLIMIT_LOCKS,
        RlimitSigpending => libc::RLIMIT_SIGPENDING,
        RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        RlimitNice => libc::RLIMIT_NICE,
        RlimitRtprio => libc::RLIMIT_RTPRIO,
        RlimitRttime => libc::RLIMIT_RTTIME,
    };
    r.cast_signed()
}

/// Namespaces the outer child joins: (descriptor, CLONE_NEW* types, name).
type Joins = Vec<(OwnedFd, c_int, &'static str)>;

/// The namespaces an exec joins: every one of the container's init's but
/// its cgroup namespace (joined once in the cgroup, see [`inner`]) and its
/// user and time namespaces (a container with either of those execs
/// through libcontainer, see [`container_allows`]). Joining one the
/// container shares with the agent changes nothing.
const EXEC_JOINS: c_int = libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET | libc::CLONE_NEWPID | libc::CLONE_NEWNS;

/// A pidfd of the container's init `pid`, through which an exec joins its
/// namespaces with one setns(2) each in the outer and inner child: opening
/// and comparing `/proc/PID/ns/*` one by one cost ~0.2 s of emulated kernel
/// a call on kvm_pvm hosts. `Err` when the init shares the agent's mount
/// namespace (a spec's mount namespace given by the path of the agent's),
/// which only libcontainer joins.
fn init_pidfd(pid: i32) -> Result<Result<OwnedFd, &'static str>, LaunchError> {
    use std::os::fd::FromRawFd;
    let theirs = format!("/proc/{pid}/ns/mnt");
    let shared = match (std::fs::metadata(&theirs), std::fs::metadata("/proc/self/ns/mnt")) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        (Err(cause), _) | (_, Err(cause)) => return Err(LaunchError::Open { path: theirs, cause }),
    };
    if shared {
        return Ok(Err("the container shares the agent's mount namespace"));
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new
    // descriptor (or -1); no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = c_int::try_from(fd)
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| LaunchError::Open { path: format!("pidfd of {pid}"), cause: std::io::Error::last_os_error() })?;
    // SAFETY: pidfd_open returned this new descriptor; nothing else owns it.
    Ok(Ok(unsafe { OwnedFd::from_raw_fd(fd) }))
}

impl Launch {
    /// `process` (normalized, with HOME and the default environment) to be
    /// run in `target`; `Ok(None)` when it needs libcontainer (the reason
    /// is logged).
    pub fn prepare(process: &Process, target: &Target<'_>) -> Result<Option<Self>, LaunchError> {
        if let Err(why) = process_allows(process) {
            tracing::debug!(why, "exec through libcontainer");
            return Ok(None);
        }
        let pidfd = match init_pidfd(target.init_pid)? {
            Ok(fd) => fd,
            Err(why) => {
                tracing::debug!(why, "exec through libcontainer");
                return Ok(None);
            }
        };
        let cgroup_namespace =
            pidfd.try_clone().map_err(|cause| LaunchError::Open { path: format!("pidfd of {}", target.init_pid), cause })?;
        let namespaces = vec![(pidfd, EXEC_JOINS, "the container's")];
        let cgroup = std::fs::File::open(target.cgroup_dir)
            .map_err(|cause| LaunchError::Open { path: target.cgroup_dir.display().to_string(), cause })?
            .into();

        let launch = Self::new(process, namespaces, 0, Some(cgroup_namespace), Some(cgroup), None)?;
        Ok(Some(Self { seccomp: target.seccomp.cloned(), ..launch }))
    }

    fn new(
        process: &Process,
        namespaces: Joins,
        unshare: c_int,
        cgroup_namespace: Option<OwnedFd>,
        cgroup: Option<OwnedFd>,
        init: Option<Init>,
    ) -> Result<Self, LaunchError> {
        let args = process.args().as_deref().unwrap_or_default();
        let name = args.first().ok_or_else(|| LaunchError::Program("process.args: empty".into()))?;
        let env = process.env().as_deref().unwrap_or_default();
        let candidates = super::executor::program_candidates(name, env)
            .map_err(LaunchError::Program)?
            .iter()
            .map(|c| c_string("process.args", c.as_os_str().as_bytes()))
            .collect::<Result<_, _>>()?;
        let caps = match process.capabilities() {
            None => None,
            Some(c) => {
                let bounding = mask(c.bounding()).unwrap_or(0);
                let drop_bounding = supported_caps().iter().copied().filter(|cap| bounding & (1u64 << cap) == 0).collect();
                let ambient = c.ambient().as_ref().map(|s| s.iter().map(|c| c_int::from(c.to_cap().index())).collect());
                Some(Caps {
                    drop_bounding,
                    effective: mask(c.effective()),
                    permitted: mask(c.permitted()),
                    inheritable: mask(c.inheritable()),
                    ambient,
                })
            }
        };
        let user = process.user();
        Ok(Self {
            terminal: process.terminal() == Some(true),
            oom_score_adj: process.oom_score_adj().map(|v| c_string("process.oomScoreAdj", v.to_string().as_bytes())).transpose()?,
            namespaces,
            unshare,
            cgroup_namespace,
            cgroup,
            init,
            seccomp: None,
            rlimits: process
                .rlimits()
                .as_deref()
                .unwrap_or_default()
                .iter()
                .map(|r| (rlimit_resource(r.typ()), libc::rlimit64 { rlim_cur: r.soft(), rlim_max: r.hard() }))
                .collect(),
            no_new_privileges: process.no_new_privileges() == Some(true),
            umask: user.umask(),
            cwd: c_string("process.cwd", process.cwd().as_os_str().as_bytes())?,
            groups: user.additional_gids().clone().filter(|g| !g.is_empty()),
            uid: user.uid(),
            gid: user.gid(),
            caps,
            candidates,
            argv: args.iter().map(|a| c_string("process.args", a.as_bytes())).collect::<Result<_, _>>()?,
            env: env.iter().map(|e| c_string("process.env", e.as_bytes())).collect::<Result<_, _>>()?,
            report: Report::default(),
        })
    }

    /// Starts the process with `stdio` as its descriptors 0, 1 and 2
    /// (ignored with a terminal); returns its PID (a child of the agent)
    /// and, with a terminal, the pty master. Call with the reaper's
    /// registry held, as for libcontainer.
    pub fn spawn(self, stdio: [RawFd; 3]) -> Result<(i32, Option<OwnedFd>), LaunchError> {
        let argv = pointers(&self.argv);
        let envp = pointers(&self.env);
        let mut stacks = Stacks::take();
        let (outer_top, inner_top) = stacks.tops();
        let shared = Shared { launch: &self, stdio, argv: argv.as_ptr(), envp: envp.as_ptr(), inner_stack: inner_top };
        let pid = self.clone_outer(&shared, outer_top);
        stacks.give_back();
        let master = match self.report.master.load(Ordering::Acquire) {
            // SAFETY: the outer child opened this descriptor in our table
            // (CLONE_FILES) for us; nothing else owns it.
            fd if fd >= 0 => Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }),
            _ => None,
        };
        let pid = pid.and_then(|()| self.reported())?;
        match master {
            None if self.terminal => Err(LaunchError::NoResult),
            master => Ok((pid, master)),
        }
    }

    /// Runs the outer child (which clones the inner one) and waits for it
    /// to be done.
    fn clone_outer(&self, shared: &Shared<'_>, outer_top: *mut c_void) -> Result<(), LaunchError> {
        // Every signal blocked in the children until the inner one execs:
        // no handler of the agent runs on memory it shares with them.
        let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: the sets are initialised by sigfillset / written by
        // pthread_sigmask before use; only this thread's mask changes.
        unsafe {
            libc::sigfillset(all.as_mut_ptr());
            libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
        }
        let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD | if self.terminal { libc::CLONE_FILES } else { 0 };
        // SAFETY: the outer child runs `outer` on its own stack (alive
        // until clone returns) with `shared`, which outlives this call;
        // CLONE_VFORK suspends this thread until the child has exited, so
        // neither is freed or moved while it runs.
        let pid = unsafe { libc::clone(outer, outer_top, flags, shared as *const Shared<'_> as *mut c_void) };
        let clone_error = std::io::Error::last_os_error();
        // SAFETY: restores the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut()) };
        if pid < 0 {
            return Err(LaunchError::Clone(clone_error));
        }
        Ok(())
    }

    /// The children's result: the inner child's PID, or the failed step.
    fn reported(&self) -> Result<i32, LaunchError> {
        let report = &self.report;
        let step = report.step.load(Ordering::Acquire);
        if step != 0 {
            let step = Step::from_code(step).unwrap_or(Step::Exec);
            let index = usize::try_from(report.index.load(Ordering::Acquire)).unwrap_or(0);
            let cause = std::io::Error::from_raw_os_error(report.errno.load(Ordering::Acquire));
            return Err(self.child_error(step, index, cause));
        }
        match report.pid.load(Ordering::Acquire) {
            0 => Err(LaunchError::NoResult),
            pid => Ok(pid),
        }
    }

    fn child_error(&self, step: Step, index: usize, cause: std::io::Error) -> LaunchError {
        let name = self.argv.first().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default();
        let detail = match step {
            Step::Namespace => self.namespaces.get(index).map_or(" (new ones)".to_string(), |(_, _, n)| format!(" ({n})")),
            Step::Chdir => format!(" {:?}", self.cwd.to_string_lossy()),
            Step::Capabilities => {
                let what = [
                    "reading them",
                    "effective reset",
                    "bounding set",
                    "effective/permitted/inheritable",
                    "ambient clear",
                    "ambient raise",
                ];
                what.get(index).map(|w| format!(" ({w})")).unwrap_or_default()
            }
            Step::Exec => {
                let program = self.candidates.get(index).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
                return LaunchError::Program(format!("executing {program:?} (process.args[0] {name:?}): {cause}"));
            }
            Step::Mount | Step::Device | Step::Symlink | Step::Sysctl | Step::ReadonlyPath | Step::MaskedPath => {
                self.init.as_ref().map(|i| i.rootfs.detail(step, index)).unwrap_or_default()
            }
            Step::NotFound => {
                let env: Vec<String> = self.env.iter().map(|e| e.to_string_lossy().into_owned()).collect();
                let err = super::executor::find_program(&name, &env, |_| false).err().unwrap_or_default();
                return LaunchError::Program(err);
            }
            _ => String::new(),
        };
        LaunchError::Child { step, what: step.what(), detail, cause }
    }
}

/// What a container's init has beyond an exec'd process.
#[derive(Debug)]
struct Init {
    rootfs: RootfsPlan,
    /// A cgroup namespace to join, else whether to make one.
    cgroup_namespace: Option<OwnedFd>,
    new_cgroup_namespace: bool,
    /// The init's ends of the pipes (numbers in its copy of our table):
    /// go (read: the cgroup is set), ready (write), start (read).
    go: RawFd,
    ready: RawFd,
    start: RawFd,
    /// The agent's ends, which the init closes in its copy of the table
    /// (else it would never read EOF on its own).
    agent_ends: [RawFd; 3],
}

/// Both ends of the init's three pipes, until the spawn.
#[derive(Debug)]
struct Pipes {
    go: (OwnedFd, OwnedFd),
    ready: (OwnedFd, OwnedFd),
    start: (OwnedFd, OwnedFd),
}

fn pipe() -> Result<(OwnedFd, OwnedFd), LaunchError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| LaunchError::Pipe(e.into()))
}

/// Why this container's init goes through libcontainer, if it does.
pub fn init_allows(spec: &Spec) -> Result<(), &'static str> {
    container_allows(spec)?;
    let process = spec.process().as_ref().ok_or("no process")?;
    process_allows(process)?;
    if process.terminal() == Some(true) {
        return Err("a terminal");
    }
    if let Some(hooks) = spec.hooks() {
        let any = |h: &Option<Vec<oci_spec::runtime::Hook>>| h.as_ref().is_some_and(|h| !h.is_empty());
        if any(hooks.create_container()) || any(hooks.start_container()) {
            return Err("hooks");
        }
    }
    Ok(())
}

impl Launch {
    /// The init of a container of `spec` (prepared as libcontainer gets
    /// it: see `spec::prepare_for_libcontainer`) over `rootfs`;
    /// `Ok(Err(why))` when libcontainer has to make it.
    pub fn prepare_init(
        spec: &Spec,
        rootfs: &Path,
        seccomp: Option<std::sync::Arc<seccomp::Filter>>,
        cgroup_dir: Option<&Path>,
    ) -> Result<Result<(Self, PreparedPipes), &'static str>, LaunchError> {
        if let Err(why) = init_allows(spec) {
            return Ok(Err(why));
        }
        let Some(process) = spec.process().as_ref() else { return Ok(Err("no process")) };
        let mut plan = match RootfsPlan::prepare(spec, rootfs)? {
            Ok(plan) => plan,
            Err(why) => return Ok(Err(why)),
        };
        let mut joins: Joins = Vec::new();
        let mut unshare = 0;
        let mut cgroup_namespace = None;
        let mut new_cgroup_namespace = false;
        let mut new_uts = false;
        let namespaces = spec.linux().as_ref().and_then(|l| l.namespaces().clone()).unwrap_or_default();
        for ns in &namespaces {
            let (flag, name) = match ns.typ() {
                LinuxNamespaceType::Ipc => (libc::CLONE_NEWIPC, "ipc"),
                LinuxNamespaceType::Uts => (libc::CLONE_NEWUTS, "uts"),
                LinuxNamespaceType::Network => (libc::CLONE_NEWNET, "net"),
                LinuxNamespaceType::Pid => (libc::CLONE_NEWPID, "pid"),
                LinuxNamespaceType::Mount => (libc::CLONE_NEWNS, "mnt"),
                LinuxNamespaceType::Cgroup => (libc::CLONE_NEWCGROUP, "cgroup"),
                _ => return Ok(Err("a user or time namespace")),
            };
            match ns.path() {
                Some(path) => {
                    let fd: OwnedFd =
                        std::fs::File::open(path).map_err(|cause| LaunchError::Open { path: path.display().to_string(), cause })?.into();
                    if flag == libc::CLONE_NEWCGROUP {
                        cgroup_namespace = Some(fd);
                    } else {
                        joins.push((fd, flag, name));
                    }
                }
                None if flag == libc::CLONE_NEWCGROUP => new_cgroup_namespace = true,
                None => {
                    new_uts |= flag == libc::CLONE_NEWUTS;
                    unshare |= flag;
                }
            }
        }
        if unshare & libc::CLONE_NEWNS == 0 {
            return Ok(Err("a mount namespace joined by path"));
        }
        // The mount namespace last: the paths of the others are read in ours.
        joins.sort_by_key(|(_, flag, _)| *flag == libc::CLONE_NEWNS);
        if !new_uts {
            // As libcontainer: the names are set in a new UTS namespace only.
            plan.drop_names();
        }
        let pipes = Pipes { go: pipe()?, ready: pipe()?, start: pipe()? };
        let init = Init {
            rootfs: plan,
            cgroup_namespace,
            new_cgroup_namespace,
            go: pipes.go.0.as_raw_fd(),
            ready: pipes.ready.1.as_raw_fd(),
            start: pipes.start.0.as_raw_fd(),
            agent_ends: [pipes.go.1.as_raw_fd(), pipes.ready.0.as_raw_fd(), pipes.start.1.as_raw_fd()],
        };
        let cgroup = cgroup_dir
            .map(|dir| std::fs::File::open(dir).map_err(|cause| LaunchError::Open { path: dir.display().to_string(), cause }))
            .transpose()?
            .map(OwnedFd::from);
        let launch = Self::new(process, joins, unshare, None, cgroup, Some(init))?;
        Ok(Ok((Self { seccomp, ..launch }, PreparedPipes(pipes))))
    }

    /// Starts the container's init with `stdio` as its descriptors 0, 1
    /// and 2. It waits, in its new namespaces, for [`Starting::go`]. Call
    /// with the reaper's registry held, as for libcontainer.
    pub fn spawn_init(self, pipes: PreparedPipes, stdio: [RawFd; 3]) -> Result<Starting, LaunchError> {
        let Pipes { go, ready, start } = pipes.0;
        let mut kept = Box::new(Kept {
            shared: None,
            argv: pointers(&self.argv),
            envp: pointers(&self.env),
            stack: vec![0u8; STACK_SIZE].into_boxed_slice(),
            launch: Box::new(self),
        });
        let launch: *const Launch = &*kept.launch;
        let top = stack_top(&mut kept.stack);
        let shared = Box::new(Shared {
            // SAFETY: `launch` points into `kept`, which outlives `shared`
            // (a field of it, dropped first).
            launch: unsafe { &*launch },
            stdio,
            argv: kept.argv.as_ptr(),
            envp: kept.envp.as_ptr(),
            inner_stack: top,
        });
        let shared: &Shared<'static> = &*kept.shared.insert(shared);
        let mut stacks = Stacks::take();
        let (outer_top, _) = stacks.tops();
        let cloned = kept.launch.clone_outer(shared, outer_top);
        stacks.give_back();
        // The init holds its own ends now.
        drop((go.0, ready.1, start.0));
        // No init runs unless the outer child reported its PID (and then
        // no failure).
        let pid = cloned.and_then(|()| kept.launch.reported())?;
        Ok(Starting { pid, go: Some(go.1), ready: ready.0, start: Some(start.1), kept: Some(kept) })
    }
}

/// The init's pipes, made by [`Launch::prepare_init`] for
/// [`Launch::spawn_init`].
#[derive(Debug)]
pub struct PreparedPipes(Pipes);

/// What an init reads until its exec; it shares our memory until then.
struct Kept {
    // Declared (and so dropped) before the launch it points to.
    shared: Option<Box<Shared<'static>>>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    stack: Box<[u8]>,
    launch: Box<Launch>,
}

// SAFETY: the raw pointers point into Kept's own boxes, which never move;
// the agent's threads only move Kept around and drop it, never dereference
// them.
unsafe impl Send for Kept {}
// SAFETY: as above; there is no interior mutability reachable through
// a shared reference except `Report`'s atomics.
unsafe impl Sync for Kept {}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept").field("launch", &self.launch).finish_non_exhaustive()
    }
}

/// Waits until child `pid` is dead (a zombie, left for the reaper).
fn wait_dead(pid: i32) {
    let Ok(pid) = libc::id_t::try_from(pid) else { return };
    loop {
        let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::zeroed();
        // SAFETY: waitid writes a siginfo_t; WNOWAIT leaves the child to be
        // reaped by the agent's reaper.
        let r = unsafe { libc::waitid(libc::P_PID, pid, info.as_mut_ptr(), libc::WEXITED | libc::WNOWAIT) };
        if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// An init that waits for [`Starting::go`].
#[derive(Debug)]
pub struct Starting {
    pid: i32,
    go: Option<OwnedFd>,
    ready: OwnedFd,
    start: Option<OwnedFd>,
    kept: Option<Box<Kept>>,
}

impl Starting {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Lets the init build the container (once it is in its cgroup) and
    /// waits until it is ready to exec the program.
    pub fn go(mut self) -> Result<InitProcess, LaunchError> {
        let go = self.go.take();
        let ready = go.as_ref().map(|go| raw::write(go.as_raw_fd(), b"g")).is_some_and(|r| r == Ok(1)) && {
            let mut byte = [0u8; 1];
            loop {
                match raw::read(self.ready.as_raw_fd(), &mut byte) {
                    Err(libc::EINTR) => continue,
                    r => break r == Ok(1),
                }
            }
        };
        drop(go);
        if !ready {
            wait_dead(self.pid);
            let err = self.kept.as_ref().map(|k| k.launch.reported());
            return Err(match err {
                Some(Err(e)) => e,
                _ => LaunchError::NoResult,
            });
        }
        Ok(InitProcess { pid: self.pid, start: self.start.take(), kept: self.kept.take() })
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if self.kept.is_some() && self.pid > 0 {
            // Not let go: it dies, and its memory is ours to free once it
            // is dead.
            // SAFETY: a signal to our own child, which the reaper has not
            // reaped (the caller holds its registry).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            wait_dead(self.pid);
        }
    }
}

/// A container's init, ready: execs the program on [`InitProcess::start`].
#[derive(Debug)]
pub struct InitProcess {
    pid: i32,
    start: Option<OwnedFd>,
    kept: Option<Box<Kept>>,
}

impl InitProcess {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Tells the init to exec the program.
    pub fn start(&mut self) -> std::io::Result<()> {
        let start = self.start.take().ok_or_else(|| std::io::Error::other("the container was started already"))?;
        match raw::write(start.as_raw_fd(), b"s") {
            Ok(1) => Ok(()),
            Ok(_) => Err(std::io::Error::from_raw_os_error(libc::EIO)),
            Err(e) => Err(std::io::Error::from_raw_os_error(e)),
        }
    }

    /// Frees what the init read: call once it has exec'd or died.
    pub fn release(&mut self) {
        self.kept.take();
    }
}

impl Drop for InitProcess {
    fn drop(&mut self) {
        // Not known to have exec'd or died: it may still read this memory.
        if let Some(kept) = self.kept.take() {
            Box::leak(kept);
        }
    }
}

fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect()
}

/// What the children read: the launch, and pointers into the agent's
/// memory prepared for them.
struct Shared<'a> {
    launch: &'a Launch,
    stdio: [RawFd; 3],
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    inner_stack: *mut c_void,
}

/// The top of a child's stack in `mem` (16-byte aligned; stacks grow
/// down).
fn stack_top(mem: &mut [u8]) -> *mut c_void {
    let end = mem.as_mut_ptr().wrapping_add(mem.len());
    end.wrapping_sub(end as usize % 16).cast::<c_void>()
}

/// Children's stacks, kept between execs: their pages are already
/// mapped the next time (each first touch is a fault).
struct Stacks(Option<Box<[u8]>>);

static SPARE_STACKS: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

impl Stacks {
    fn take() -> Self {
        let spare = SPARE_STACKS.lock().unwrap_or_else(|e| e.into_inner()).pop();
        Self(Some(spare.unwrap_or_else(|| vec![0u8; 2 * STACK_SIZE].into_boxed_slice())))
    }

    /// The top of each child's stack (16-byte aligned; stacks grow down).
    fn tops(&mut self) -> (*mut c_void, *mut c_void) {
        let Some(mem) = self.0.as_mut() else { return (std::ptr::null_mut(), std::ptr::null_mut()) };
        let (first, second) = mem.split_at_mut(STACK_SIZE);
        (stack_top(first), stack_top(second))
    }

    fn give_back(&mut self) {
        if let Some(mem) = self.0.take() {
            SPARE_STACKS.lock().unwrap_or_else(|e| e.into_inner()).push(mem);
        }
    }
}

// ---- In the children: system calls only, no allocation, no panics. ----

/// A failed step: (step, index, errno).
type Failure = (Step, usize, i32);

fn report_failure(report: &Report, (step, index, errno): Failure) -> c_int {
    report.errno.store(errno, Ordering::Relaxed);
    report.index.store(i32::try_from(index).unwrap_or(-1), Ordering::Relaxed);
    report.step.store(step.code(), Ordering::Release);
    127
}

fn at(step: Step, index: usize) -> impl Fn(i32) -> Failure {
    move |errno| (step, index, errno)
}

/// The outer child: its own oom_score_adj, the namespaces, the inner child
/// (an exec'd process) or the container's init.
extern "C" fn outer(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Shared` that `spawn` passed, alive while the
    // agent's thread waits for this child.
    let shared = unsafe { &*(arg as *const Shared<'_>) };
    match outer_steps(shared, arg) {
        Ok(()) => 0,
        Err(failure) => report_failure(&shared.launch.report, failure),
    }
}

fn outer_steps(shared: &Shared<'_>, arg: *mut c_void) -> Result<(), Failure> {
    let l = shared.launch;
    if let Some(value) = &l.oom_score_adj {
        let fd = raw::open(c"/proc/self/oom_score_adj", libc::O_WRONLY | libc::O_CLOEXEC, 0).map_err(at(Step::OomScoreAdj, 0))?;
        let written = raw::write(fd, value.as_bytes());
        raw::close(fd);
        if written.map_err(at(Step::OomScoreAdj, 0))? != value.as_bytes().len() {
            return Err((Step::OomScoreAdj, 0, libc::EIO));
        }
    }
    // This process only (its own fs_struct: no CLONE_FS), and so its
    // children.
    for (i, (fd, typ, _)) in l.namespaces.iter().enumerate() {
        raw::setns(fd.as_raw_fd(), *typ).map_err(at(Step::Namespace, i))?;
    }
    if l.unshare != 0 {
        raw::unshare(l.unshare).map_err(at(Step::Namespace, l.namespaces.len()))?;
    }
    if l.terminal {
        // The container's ptmx (the mount namespace is the container's
        // now), unlocked; the descriptor is left to the agent.
        let master = raw::open(c"/dev/ptmx", libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC, 0).map_err(at(Step::Terminal, 0))?;
        l.report.master.store(master, Ordering::Release);
        raw::ioctl_set_int(master, libc::TIOCSPTLCK, &0).map_err(at(Step::Terminal, 1))?;
    }
    let (child, flags): (extern "C" fn(*mut c_void) -> c_int, c_int) = match &l.init {
        // The init runs on beside the agent until its exec (which
        // StartContainer asks for).
        Some(_) => (init_main, libc::CLONE_VM | libc::CLONE_PARENT),
        None => (inner, libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT),
    };
    // Either way the child runs on its own stack with `shared`: for an
    // exec CLONE_VFORK suspends this child until it execs or exits; an
    // init's stack and `shared` are kept by the agent until it has exec'd
    // or died.
    let pid = match &l.cgroup {
        // Born in the container's cgroup: an exec always, an init when its
        // cgroup exists already (the spare one).
        Some(cgroup) => {
            // SAFETY: the stack and `shared` live as said above; the
            // children make system calls only.
            let pid = unsafe { raw::clone_into_cgroup(flags, cgroup.as_raw_fd(), child, arg, shared.inner_stack, STACK_SIZE - 16) };
            c_int::try_from(pid.map_err(at(Step::Clone, 0))?).map_err(|_| (Step::Clone, 0, libc::EOVERFLOW))?
        }
        // SAFETY: as for clone_into_cgroup.
        None => match unsafe { libc::clone(child, shared.inner_stack, flags | libc::SIGCHLD, arg) } {
            pid if pid < 0 => return Err((Step::Clone, 0, libc::EAGAIN)),
            pid => pid,
        },
    };
    if l.report.step.load(Ordering::Acquire) == 0 {
        l.report.pid.store(pid, Ordering::Release);
    }
    Ok(())
}

fn cap_set(effective: u64, permitted: u64, inheritable: u64) -> Result<(), i32> {
    let half = |m: u64, i: u32| u32::try_from((m >> (32 * i)) & u64::from(u32::MAX)).unwrap_or(0);
    raw::capset(&[0, 1].map(|i| raw::CapData {
        effective: half(effective, i),
        permitted: half(permitted, i),
        inheritable: half(inheritable, i),
    }))
}

/// A capability number (0..64) as prctl's argument.
fn cap_arg(cap: c_int) -> usize {
    usize::try_from(cap).unwrap_or(usize::MAX)
}

fn joined(data: [raw::CapData; 2], f: impl Fn(&raw::CapData) -> u32) -> u64 {
    u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32)
}

/// The inner child: runs in the container's PID namespace; becomes the
/// user's process.
extern "C" fn inner(arg: *mut c_void) -> c_int {
    // SAFETY: as in `outer`.
    let shared = unsafe { &*(arg as *const Shared<'_>) };
    let l = shared.launch;
    let steps = || -> Result<Failure, Failure> {
        if let Some(fd) = &l.cgroup_namespace {
            raw::setns(fd.as_raw_fd(), libc::CLONE_NEWCGROUP).map_err(at(Step::CgroupNamespace, 0))?;
        }
        process_steps(l, shared.stdio)?;
        let program = find_program(l)?;
        load_late_seccomp(l)?;
        Ok(exec(shared, program))
    };
    match steps() {
        Ok(failure) | Err(failure) => report_failure(&l.report, failure),
    }
}

/// What libcontainer's init does for the process, in its order, once the
/// child is in the container's namespaces and cgroup: a new session,
/// stdio, rlimits, no_new_privs, umask, cwd, groups and ids, close-on-exec
/// of every other descriptor, capabilities, SIGPIPE's default action.
fn process_steps(l: &Launch, stdio: [RawFd; 3]) -> Result<(), Failure> {
    raw::setsid().map_err(at(Step::Session, 0))?;
    let mut stdio = stdio;
    if l.terminal {
        let master = l.report.master.load(Ordering::Acquire);
        let slave =
            raw::ioctl_int(master, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC).map_err(at(Step::Terminal, 2))?;
        let slave = c_int::try_from(slave).map_err(|_| (Step::Terminal, 2, libc::EBADF))?;
        raw::ioctl_int(slave, libc::TIOCSCTTY, 0).map_err(at(Step::Terminal, 2))?;
        stdio = [slave; 3];
    }
    for (target, fd) in (0i32..).zip(stdio) {
        let index = usize::try_from(target).unwrap_or(0);
        if fd == target { raw::clear_cloexec(target) } else { raw::dup2(fd, target) }.map_err(at(Step::Stdio, index))?;
    }
    for (i, (resource, limit)) in l.rlimits.iter().enumerate() {
        raw::prlimit(*resource, limit).map_err(at(Step::Rlimit, i))?;
    }
    if l.no_new_privileges {
        raw::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).map_err(at(Step::NoNewPrivileges, 0))?;
    }
    if let Some(umask) = l.umask {
        raw::umask(umask);
    }
    // Before the ids change (the agent may enter where the user may
    // not), and again after them if that was refused.
    let chdir = || raw::chdir(&l.cwd).map_err(at(Step::Chdir, 0));
    let chdir_later = match chdir() {
        Ok(_) => false,
        Err((_, _, libc::EPERM)) => true,
        Err(failure) => return Err(failure),
    };
    if let Some(groups) = &l.groups {
        raw::setgroups(groups).map_err(at(Step::Groups, 0))?;
    }
    raw::prctl(libc::PR_SET_KEEPCAPS, 1, 0).map_err(at(Step::Ids, 0))?;
    raw::setresgid(l.gid).map_err(at(Step::Ids, 0))?;
    raw::setresuid(l.uid).map_err(at(Step::Ids, 0))?;
    raw::prctl(libc::PR_SET_KEEPCAPS, 0, 0).map_err(at(Step::Ids, 0))?;
    raw::cloexec_from(3).map_err(at(Step::Descriptors, 0))?;
    // Without no_new_privileges loading a filter needs CAP_SYS_ADMIN:
    // before the capabilities go.
    if !l.no_new_privileges {
        load_seccomp(l)?;
    }
    // Effective reset to permitted (a uid change from 0 cleared it, and
    // dropping from the bounding set needs CAP_SETPCAP in it), then the
    // spec's sets.
    let current = raw::capget().map_err(at(Step::Capabilities, 0))?;
    let permitted = joined(current, |d| d.permitted);
    let inheritable = joined(current, |d| d.inheritable);
    cap_set(permitted, permitted, inheritable).map_err(at(Step::Capabilities, 1))?;
    if let Some(caps) = &l.caps {
        for cap in &caps.drop_bounding {
            raw::prctl(libc::PR_CAPBSET_DROP, cap_arg(*cap), 0).map_err(at(Step::Capabilities, 2))?;
        }
        let effective = caps.effective.unwrap_or(permitted);
        cap_set(effective, caps.permitted.unwrap_or(permitted), caps.inheritable.unwrap_or(inheritable))
            .map_err(at(Step::Capabilities, 3))?;
        if let Some(ambient) = &caps.ambient {
            raw::prctl(libc::PR_CAP_AMBIENT, cap_arg(libc::PR_CAP_AMBIENT_CLEAR_ALL), 0).map_err(at(Step::Capabilities, 4))?;
            for cap in ambient {
                raw::prctl(libc::PR_CAP_AMBIENT, cap_arg(libc::PR_CAP_AMBIENT_RAISE), cap_arg(*cap)).map_err(at(Step::Capabilities, 5))?;
            }
        }
    }
    if chdir_later {
        chdir()?;
    }
    // The agent ignores SIGPIPE; the program must not inherit that.
    raw::default_action(libc::SIGPIPE);
    Ok(())
}

fn load_seccomp(l: &Launch) -> Result<(), Failure> {
    l.seccomp.as_ref().map_or(Ok(()), |f| f.load().map_err(at(Step::Seccomp, 0)))
}

/// With no_new_privileges, the filter as close to the exec as it goes.
fn load_late_seccomp(l: &Launch) -> Result<(), Failure> {
    if l.no_new_privileges {
        load_seccomp(l)?;
    }
    Ok(())
}

/// The first candidate that is a regular file with an execute bit (as
/// [`super::executor::find_program`] checks).
fn find_program(l: &Launch) -> Result<usize, Failure> {
    for (i, candidate) in l.candidates.iter().enumerate() {
        match raw::mode_of(candidate) {
            Ok(mode) if mode & libc::S_IFMT == libc::S_IFREG && mode & 0o111 != 0 => return Ok(i),
            _ => {}
        }
    }
    Err((Step::NotFound, 0, libc::ENOENT))
}

/// Execs candidate `i` with every signal unblocked; returns the failure.
fn exec(shared: &Shared<'_>, i: usize) -> Failure {
    let Some(program) = shared.launch.candidates.get(i) else { return (Step::NotFound, 0, libc::ENOENT) };
    raw::sigmask(false);
    // SAFETY: argv and envp are the launch's arrays (see `pointers`),
    // alive until the exec.
    let errno = unsafe { raw::execve(program, shared.argv, shared.envp) };
    raw::sigmask(true);
    (Step::Exec, i, errno)
}

/// The container's init: in its new namespaces, waits for the agent to
/// have put it in its cgroup, builds the container's filesystem
/// ([`rootfs`]), prepares the process, tells the agent it is ready, and
/// execs the program once StartContainer says so.
extern "C" fn init_main(arg: *mut c_void) -> c_int {
    // SAFETY: as in `outer`; the agent keeps `shared` (and the launch it
    // points to) until this process has exec'd or died.
    let shared = unsafe { &*(arg as *const Shared<'_>) };
    let l = shared.launch;
    let Some(init) = &l.init else { return 127 };
    for fd in init.agent_ends {
        raw::close(fd);
    }
    let mut byte = [0u8; 1];
    // The agent writes once the cgroup is ours; EOF: it gave up.
    if raw::read(init.go, &mut byte) != Ok(1) {
        return 127;
    }
    let steps = || -> Result<usize, Failure> {
        match &init.cgroup_namespace {
            Some(fd) => raw::setns(fd.as_raw_fd(), libc::CLONE_NEWCGROUP).map_err(at(Step::CgroupNamespace, 0))?,
            // Rooted at the cgroup the agent put us in.
            None if init.new_cgroup_namespace => raw::unshare(libc::CLONE_NEWCGROUP).map_err(at(Step::CgroupNamespace, 0))?,
            None => {}
        }
        init.rootfs.build()?;
        process_steps(l, shared.stdio)?;
        find_program(l)
    };
    let program = match steps() {
        Ok(program) => program,
        Err(failure) => return report_failure(&l.report, failure),
    };
    if raw::write(init.ready, b"r") != Ok(1) {
        return 127;
    }
    raw::close(init.ready);
    // Signals as for any process until the exec (a SIGKILL kills it
    // meanwhile); the agent has no handler a copy of could run here.
    raw::sigmask(false);
    if raw::read(init.start, &mut byte) != Ok(1) {
        return 0;
    }
    raw::sigmask(true);
    let failure = load_late_seccomp(l).err().unwrap_or_else(|| exec(shared, program));
    report_failure(&l.report, failure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_round_trips() {
        let last = i32::try_from(Step::ALL.len()).expect("steps");
        for v in 1..=last {
            let step = Step::from_code(v).expect("step");
            assert_eq!(step.code(), v);
            assert!(!step.what().is_empty());
        }
        assert_eq!(Step::from_code(0), None);
        assert_eq!(Step::from_code(last + 1), None);
        assert_eq!(Step::from_code(-1), None);
    }

    #[test]
    fn what_libcontainer_keeps() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}]}
        }))
        .expect("spec");
        assert_eq!(container_allows(&spec), Ok(()));
        let mut with_user = spec.clone();
        let mut linux = with_user.linux().clone().expect("linux");
        let mut nss = linux.namespaces().clone().expect("namespaces");
        nss.push(serde_json::from_value(serde_json::json!({"type": "user"})).expect("ns"));
        linux.set_namespaces(Some(nss));
        with_user.set_linux(Some(linux));
        assert_eq!(container_allows(&with_user), Err("a user namespace"));
        let seccomp: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [{"type": "mount"}], "seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}}
        }))
        .expect("spec");
        assert_eq!(container_allows(&seccomp), Ok(()), "compiled by the agent (see seccomp.rs)");
        let shared_mounts: Spec =
            serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "linux": {"namespaces": [{"type": "pid"}]}})).expect("spec");
        assert_eq!(container_allows(&shared_mounts), Err("no mount namespace"));

        let process: Process =
            serde_json::from_value(serde_json::json!({"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "apparmorProfile": "x"}))
                .expect("p");
        assert_eq!(process_allows(&process), Err("process.apparmorProfile"));
        let process: Process =
            serde_json::from_value(serde_json::json!({"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}})).expect("p");
        assert_eq!(process_allows(&process), Ok(()));
    }

    #[test]
    fn capability_masks_use_kernel_numbers() {
        let set: std::collections::HashSet<Capability> = [Capability::Chown, Capability::DacOverride, Capability::SysAdmin].into();
        // CAP_CHOWN 0, CAP_DAC_OVERRIDE 1, CAP_SYS_ADMIN 21 (linux/capability.h).
        assert_eq!(mask(&Some(set)), Some(1 | (1 << 1) | (1 << 21)));
        assert_eq!(mask(&None), None);
    }
}

/// The launcher on this host (as root): a "container" made of a process
/// in new UTS, IPC and mount namespaces and a cgroup of its own.
#[cfg(test)]
mod host_tests {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::path::PathBuf;

    use super::*;

    /// Reaps this test's leftover children (the launcher's outer child,
    /// a failed inner one): every test making children holds
    /// [`crate::test_children`], so they are all ours.
    fn reap_leftovers() {
        while let Ok(status) = nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            if status == nix::sys::wait::WaitStatus::StillAlive {
                break;
            }
        }
    }

    fn root_or_skip(test: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        assert!(std::env::var_os("CARAPACE_REQUIRE_KVM").is_none(), "CARAPACE_REQUIRE_KVM is set: {test} needs root");
        eprintln!("SKIP {test}: needs root");
        false
    }

    /// A writable cgroup v2 directory of its own (removed when dropped).
    struct TestCgroup(PathBuf);

    impl TestCgroup {
        fn new(name: &str) -> Self {
            let unified = Path::new("/sys/fs/cgroup/unified");
            let base = if unified.join("cgroup.procs").exists() { unified } else { Path::new("/sys/fs/cgroup") };
            let dir = base.join(format!("{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("cgroup dir");
            Self(dir)
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    fn container_init() -> std::process::Child {
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", "hostname launch-test && exec sleep 60"]);
        // SAFETY: unshare between fork and exec, no allocation.
        unsafe {
            cmd.pre_exec(|| {
                nix::sched::unshare(
                    nix::sched::CloneFlags::CLONE_NEWUTS | nix::sched::CloneFlags::CLONE_NEWIPC | nix::sched::CloneFlags::CLONE_NEWNS,
                )
                .map_err(std::io::Error::from)
            })
        };
        let child = cmd.spawn().expect("container init");
        // Until its hostname is set.
        std::thread::sleep(std::time::Duration::from_millis(300));
        child
    }

    fn process(json: serde_json::Value) -> Process {
        serde_json::from_value(json).expect("process")
    }

    #[test]
    fn an_exec_joins_the_namespaces_cgroup_user_and_capabilities_it_is_given() {
        if !root_or_skip("an_exec_joins_the_namespaces_cgroup_user_and_capabilities_it_is_given") {
            return;
        }
        let _children = crate::test_children();
        let cgroup = TestCgroup::new("carapace-launch");
        let mut init = container_init();
        let target = Target { init_pid: i32::try_from(init.id()).expect("pid"), cgroup_dir: &cgroup.0, seccomp: None };
        let p = process(serde_json::json!({
            "args": ["sh", "-c", "hostname; id -u; id -G; grep -E '^Cap(Eff|Bnd)' /proc/self/status; cat /proc/self/cgroup; pwd; umask; ulimit -n"],
            "env": ["PATH=/usr/bin:/bin"], "cwd": "/tmp",
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [5], "umask": 63},
            "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"], "inheritable": ["CAP_KILL"], "ambient": ["CAP_KILL"]},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 77, "soft": 66}]
        }));
        let launch = Launch::prepare(&p, &target).expect("prepare").expect("direct");
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let null = std::fs::File::open("/dev/null").expect("null");
        let (pid, master) = launch.spawn([null.as_raw_fd(), out_w.as_raw_fd(), out_w.as_raw_fd()]).expect("spawn");
        assert!(master.is_none());
        drop(out_w);
        let mut out = String::new();
        std::fs::File::from(out_r).read_to_string(&mut out).expect("read");
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).expect("wait");
        let _ = init.kill();
        let _ = init.wait();
        reap_leftovers();
        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(pid), 0), "{out}");
        let lines: Vec<&str> = out.lines().collect();
        let cgroup_name = cgroup.0.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert_eq!(lines.first(), Some(&"launch-test"), "the UTS namespace: {out}");
        assert_eq!(lines.get(1), Some(&"1000"), "{out}");
        assert!(lines.get(2).is_some_and(|g| g.split(' ').any(|g| g == "5")), "additional gids: {out}");
        assert!(
            out.contains("CapEff:\t0000000000000020") && out.contains("CapBnd:\t0000000000000020"),
            "CAP_KILL only (kept across exec as ambient): {out}"
        );
        assert!(out.lines().any(|l| l.starts_with("0::") && l.ends_with(cgroup_name)), "the cgroup: {out}");
        assert!(out.contains("/tmp\n0077\n66\n"), "cwd, umask, rlimit: {out}");
    }

    #[test]
    fn a_missing_program_fails_the_spawn_with_its_name() {
        if !root_or_skip("a_missing_program_fails_the_spawn_with_its_name") {
            return;
        }
        let _children = crate::test_children();
        let cgroup = TestCgroup::new("carapace-launch-missing");
        let mut init = container_init();
        let target = Target { init_pid: i32::try_from(init.id()).expect("pid"), cgroup_dir: &cgroup.0, seccomp: None };
        let null = std::fs::File::open("/dev/null").expect("null");
        let fds = [null.as_raw_fd(); 3];
        let p = |args: serde_json::Value| {
            process(serde_json::json!({"args": args, "env": ["PATH=/nowhere:/also-not"], "cwd": "/", "user": {"uid": 0, "gid": 0}}))
        };
        let err = Launch::prepare(&p(serde_json::json!(["/no/such"])), &target)
            .expect("prepare")
            .expect("direct")
            .spawn(fds)
            .expect_err("missing");
        assert_eq!(err.to_string(), "process.args[0] \"/no/such\": no such executable file in the container");
        assert!(err.is_invalid());
        let err =
            Launch::prepare(&p(serde_json::json!(["sh"])), &target).expect("prepare").expect("direct").spawn(fds).expect_err("missing");
        assert_eq!(err.to_string(), "process.args[0] \"sh\": not found in PATH \"/nowhere:/also-not\"");
        let mut bad_cwd = p(serde_json::json!(["/bin/true"]));
        bad_cwd.set_cwd(PathBuf::from("/no/such/dir"));
        let err = Launch::prepare(&bad_cwd, &target).expect("prepare").expect("direct").spawn(fds).expect_err("cwd");
        assert!(err.to_string().starts_with("process.cwd \"/no/such/dir\": No such file or directory"), "{err}");
        let _ = init.kill();
        let _ = init.wait();
        // The failed children are reaped by whoever waits for any child
        // (the agent's reaper); here: none of them is left running.
        reap_leftovers();
        let procs = std::fs::read_to_string(cgroup.0.join("cgroup.procs")).expect("procs");
        assert!(procs.trim().is_empty(), "left in the cgroup: {procs}");
    }

    /// A busybox rootfs and a spec for it, as `runc spec` makes them (no
    /// network namespace: the test runs on the host).
    fn init_spec(dir: &Path, args: serde_json::Value) -> (PathBuf, Spec) {
        let rootfs = dir.join("rootfs");
        for d in ["bin", "proc", "dev", "tmp"] {
            std::fs::create_dir_all(rootfs.join(d)).expect("dir");
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox");
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": args, "env": ["PATH=/bin"], "cwd": "/tmp", "user": {"uid": 0, "gid": 0}},
            "root": {"path": rootfs, "readonly": true},
            "hostname": "direct-init",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}],
                "maskedPaths": ["/proc/timer_list", "/proc/acpi"],
                "readonlyPaths": ["/proc/sys"]
            }
        });
        (rootfs, serde_json::from_value(spec).expect("spec"))
    }

    #[test]
    fn an_init_builds_its_container_and_execs_on_start() {
        if !root_or_skip("an_init_builds_its_container_and_execs_on_start") {
            return;
        }
        let _children = crate::test_children();
        let dir = tempfile::tempdir().expect("tempdir");
        let cgroup = TestCgroup::new("carapace-init");
        let script = "b=/bin/busybox; $b hostname; echo $$; $b pwd; $b stat -c %t:%T /dev/null; \
                      $b touch /x 2>/dev/null && echo rw || echo ro; $b wc -c < /proc/timer_list; $b readlink /dev/ptmx; \
                      $b grep -c ' /proc/sys ro,' /proc/self/mountinfo; $b mkdir /tmp/d 2>/dev/null && echo mkdir || echo denied; \
                      $b cat /proc/self/cgroup";
        let (rootfs, spec) = init_spec(dir.path(), serde_json::json!(["/bin/busybox", "sh", "-c", script]));
        // Loaded before the capabilities go (no no_new_privileges).
        let profile = serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        });
        let filter = seccomp::Filter::compile(&serde_json::from_value(profile).expect("profile")).expect("compile").expect("filter");
        // Born in its cgroup, as in the spare one.
        let (launch, pipes) = Launch::prepare_init(&spec, &rootfs, Some(filter.into()), Some(&cgroup.0)).expect("prepare").expect("direct");
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let null = std::fs::File::open("/dev/null").expect("null");
        let starting = launch.spawn_init(pipes, [null.as_raw_fd(), out_w.as_raw_fd(), out_w.as_raw_fd()]).expect("spawn");
        let pid = starting.pid();
        let procs = std::fs::read_to_string(cgroup.0.join("cgroup.procs")).expect("procs");
        assert_eq!(procs.trim(), pid.to_string(), "in its cgroup before it is let go");
        let mut init = starting.go().expect("ready");
        drop(out_w);
        init.start().expect("start");
        let mut out = String::new();
        std::fs::File::from(out_r).read_to_string(&mut out).expect("read");
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).expect("wait");
        init.release();
        reap_leftovers();
        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(pid), 0), "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.get(..9), Some(&["direct-init", "1", "/tmp", "1:3", "ro", "0", "pts/ptmx", "1", "denied"][..]), "{out}");
        let cgroup_name = cgroup.0.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert!(out.lines().any(|l| l.starts_with("0::") && l.ends_with(cgroup_name)), "the cgroup: {out}");
        // Its mounts stayed in its namespace.
        let ours = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        assert!(!ours.contains(rootfs.to_str().expect("utf-8")), "{ours}");
    }

    #[test]
    fn an_init_that_cannot_be_built_fails_create_by_name() {
        if !root_or_skip("an_init_that_cannot_be_built_fails_create_by_name") {
            return;
        }
        let _children = crate::test_children();
        let dir = tempfile::tempdir().expect("tempdir");
        let null = std::fs::File::open("/dev/null").expect("null");
        let fds = [null.as_raw_fd(); 3];
        let (rootfs, spec) = init_spec(dir.path(), serde_json::json!(["nonexist"]));
        let (launch, pipes) = Launch::prepare_init(&spec, &rootfs, None, None).expect("prepare").expect("direct");
        let err = launch.spawn_init(pipes, fds).expect("spawn").go().expect_err("missing program");
        assert_eq!(err.to_string(), "process.args[0] \"nonexist\": not found in PATH \"/bin\"");
        // A mount the kernel refuses.
        let (rootfs, spec) = init_spec(&dir.path().join("b"), serde_json::json!(["/bin/busybox", "true"]));
        let mut spec = serde_json::to_value(&spec).expect("json");
        spec["mounts"][2]["options"] = serde_json::json!(["ptmxmode=bogus"]);
        let spec: Spec = serde_json::from_value(spec).expect("spec");
        let (launch, pipes) = Launch::prepare_init(&spec, &rootfs, None, None).expect("prepare").expect("direct");
        let err = launch.spawn_init(pipes, fds).expect("spawn").go().expect_err("bad mount");
        assert!(err.to_string().starts_with(&format!("mounts {:?}: ", rootfs.join("dev/pts").display().to_string())), "{err}");
        reap_leftovers();
    }
}
