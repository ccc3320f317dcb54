//! ExecProcess without forking the agent.
//!
//! libcontainer starts an exec'd process by forking the agent twice (its
//! intermediate and init processes). On a kvm_pvm host every page-table
//! entry the kernel copies for those forks, every copy-on-write fault
//! after them and the unmapping at exec is emulated: forking the
//! 15-thread agent was most of an exec's guest time (bench/lifecycle.py).
//!
//! Here the process is started as posix_spawn starts one: children that
//! share the agent's memory (`CLONE_VM | CLONE_VFORK`) and so copy no page
//! table, the calling thread suspended until the last of them execs. The
//! first child ("outer") writes the process's `oom_score_adj` and joins
//! the container's namespaces; a PID namespace only applies to children,
//! so it clones the second ("inner", made the agent's child with
//! `CLONE_PARENT`, which the reaper then waits for), which joins the
//! cgroup and the cgroup namespace and then does what libcontainer's init
//! does for an exec, in its order: a new session, stdio, rlimits,
//! no_new_privs, umask, cwd, groups and ids, close-on-exec of every other
//! descriptor, capabilities, the signal mask, the program lookup (as
//! [`super::executor::find_program`] does) and `execve`.
//!
//! Everything the children use is prepared here first (C strings, pointer
//! arrays, descriptors, capability masks): sharing the agent's memory with
//! its other threads running, they must not allocate (a malloc lock may be
//! held by a thread that is not there for them), so they only make system
//! calls, through `libc::syscall` where a glibc wrapper would act on "all
//! threads of the process" (set*id) that the children do not own. A child
//! that fails writes the step and errno into [`Report`] (shared memory)
//! and exits; the agent turns it into the error.
//!
//! With a terminal, the outer child opens the pty master in the
//! container's devpts (its `/dev/ptmx`, as libcontainer's init does) into
//! the agent's descriptor table (it shares it: `CLONE_FILES`), and the
//! inner one opens the slave from it (`TIOCGPTPEER`: no path lookup) as its
//! controlling terminal and stdio.
//!
//! Only what this covers goes this way; anything else goes through
//! libcontainer as before (see [`container_allows`] and [`Launch::prepare`]):
//! seccomp, a user or time namespace (setns of those needs a
//! process that shares no memory), AppArmor, SELinux, I/O priority,
//! scheduler, CPU affinity, personality, memory policy.

use std::ffi::{c_int, c_void, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

use libcontainer::capabilities::CapabilityExt;
use oci_spec::runtime::{Capability, LinuxNamespaceType, PosixRlimitType, Process, Spec};

/// Each child's stack; a few pages of it are used.
const STACK_SIZE: usize = 64 * 1024;

/// Why the container's execs go through libcontainer, if they do.
pub fn container_allows(spec: &Spec) -> Result<(), &'static str> {
    let linux = spec.linux().as_ref().ok_or("no linux section")?;
    if linux.seccomp().is_some() {
        return Err("linux.seccomp");
    }
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
    Clone => "cloning into the container's PID namespace",
    Cgroup => "joining the container's cgroup",
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
}

/// An exec'd process, prepared to be spawned.
#[derive(Debug)]
pub struct Launch {
    oom_score_adj: Option<CString>,
    terminal: bool,
    namespaces: Joins,
    cgroup_namespace: Option<OwnedFd>,
    cgroup_procs: OwnedFd,
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

/// The namespaces of `pid` that differ from the agent's, opened; `Err`
/// names one that only libcontainer can join.
/// Namespaces the outer child joins: (descriptor, CLONE_NEW* type, name).
type Joins = Vec<(OwnedFd, c_int, &'static str)>;

fn namespaces_of(pid: i32) -> Result<Result<(Joins, Option<OwnedFd>), &'static str>, LaunchError> {
    // Joined in this order; the mount namespace last (its paths, /proc
    // included, change).
    const KINDS: [(&str, c_int); 7] = [
        ("user", libc::CLONE_NEWUSER),
        ("time", libc::CLONE_NEWTIME),
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("net", libc::CLONE_NEWNET),
        ("pid", libc::CLONE_NEWPID),
        ("mnt", libc::CLONE_NEWNS),
    ];
    let open = |path: String| std::fs::File::open(&path).map_err(|cause| LaunchError::Open { path, cause });
    let differs = |name: &str| -> Result<Option<OwnedFd>, LaunchError> {
        let theirs = open(format!("/proc/{pid}/ns/{name}"))?;
        let ours = std::fs::metadata(format!("/proc/self/ns/{name}"));
        let same = match (theirs.metadata(), ours) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        Ok((!same).then(|| theirs.into()))
    };
    let mut joins = Vec::new();
    for (name, typ) in KINDS {
        let Some(fd) = differs(name)? else { continue };
        match typ {
            libc::CLONE_NEWUSER => return Ok(Err("the container's user namespace")),
            libc::CLONE_NEWTIME => return Ok(Err("the container's time namespace")),
            _ => joins.push((fd, typ, name)),
        }
    }
    if !joins.iter().any(|(_, typ, _)| *typ == libc::CLONE_NEWNS) {
        return Ok(Err("the container shares the agent's mount namespace"));
    }
    Ok(Ok((joins, differs("cgroup")?)))
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
        let (namespaces, cgroup_namespace) = match namespaces_of(target.init_pid)? {
            Ok(n) => n,
            Err(why) => {
                tracing::debug!(why, "exec through libcontainer");
                return Ok(None);
            }
        };
        let procs = target.cgroup_dir.join("cgroup.procs");
        let cgroup_procs = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(|cause| LaunchError::Open { path: procs.display().to_string(), cause })?
            .into();

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
        Ok(Some(Self {
            terminal: process.terminal() == Some(true),
            oom_score_adj: process.oom_score_adj().map(|v| c_string("process.oomScoreAdj", v.to_string().as_bytes())).transpose()?,
            namespaces,
            cgroup_namespace,
            cgroup_procs,
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
        }))
    }

    /// Starts the process with `stdio` as its descriptors 0, 1 and 2
    /// (ignored with a terminal); returns its PID (a child of the agent)
    /// and, with a terminal, the pty master. Call with the reaper's
    /// registry held, as for libcontainer.
    pub fn spawn(self, stdio: [RawFd; 3]) -> Result<(i32, Option<OwnedFd>), LaunchError> {
        let argv: Vec<*const libc::c_char> = self.argv.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
        let envp: Vec<*const libc::c_char> = self.env.iter().map(|e| e.as_ptr()).chain([std::ptr::null()]).collect();
        let mut stacks = Stacks::take();
        let (outer_top, inner_top) = stacks.tops();
        let shared = Shared { launch: &self, stdio, argv: argv.as_ptr(), envp: envp.as_ptr(), inner_stack: inner_top };

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
        // SAFETY: the outer child runs `outer` on its own stack (from
        // `stacks`, alive until clone returns) with `shared`, which lives
        // on this frame; CLONE_VFORK suspends this thread until the child
        // has exited, so neither is freed or moved while it runs.
        let pid = unsafe { libc::clone(outer, outer_top, flags, &shared as *const Shared<'_> as *mut c_void) };
        let clone_error = std::io::Error::last_os_error();
        // SAFETY: restores the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut()) };
        stacks.give_back();
        let master = match self.report.master.load(Ordering::Acquire) {
            // SAFETY: the outer child opened this descriptor in our table
            // (CLONE_FILES) for us; nothing else owns it.
            fd if fd >= 0 => Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }),
            _ => None,
        };
        if pid < 0 {
            return Err(LaunchError::Clone(clone_error));
        }
        let report = &self.report;
        let step = report.step.load(Ordering::Acquire);
        if step != 0 {
            let step = Step::from_code(step).unwrap_or(Step::Exec);
            let index = usize::try_from(report.index.load(Ordering::Acquire)).unwrap_or(0);
            let cause = std::io::Error::from_raw_os_error(report.errno.load(Ordering::Acquire));
            return Err(self.child_error(step, index, cause));
        }
        match (report.pid.load(Ordering::Acquire), master) {
            (0, _) => Err(LaunchError::NoResult),
            (_, None) if self.terminal => Err(LaunchError::NoResult),
            (pid, master) => Ok((pid, master)),
        }
    }

    fn child_error(&self, step: Step, index: usize, cause: std::io::Error) -> LaunchError {
        let name = self.argv.first().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default();
        let detail = match step {
            Step::Namespace => self.namespaces.get(index).map(|(_, _, n)| format!(" ({n})")).unwrap_or_default(),
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

/// What the children read: the launch, and pointers into the agent's
/// memory prepared for them.
struct Shared<'a> {
    launch: &'a Launch,
    stdio: [RawFd; 3],
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    inner_stack: *mut c_void,
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
        let base = mem.as_mut_ptr();
        let align = |p: *mut u8| p.wrapping_sub(p as usize % 16).cast::<c_void>();
        (align(base.wrapping_add(STACK_SIZE)), align(base.wrapping_add(2 * STACK_SIZE)))
    }

    fn give_back(&mut self) {
        if let Some(mem) = self.0.take() {
            SPARE_STACKS.lock().unwrap_or_else(|e| e.into_inner()).push(mem);
        }
    }
}

// ---- In the children: system calls only, no allocation, no panics. ----

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

fn fail(report: &Report, step: Step, index: usize) -> c_int {
    report.errno.store(errno(), Ordering::Relaxed);
    report.index.store(i32::try_from(index).unwrap_or(-1), Ordering::Relaxed);
    report.step.store(step.code(), Ordering::Release);
    127
}

/// The outer child: its own oom_score_adj, the namespaces, the inner child.
extern "C" fn outer(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Shared` that `spawn` passed, alive while the
    // agent's thread waits for this child.
    let shared = unsafe { &*(arg as *const Shared<'_>) };
    let l = shared.launch;
    if let Some(value) = &l.oom_score_adj {
        // SAFETY: open/write/close of a NUL-terminated path and a buffer
        // we own; /proc/self is this (outer) process, not the agent.
        let ok = unsafe {
            let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            let bytes = value.as_bytes();
            let ok = fd >= 0 && libc::write(fd, bytes.as_ptr().cast(), bytes.len()) == bytes.len().cast_signed();
            if fd >= 0 {
                libc::close(fd);
            }
            ok
        };
        if !ok {
            return fail(&l.report, Step::OomScoreAdj, 0);
        }
    }
    for (i, (fd, typ, _)) in l.namespaces.iter().enumerate() {
        // SAFETY: setns on a descriptor we hold; affects this process only
        // (its own fs_struct: no CLONE_FS).
        if unsafe { libc::setns(fd.as_raw_fd(), *typ) } != 0 {
            return fail(&l.report, Step::Namespace, i);
        }
    }
    if l.terminal {
        // SAFETY: opens the container's ptmx (the mount namespace is the
        // container's now) and unlocks the pty; the descriptor is left to
        // the agent.
        let master = unsafe { libc::open(c"/dev/ptmx".as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if master < 0 {
            return fail(&l.report, Step::Terminal, 0);
        }
        l.report.master.store(master, Ordering::Release);
        let unlock: c_int = 0;
        // SAFETY: TIOCSPTLCK reads one int.
        if unsafe { libc::ioctl(master, libc::TIOCSPTLCK, &unlock) } != 0 {
            return fail(&l.report, Step::Terminal, 1);
        }
    }
    // SAFETY: as in `spawn`: the inner child runs on its own stack with
    // `shared`; CLONE_VFORK suspends this child until it execs or exits.
    let pid =
        unsafe { libc::clone(inner, shared.inner_stack, libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT | libc::SIGCHLD, arg) };
    if pid < 0 {
        return fail(&l.report, Step::Clone, 0);
    }
    if l.report.step.load(Ordering::Acquire) == 0 {
        l.report.pid.store(pid, Ordering::Release);
    }
    0
}

/// capget/capset's header and data (version 3: two 32-bit halves).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;

fn cap_get() -> Option<[CapData; 2]> {
    let mut header = CapHeader { version: CAP_V3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData into `data`.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut CapHeader, data.as_mut_ptr()) };
    (r == 0).then_some(data)
}

fn cap_set(effective: u64, permitted: u64, inheritable: u64) -> bool {
    let mut header = CapHeader { version: CAP_V3, pid: 0 };
    let half = |m: u64, i: u32| u32::try_from((m >> (32 * i)) & u64::from(u32::MAX)).unwrap_or(0);
    let data = [0, 1].map(|i| CapData { effective: half(effective, i), permitted: half(permitted, i), inheritable: half(inheritable, i) });
    // SAFETY: capset reads two CapData from `data`.
    unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) == 0 }
}

/// A capability number (0..64) as prctl's argument.
fn c_ulong(cap: c_int) -> libc::c_ulong {
    libc::c_ulong::from(cap.unsigned_abs())
}

fn joined(data: [CapData; 2], f: impl Fn(&CapData) -> u32) -> u64 {
    u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32)
}

/// The inner child: runs in the container's PID namespace; becomes the
/// user's process.
extern "C" fn inner(arg: *mut c_void) -> c_int {
    // SAFETY: as in `outer`.
    let shared = unsafe { &*(arg as *const Shared<'_>) };
    let l = shared.launch;
    let r = &l.report;
    // SAFETY: system calls on descriptors, buffers and NUL-terminated
    // strings prepared by `spawn`/`prepare`, acting on this process only.
    unsafe {
        if libc::write(l.cgroup_procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
            return fail(r, Step::Cgroup, 0);
        }
        if let Some(fd) = &l.cgroup_namespace {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWCGROUP) != 0 {
                return fail(r, Step::CgroupNamespace, 0);
            }
        }
        if libc::setsid() < 0 {
            return fail(r, Step::Session, 0);
        }
        let mut stdio = shared.stdio;
        if l.terminal {
            let master = r.master.load(Ordering::Acquire);
            let slave = libc::ioctl(master, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            if slave < 0 || libc::ioctl(slave, libc::TIOCSCTTY, 0) != 0 {
                return fail(r, Step::Terminal, 2);
            }
            stdio = [slave; 3];
        }
        for (target, fd) in (0..).zip(stdio) {
            let ok = if fd == target { libc::fcntl(target, libc::F_SETFD, 0) == 0 } else { libc::dup2(fd, target) == target };
            if !ok {
                return fail(r, Step::Stdio, target.unsigned_abs() as usize);
            }
        }
        for (i, (resource, limit)) in l.rlimits.iter().enumerate() {
            if libc::syscall(libc::SYS_prlimit64, 0, *resource, limit as *const libc::rlimit64, std::ptr::null_mut::<libc::rlimit64>()) != 0
            {
                return fail(r, Step::Rlimit, i);
            }
        }
        if l.no_new_privileges && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return fail(r, Step::NoNewPrivileges, 0);
        }
        if let Some(umask) = l.umask {
            libc::umask(umask as libc::mode_t);
        }
        // Before the ids change (the agent may enter where the user may
        // not), and again after them if that was refused.
        let mut chdir_later = false;
        if libc::chdir(l.cwd.as_ptr()) != 0 {
            if errno() != libc::EPERM {
                return fail(r, Step::Chdir, 0);
            }
            chdir_later = true;
        }
        if let Some(groups) = &l.groups {
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                return fail(r, Step::Groups, 0);
            }
        }
        if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_setresgid, l.gid, l.gid, l.gid) != 0
            || libc::syscall(libc::SYS_setresuid, l.uid, l.uid, l.uid) != 0
            || libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) != 0
        {
            return fail(r, Step::Ids, 0);
        }
        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
            return fail(r, Step::Descriptors, 0);
        }
        // Effective reset to permitted (a uid change from 0 cleared it,
        // and dropping from the bounding set needs CAP_SETPCAP in it),
        // then the spec's sets.
        let Some(current) = cap_get() else { return fail(r, Step::Capabilities, 0) };
        let permitted = joined(current, |d| d.permitted);
        let inheritable = joined(current, |d| d.inheritable);
        if !cap_set(permitted, permitted, inheritable) {
            return fail(r, Step::Capabilities, 1);
        }
        if let Some(caps) = &l.caps {
            for cap in &caps.drop_bounding {
                if libc::prctl(libc::PR_CAPBSET_DROP, c_ulong(*cap), 0, 0, 0) != 0 {
                    return fail(r, Step::Capabilities, 2);
                }
            }
            let effective = caps.effective.unwrap_or(permitted);
            if !cap_set(effective, caps.permitted.unwrap_or(permitted), caps.inheritable.unwrap_or(inheritable)) {
                return fail(r, Step::Capabilities, 3);
            }
        }
        if let Some(ambient) = l.caps.as_ref().and_then(|c| c.ambient.as_ref()) {
            if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0) != 0 {
                return fail(r, Step::Capabilities, 4);
            }
            for cap in ambient {
                if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong, c_ulong(*cap), 0, 0) != 0 {
                    return fail(r, Step::Capabilities, 5);
                }
            }
        }
        if chdir_later && libc::chdir(l.cwd.as_ptr()) != 0 {
            return fail(r, Step::Chdir, 0);
        }
        // The agent ignores SIGPIPE; the program must not inherit that.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        for (i, candidate) in l.candidates.iter().enumerate() {
            let mut st = std::mem::MaybeUninit::<libc::stat64>::uninit();
            if libc::stat64(candidate.as_ptr(), st.as_mut_ptr()) != 0 {
                continue;
            }
            let st = st.assume_init();
            if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_mode & 0o111 == 0 {
                continue;
            }
            let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(none.as_mut_ptr());
            libc::sigprocmask(libc::SIG_SETMASK, none.as_ptr(), std::ptr::null_mut());
            libc::execve(candidate.as_ptr(), shared.argv, shared.envp);
            let err = errno();
            let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigfillset(all.as_mut_ptr());
            libc::sigprocmask(libc::SIG_SETMASK, all.as_ptr(), std::ptr::null_mut());
            r.errno.store(err, Ordering::Relaxed);
            r.index.store(i32::try_from(i).unwrap_or(-1), Ordering::Relaxed);
            r.step.store(Step::Exec.code(), Ordering::Release);
            return 127;
        }
        fail(r, Step::NotFound, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_round_trips() {
        for v in 1..=17 {
            let step = Step::from_code(v).expect("step");
            assert_eq!(step.code(), v);
            assert!(!step.what().is_empty());
        }
        assert_eq!(Step::from_code(0), None);
        assert_eq!(Step::from_code(18), None);
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
        assert_eq!(container_allows(&seccomp), Err("linux.seccomp"));
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
        let target = Target { init_pid: i32::try_from(init.id()).expect("pid"), cgroup_dir: &cgroup.0 };
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
        let target = Target { init_pid: i32::try_from(init.id()).expect("pid"), cgroup_dir: &cgroup.0 };
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
}
