//! Why a VM stopped, and the channel through which vCPUs, devices and the
//! binary's signal handler report it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

/// Process exit code: the guest rebooted/powered off (a clean end).
pub const EXIT_OK: i32 = 0;
/// Process exit code: bad configuration or the VM could not be set up.
pub const EXIT_SETUP_ERROR: i32 = 1;
/// Process exit code: bad command-line usage (clap's own code).
pub const EXIT_USAGE: i32 = 2;
/// Process exit code: the guest triple-faulted (KVM_EXIT_SHUTDOWN): a guest crash.
pub const EXIT_TRIPLE_FAULT: i32 = 3;
/// Process exit code: KVM could not run the guest (internal error, emulation
/// failure, failed entry, unexpected exit).
pub const EXIT_KVM_ERROR: i32 = 4;
/// Process exit code: a VMM thread failed while the guest ran.
pub const EXIT_VMM_ERROR: i32 = 5;
/// Process exit code base for "stopped by signal N": 128 + N.
pub const EXIT_SIGNAL_BASE: i32 = 128;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset (i8042 0xfe, `reboot=k`) or a power-off.
    GuestReset,
    /// A vCPU triple-faulted.
    TripleFault { cpu: u8 },
    /// KVM reported an error running a vCPU (described on stderr already).
    KvmError { cpu: u8, reason: String },
    /// A vCPU thread hit a host-side error (e.g. KVM_RUN failed).
    VmmError { cpu: u8, reason: String },
    /// The VMM was asked to stop (SIGTERM, SIGINT, ...).
    Signal(i32),
    /// The VM was paused and written to this snapshot directory.
    Snapshotted(std::path::PathBuf),
    /// A snapshot was asked for and could not be written.
    SnapshotFailed(String),
}

impl VmExit {
    /// The process exit code for this end.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::GuestReset | VmExit::Snapshotted(_) => EXIT_OK,
            VmExit::SnapshotFailed(_) => EXIT_VMM_ERROR,
            VmExit::TripleFault { .. } => EXIT_TRIPLE_FAULT,
            VmExit::KvmError { .. } => EXIT_KVM_ERROR,
            VmExit::VmmError { .. } => EXIT_VMM_ERROR,
            VmExit::Signal(n) => EXIT_SIGNAL_BASE + n,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::GuestReset => write!(f, "the guest rebooted"),
            VmExit::TripleFault { cpu } => write!(f, "guest crash: vCPU {cpu} triple-faulted (KVM_EXIT_SHUTDOWN)"),
            VmExit::KvmError { cpu, reason } => write!(f, "KVM error on vCPU {cpu}: {reason}"),
            VmExit::VmmError { cpu, reason } => write!(f, "VMM error on vCPU {cpu}: {reason}"),
            VmExit::Signal(n) => write!(f, "stopped by signal {n}"),
            VmExit::Snapshotted(dir) => write!(f, "snapshot written to {}", dir.display()),
            VmExit::SnapshotFailed(why) => write!(f, "snapshot failed: {why}"),
        }
    }
}

/// What the VM's owner is told by vCPUs, devices and signal handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The VM must stop.
    Exit(VmExit),
    /// Print every vCPU's registers and code bytes to stderr (debugging aid).
    DumpVcpus,
    /// Pause the VM, write a snapshot and end (SIGUSR2).
    Snapshot,
}

/// Reports a [`VmExit`] (the first report wins) or asks for a vCPU dump.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct ExitSender {
    tx: mpsc::Sender<VmEvent>,
    exiting: Arc<AtomicBool>,
}

impl ExitSender {
    /// A sender and the receiver the VM's owner waits on.
    pub fn channel() -> (ExitSender, mpsc::Receiver<VmEvent>) {
        let (tx, rx) = mpsc::channel();
        (ExitSender { tx, exiting: Arc::new(AtomicBool::new(false)) }, rx)
    }

    /// Reports `exit`. Ignored once the VM is gone.
    pub fn send(&self, exit: VmExit) {
        self.exiting.store(true, Ordering::SeqCst);
        let _ = self.tx.send(VmEvent::Exit(exit));
    }

    /// Whether an exit was reported: vCPUs stop at their next exit instead
    /// of running on (a guest that asked for a reset keeps trying other
    /// reset methods, down to a triple fault).
    pub fn exiting(&self) -> bool {
        self.exiting.load(Ordering::SeqCst)
    }

    /// Asks for a snapshot (see [`crate::snapshot`]).
    pub fn request_snapshot(&self) {
        let _ = self.tx.send(VmEvent::Snapshot);
    }

    /// Asks every vCPU to describe itself on stderr, without stopping.
    pub fn request_dump(&self) {
        let _ = self.tx.send(VmEvent::DumpVcpus);
    }
}
