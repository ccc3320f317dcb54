//! The allow-list of each thread kind.
//!
//! Found by running the VMM under `strace -f -Y` while it boots a guest
//! whose agent runs containers over vsock and virtio-fs (the
//! `agent_containers` and `vmm_boot` end-to-end tests), by reading the
//! code paths a guest can reach from each thread (device activation and
//! reset on vCPU threads, every FUSE operation on the fs thread), and by
//! `--seccomp-log` runs. Where an argument decides whether a call is
//! harmless (ioctl requests, socket families, open flags on vCPU threads,
//! prctl options) only the values the VMM uses are allowed.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::ThreadKind;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// An allowed call whose argument `arg` equals one of `values`.
fn arg_in(arg: u8, values: &[u64]) -> Vec<SeccompRule> {
    values
        .iter()
        .filter_map(|&v| {
            let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v).ok()?;
            SeccompRule::new(vec![cond]).ok()
        })
        .collect()
}

fn allow(rules: &mut Rules, calls: &[i64]) {
    for &c in calls {
        rules.insert(c, Vec::new());
    }
}

/// What every thread needs: memory, locks, time, logging to stderr,
/// signals, and ending (or aborting).
fn common(rules: &mut Rules) {
    allow(
        rules,
        &[
            // Allocation (glibc malloc arenas, thread stacks).
            libc::SYS_brk,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mprotect,
            libc::SYS_madvise,
            libc::SYS_mremap,
            // Mutexes, condition variables, channels, joins.
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            // Time (normally the vDSO) and sleeps.
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            // Logging and panics to stderr; closing what a thread owns.
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            // Per-thread hash keys.
            libc::SYS_getrandom,
            // Signals, thread exit, abort().
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_tgkill,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ],
    );
    // Thread names (std sets them at thread start).
    rules.insert(libc::SYS_prctl, arg_in(0, &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64]));
    // Cloning an eventfd (F_DUPFD_CLOEXEC); debug builds check an fd with
    // F_GETFD before closing it.
    rules.insert(libc::SYS_fcntl, arg_in(1, &[libc::F_GETFD as u64, libc::F_DUPFD_CLOEXEC as u64]));
}

/// Eventfds and epoll: queue notifications, interrupts, worker stop signals.
fn event_loop(rules: &mut Rules) {
    allow(
        rules,
        &[
            libc::SYS_read,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_eventfd2,
        ],
    );
}

/// The calls of `kind`'s threads.
pub(super) fn allowed(kind: ThreadKind) -> Rules {
    let mut rules = Rules::new();
    common(&mut rules);
    match kind {
        ThreadKind::Vmm => vmm(&mut rules),
        ThreadKind::Vcpu => vcpu(&mut rules),
        ThreadKind::Vsock => vsock(&mut rules),
        ThreadKind::Fs => fs(&mut rules),
        ThreadKind::Net => net(&mut rules),
        ThreadKind::Spawner => {
            // Device threads start here and inherit this filter until they
            // install their own: the union of both, plus thread creation.
            vsock(&mut rules);
            fs(&mut rules);
            net(&mut rules);
            spawner(&mut rules);
        }
    }
    rules
}

/// The main thread once the VM runs: waits for the exit, kicks vCPU threads
/// out of KVM_RUN (tgkill, in `common`), joins them, and drops the devices:
/// stopping their workers and removing the vsock socket file if it is
/// still ours.
fn vmm(rules: &mut Rules) {
    allow(
        rules,
        &[
            libc::SYS_read,
            libc::SYS_epoll_ctl,
            libc::SYS_statx,
            libc::SYS_newfstatat,
            libc::SYS_unlink,
            libc::SYS_shutdown,
            // The signal thread.
            libc::SYS_rt_sigtimedwait,
            // A snapshot's files (created with the flags below).
            libc::SYS_pwrite64,
            libc::SYS_ftruncate,
            libc::SYS_fsync,
        ],
    );
    // A snapshot: `File::create` of its two files, and reading the state
    // of the stopped vCPUs and of the VM.
    let create = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC) as u64;
    rules.insert(libc::SYS_openat, arg_in(2, &[create]));
    rules.insert(libc::SYS_ioctl, arg_in(1, &SNAPSHOT_IOCTLS));
}

const fn kvm_iow_r(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}

/// The KVM ioctls of a snapshot (main thread, every vCPU stopped).
const SNAPSHOT_IOCTLS: [u64; 13] = {
    use kvm_bindings::*;
    use std::mem::size_of;
    [
        kvm_ior(0x81, size_of::<kvm_regs>()),
        kvm_ior(0x83, size_of::<kvm_sregs>()),
        kvm_iow_r(0x88, size_of::<kvm_msrs>()),
        kvm_iow_r(0x91, size_of::<kvm_cpuid2>()),
        kvm_ior(0x8e, size_of::<kvm_lapic_state>()),
        kvm_ior(0x98, size_of::<kvm_mp_state>()),
        kvm_ior(0x9f, size_of::<kvm_vcpu_events>()),
        kvm_ior(0xa1, size_of::<kvm_debugregs>()),
        kvm_ior(0xa4, size_of::<kvm_xsave>()),
        kvm_ior(0xa6, size_of::<kvm_xcrs>()),
        kvm_iow_r(0x62, size_of::<kvm_irqchip>()),
        kvm_ior(0x7c, size_of::<kvm_clock_data>()),
        kvm_ior(0x9f, size_of::<kvm_pit_state2>()),
    ]
};

/// `_IO(KVMIO, nr)` / `_IOR(KVMIO, nr, size)` as the kernel encodes them.
const fn kvm_io(nr: u64) -> u64 {
    (0xae << 8) | nr
}

const fn kvm_ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}

/// KVM ioctls a vCPU thread makes: run, read registers for crash dumps
/// and profile samples, and translate a guest address for a sample's
/// per-cpu word (`KVM_RUN`, `KVM_GET_REGS`, `KVM_GET_SREGS`,
/// `KVM_TRANSLATE`; see `crate::profile`).
const VCPU_IOCTLS: [u64; 4] = [
    kvm_io(0x80),
    kvm_ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>()),
    kvm_ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>()),
    kvm_iow_r(0x85, std::mem::size_of::<kvm_bindings::kvm_translation>()),
];

/// vCPU threads: KVM_RUN and the device models behind MMIO and port I/O
/// exits. Those include what the guest driver can trigger at any time:
/// activating a device (eventfds, asking the spawner for a thread) and
/// resetting it (stopping its worker, dropping vsock connections and the
/// old virtio-fs server; the new server is built on an fs thread). No
/// files are opened here.
fn vcpu(rules: &mut Rules) {
    event_loop(rules);
    rules.insert(libc::SYS_ioctl, arg_in(1, &VCPU_IOCTLS));
    allow(rules, &[libc::SYS_shutdown]);
}

/// The vsock worker: its epoll loop and the Unix sockets of the hybrid
/// backend (accepting host clients, connecting guest connections to
/// `<uds>_<port>`, moving bytes).
fn vsock(rules: &mut Rules) {
    event_loop(rules);
    allow(rules, &[libc::SYS_accept4, libc::SYS_connect, libc::SYS_recvfrom, libc::SYS_sendto, libc::SYS_shutdown, libc::SYS_fcntl]);
    rules.insert(libc::SYS_socket, arg_in(0, &[libc::AF_UNIX as u64]));
    rules.insert(libc::SYS_ioctl, arg_in(1, &[libc::FIONBIO]));
}

/// The virtio-fs worker: the passthrough file system serving every FUSE
/// operation the guest may send, confined to the share by the backend
/// (`openat` relative to inode fds, `O_NOFOLLOW`, names checked), and the
/// per-request credential switch.
fn fs(rules: &mut Rules) {
    event_loop(rules);
    allow(
        rules,
        &[
            // The worker's own umask (unshare(CLONE_FS)).
            libc::SYS_unshare,
            libc::SYS_umask,
            // Lookups and attributes.
            libc::SYS_openat,
            libc::SYS_open,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_readlinkat,
            libc::SYS_fstatfs,
            libc::SYS_statfs,
            libc::SYS_lseek,
            libc::SYS_getdents64,
            libc::SYS_dup,
            libc::SYS_fcntl,
            libc::SYS_flock,
            // Data.
            libc::SYS_write,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_fallocate,
            libc::SYS_ftruncate,
            // Changing the tree.
            libc::SYS_mkdirat,
            libc::SYS_mknodat,
            libc::SYS_mknod,
            libc::SYS_unlinkat,
            libc::SYS_renameat2,
            libc::SYS_linkat,
            libc::SYS_symlinkat,
            libc::SYS_fchmod,
            libc::SYS_fchmodat,
            libc::SYS_fchownat,
            libc::SYS_fchown,
            libc::SYS_utimensat,
            // Extended attributes (through /proc/self/fd paths or fds).
            libc::SYS_getxattr,
            libc::SYS_lgetxattr,
            libc::SYS_fgetxattr,
            libc::SYS_setxattr,
            libc::SYS_lsetxattr,
            libc::SYS_fsetxattr,
            libc::SYS_listxattr,
            libc::SYS_llistxattr,
            libc::SYS_flistxattr,
            libc::SYS_removexattr,
            libc::SYS_lremovexattr,
            libc::SYS_fremovexattr,
            // Creating files with the caller's uid/gid (per thread) and
            // the DAC capabilities it keeps (capget/capset, `fs::creds`).
            libc::SYS_setresuid,
            libc::SYS_setresgid,
            libc::SYS_getuid,
            libc::SYS_getgid,
            libc::SYS_geteuid,
            libc::SYS_getegid,
            libc::SYS_capget,
            libc::SYS_capset,
        ],
    );
}

/// The net worker: its epoll loop (in `event_loop`: `read` of frames
/// from the tap, epoll_ctl to stop and resume polling it), `writev` of
/// frames to the tap (in `common`), and turning the tap's offloads on and
/// off for what the driver negotiated (TUNSETOFFLOAD, the only ioctl). The
/// tap was opened and configured before the VM ran; nothing is opened here.
fn net(rules: &mut Rules) {
    event_loop(rules);
    // Added to, not replacing, what another kind allows (the spawner's union).
    rules.entry(libc::SYS_ioctl).or_default().extend(arg_in(1, &[libc::TUNSETOFFLOAD]));
}

/// The spawner: creating threads, which then confine themselves.
fn spawner(rules: &mut Rules) {
    allow(rules, &[libc::SYS_clone3, libc::SYS_clone, libc::SYS_set_robust_list, libc::SYS_rseq, libc::SYS_seccomp]);
    rules.insert(libc::SYS_prctl, arg_in(0, &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64]));
}
