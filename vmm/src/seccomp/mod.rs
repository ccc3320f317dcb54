//! The VMM confines itself with seccomp-bpf: every thread runs under a
//! filter made for its kind, installed before the guest runs a single
//! instruction, and any system call outside it kills the whole process
//! (`SECCOMP_RET_KILL_PROCESS`, the process dies of SIGSYS).
//!
//! Thread kinds (allow-lists in [`rules`], with the reason for each call):
//!
//! | kind | threads | what they do |
//! | --- | --- | --- |
//! | [`ThreadKind::Vmm`] | the main thread, the signal thread of the binary | wait for the VM's end, kick and join vCPUs, drop devices (close fds, remove the vsock socket) |
//! | [`ThreadKind::Vcpu`] | `vcpu<N>` | `KVM_RUN` and the device emulation behind MMIO/PIO exits: serial output, virtio-mmio registers, device activation and reset |
//! | [`ThreadKind::Vsock`] | `vsock` | the vsock device's event loop: epoll, the Unix sockets of the hybrid-vsock backend |
//! | [`ThreadKind::Fs`] | `fs-<tag>` | the virtio-fs device's event loop: the passthrough file system's file operations on the share |
//! | [`ThreadKind::Net`] | `net` | a virtio-net device's event loop: reads and writes on its (already open) tap |
//! | [`ThreadKind::Spawner`] | `spawner` | starts device threads on request (see below) |
//!
//! Why a spawner: a thread inherits its creator's filter, and filters only
//! ever add up (the most restrictive answer wins). Device threads start
//! when the driver activates a device, on a vCPU thread; created there they
//! would be bound by the vCPU filter as well as their own, so the vCPU
//! filter would have to allow everything every device does. Instead the
//! vCPU asks the spawner thread (confined to thread creation plus the union
//! of what device threads may do) to create the thread, which then narrows
//! itself to its own kind before running any device code.
//!
//! Order in [`Vmm::run`](crate::Vmm::run): the spawner starts and confines
//! itself; each vCPU thread confines itself; the main thread confines
//! itself; only then do the vCPUs enter `KVM_RUN` (a barrier).
//!
//! `carapace-vmm --no-seccomp` runs without filters (debugging only);
//! `--seccomp-log` allows and logs (to the kernel audit log) what a filter
//! would have killed, to find a missing call.

use std::fmt;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use tracing::debug;

mod rules;
mod spawn;

pub(crate) use spawn::install_spawner;
pub use spawn::spawn;

/// The kinds of thread the VMM runs, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread (and the binary's signal thread).
    Vmm,
    /// A vCPU thread.
    Vcpu,
    /// The vsock device's worker.
    Vsock,
    /// A virtio-fs device's worker.
    Fs,
    /// A virtio-net device's worker.
    Net,
    /// The thread that starts device workers.
    Spawner,
}

impl ThreadKind {
    /// Every kind, in a fixed order.
    pub const ALL: [ThreadKind; 6] =
        [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Vsock, ThreadKind::Fs, ThreadKind::Net, ThreadKind::Spawner];

    /// The kind's name (as `--seccomp-selftest` takes it).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Vsock => "vsock",
            ThreadKind::Fs => "fs",
            ThreadKind::Net => "net",
            ThreadKind::Spawner => "spawner",
        }
    }

    /// The kind named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    fn index(self) -> usize {
        match self {
            ThreadKind::Vmm => 0,
            ThreadKind::Vcpu => 1,
            ThreadKind::Vsock => 2,
            ThreadKind::Fs => 3,
            ThreadKind::Net => 4,
            ThreadKind::Spawner => 5,
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens to a system call outside a thread's allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompLevel {
    /// The process is killed (SIGSYS). The default.
    #[default]
    Kill,
    /// The call is allowed and logged to the kernel audit log (finding
    /// what a filter lacks; never for production).
    Log,
}

/// Errors building or installing the filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A filter could not be built (a bug in the allow-lists).
    #[error("cannot build the seccomp filter for {kind} threads")]
    Build {
        kind: ThreadKind,
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused a filter.
    #[error("cannot install the seccomp filter for {kind} threads")]
    Install {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
    /// The thread that starts device threads could not be started.
    #[error("cannot start the spawner thread")]
    Spawner(#[source] std::io::Error),
}

/// The compiled filter of every thread kind.
#[derive(Debug, Clone)]
pub struct Filters {
    programs: Vec<BpfProgram>,
    level: SeccompLevel,
}

impl Filters {
    /// Builds the filters of every kind.
    pub fn new(level: SeccompLevel) -> Result<Self, SeccompError> {
        let default = match level {
            SeccompLevel::Kill => SeccompAction::KillProcess,
            SeccompLevel::Log => SeccompAction::Log,
        };
        let mut programs = Vec::new();
        for kind in ThreadKind::ALL {
            let filter = SeccompFilter::new(rules::allowed(kind), default.clone(), SeccompAction::Allow, TargetArch::x86_64)
                .map_err(|source| SeccompError::Build { kind, source })?;
            let program = BpfProgram::try_from(filter).map_err(|source| SeccompError::Build { kind, source })?;
            programs.push(program);
        }
        Ok(Filters { programs, level })
    }

    /// What a call outside the lists does.
    pub fn level(&self) -> SeccompLevel {
        self.level
    }

    /// Confines the calling thread to `kind`'s allow-list, for good.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let program = &self.programs[kind.index()];
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install { kind, source })?;
        debug!(kind = kind.name(), level = ?self.level, "seccomp filter installed");
        Ok(())
    }

    /// The number of system calls `kind` may make.
    pub fn allowed_count(kind: ThreadKind) -> usize {
        rules::allowed(kind).len()
    }
}

/// Confines the calling thread as `kind` and then makes a system call no
/// thread of the VMM may make (`socket(AF_PACKET)`, then `ptrace`). Under
/// [`SeccompLevel::Kill`] the process dies of SIGSYS inside this call; if
/// it returns, the filter did not stop the call.
pub fn selftest(filters: &Filters, kind: ThreadKind) -> Result<String, SeccompError> {
    filters.apply(kind)?;
    // Allowed for every kind: the filter lets the VMM work.
    let msg = format!("carapace-vmm: {kind} filter installed\n");
    // SAFETY: `msg` is a live buffer of `msg.len()` bytes; fd 2 is stderr.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    // SAFETY: plain system calls with constant arguments; a socket that
    // opens anyway is closed at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd >= 0 {
        // SAFETY: `fd` is the socket just opened and owned here.
        unsafe { libc::close(fd) };
    }
    // SAFETY: PTRACE_TRACEME takes no pointers.
    let rc = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
    Ok(format!("socket(AF_PACKET) = {fd}, ptrace(PTRACE_TRACEME) = {rc}: the {kind} filter let them through"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls no VMM thread has any business making.
    const NEVER: [i64; 14] = [
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_setns,
        libc::SYS_kexec_load,
        libc::SYS_init_module,
        libc::SYS_bpf,
        libc::SYS_fork,
    ];

    #[test]
    fn every_filter_builds() {
        let f = Filters::new(SeccompLevel::Kill).expect("filters");
        assert_eq!(f.level(), SeccompLevel::Kill);
        assert!(Filters::new(SeccompLevel::Log).is_ok());
        for kind in ThreadKind::ALL {
            assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
            assert!(Filters::allowed_count(kind) > 20, "{kind}");
        }
        assert_eq!(ThreadKind::from_name("api"), None);
    }

    #[test]
    fn dangerous_calls_are_never_allowed() {
        for kind in ThreadKind::ALL {
            let rules = rules::allowed(kind);
            for call in NEVER {
                assert!(!rules.contains_key(&call), "{kind} allows syscall {call}");
            }
        }
    }

    #[test]
    fn only_the_spawner_creates_threads_or_adds_filters() {
        for kind in ThreadKind::ALL {
            let rules = rules::allowed(kind);
            let creates = rules.contains_key(&libc::SYS_clone3) || rules.contains_key(&libc::SYS_clone);
            assert_eq!(creates, kind == ThreadKind::Spawner, "{kind}");
            assert_eq!(rules.contains_key(&libc::SYS_seccomp), kind == ThreadKind::Spawner, "{kind}");
        }
    }

    #[test]
    fn vcpu_threads_open_nothing_and_make_only_vcpu_ioctls() {
        let rules = rules::allowed(ThreadKind::Vcpu);
        for call in [libc::SYS_open, libc::SYS_openat, libc::SYS_socket, libc::SYS_connect, libc::SYS_unlink] {
            assert!(!rules.contains_key(&call), "vcpu allows syscall {call}");
        }
        // ioctl is allowed only for four request numbers (one rule each).
        assert_eq!(rules.get(&libc::SYS_ioctl).map(Vec::len), Some(4));
        // Only the vsock thread makes sockets, and only Unix ones.
        for kind in ThreadKind::ALL {
            let sockets = rules::allowed(kind).get(&libc::SYS_socket).map(Vec::len);
            let expect = matches!(kind, ThreadKind::Vsock | ThreadKind::Spawner).then_some(1);
            assert_eq!(sockets, expect, "{kind}");
        }
    }

    /// The net worker's one ioctl and the vsock worker's one are both in
    /// the spawner's union (neither replaces the other).
    #[test]
    fn device_ioctls_add_up_in_the_spawner() {
        let count = |kind| rules::allowed(kind).get(&libc::SYS_ioctl).map(Vec::len);
        assert_eq!(count(ThreadKind::Net), Some(1));
        assert_eq!(count(ThreadKind::Vsock), Some(1));
        assert_eq!(count(ThreadKind::Spawner), Some(2));
        assert_eq!(count(ThreadKind::Fs), None);
    }

    /// A device thread starts under the spawner's filter and then adds its
    /// own: the spawner must allow all of it.
    #[test]
    fn the_spawner_allows_what_device_threads_do() {
        let spawner = rules::allowed(ThreadKind::Spawner);
        for kind in [ThreadKind::Vsock, ThreadKind::Fs, ThreadKind::Net] {
            for call in rules::allowed(kind).keys() {
                assert!(spawner.contains_key(call), "{kind} needs syscall {call}, the spawner lacks it");
            }
        }
    }
}
