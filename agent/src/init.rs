//! What the agent does first when it is the guest's PID 1: the kernel file
//! systems, cgroup v2 with every controller enabled for children, and the
//! console as stdio.
//!
//! Nothing here is fatal: a failed step is reported and the agent still
//! serves (an agent that exits as PID 1 panics the kernel, and the host
//! learns more from an agent that answers than from a VM that reboots).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::mount::MsFlags;
use nix::sys::stat::Mode;

use crate::sys::Syscall;

/// Where the cgroup v2 hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// One file system to mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountSpec {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
    /// Create the mount point first (it lives on a file system mounted
    /// earlier in the list, not in the initramfs).
    pub mkdir: bool,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC);

/// The guest's kernel file systems, in mount order.
pub const MOUNTS: &[MountSpec] = &[
    MountSpec { source: "proc", target: "/proc", fstype: "proc", flags: NOSUID_NODEV_NOEXEC, data: None, mkdir: false },
    MountSpec { source: "sysfs", target: "/sys", fstype: "sysfs", flags: NOSUID_NODEV_NOEXEC, data: None, mkdir: false },
    MountSpec { source: "devtmpfs", target: "/dev", fstype: "devtmpfs", flags: MsFlags::MS_NOSUID, data: Some("mode=0755"), mkdir: false },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        mkdir: true,
    },
    MountSpec {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
        mkdir: true,
    },
    MountSpec { source: "cgroup2", target: CGROUP_ROOT, fstype: "cgroup2", flags: NOSUID_NODEV_NOEXEC, data: None, mkdir: false },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
        mkdir: false,
    },
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
        mkdir: false,
    },
];

/// A step of guest setup that failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("creating {}: {cause}", path.display())]
    Mkdir { path: PathBuf, cause: io::Error },
    #[error("mounting {fstype} on {target}: {cause}")]
    Mount { fstype: &'static str, target: &'static str, cause: nix::Error },
    #[error("reading {}: {cause}", path.display())]
    Read { path: PathBuf, cause: io::Error },
    #[error("enabling cgroup controllers {controllers:?}: {cause}")]
    Controllers { controllers: String, cause: io::Error },
    #[error("making the root pivotable ({step}): {cause}")]
    Pivotable { step: &'static str, cause: nix::Error },
    #[error("opening /dev/console for stdio: {0}")]
    Console(nix::Error),
}

/// statfs magic numbers of the file systems an initramfs root can be.
const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Where the initramfs root is bind-mounted on its way to becoming `/`.
const ROOT_BIND: &str = "/.carapace-root";

/// pivot_root(2) refuses to move a process whose root is the initramfs
/// (the "rootfs" mount has no parent), and every container pivots. So, as
/// PID 1 on an initramfs, put a bind mount of the root on top of it and
/// move into it (`mount --rbind / X; cd X; mount --move . /; chroot .`):
/// the root is then an ordinary mount and containers can pivot away from
/// it. Six system calls; nothing to do on any other root file system.
pub fn make_root_pivotable() -> Result<(), InitError> {
    let fs = nix::sys::statfs::statfs("/").map_err(|source| InitError::Pivotable { step: "statfs /", cause: source })?;
    #[allow(clippy::unnecessary_cast, reason = "the field's type differs between libcs")]
    let magic = fs.filesystem_type().0 as i64;
    if magic != RAMFS_MAGIC && magic != TMPFS_MAGIC {
        return Ok(());
    }
    let step = |step: &'static str| move |source| InitError::Pivotable { step, cause: source };
    match nix::unistd::mkdir(ROOT_BIND, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(nix::Error::EEXIST) => {}
        Err(e) => return Err(step("mkdir")(e)),
    }
    nix::mount::mount(Some("/"), ROOT_BIND, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
        .map_err(step("bind-mounting /"))?;
    nix::unistd::chdir(ROOT_BIND).map_err(step("chdir"))?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(step("moving the bind mount to /"))?;
    nix::unistd::chroot(".").map_err(step("chroot"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))?;
    Ok(())
}

/// Mounts [`MOUNTS`] and enables the cgroup controllers; returns what
/// failed (the steps after a failure are still tried).
pub fn setup(sys: &dyn Syscall) -> Vec<InitError> {
    let mut errors = mount_all(sys, MOUNTS);
    if let Err(e) = enable_controllers(sys, Path::new(CGROUP_ROOT)) {
        errors.push(e);
    }
    errors
}

/// Mounts `mounts` in order. A mount point that is already mounted (EBUSY)
/// counts as done.
pub fn mount_all(sys: &dyn Syscall, mounts: &[MountSpec]) -> Vec<InitError> {
    let mut errors = Vec::new();
    for m in mounts {
        let target = Path::new(m.target);
        if m.mkdir {
            match sys.mkdir(target, 0o755) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    errors.push(InitError::Mkdir { path: target.to_owned(), cause: source });
                    continue;
                }
            }
        }
        match sys.mount(m.source, target, m.fstype, m.flags, m.data) {
            Ok(()) | Err(nix::Error::EBUSY) => {
                tracing::debug!(fstype = m.fstype, target = m.target, "mounted");
            }
            Err(source) => errors.push(InitError::Mount { fstype: m.fstype, target: m.target, cause: source }),
        }
    }
    errors
}

/// Enables, for the children of the cgroup at `root`, every controller the
/// kernel offers there: reads `cgroup.controllers` and writes them all to
/// `cgroup.subtree_control` in one write (one at a time if that fails, so
/// that one refusing controller does not cost the others).
pub fn enable_controllers(sys: &dyn Syscall, root: &Path) -> Result<(), InitError> {
    let path = root.join("cgroup.controllers");
    let mut buf = [0u8; 512];
    let n = sys.read_file(&path, &mut buf).map_err(|source| InitError::Read { path, cause: source })?;
    let available = String::from_utf8_lossy(&buf[..n]);
    let request = subtree_control_request(&available);
    if request.is_empty() {
        return Ok(());
    }

    let control = root.join("cgroup.subtree_control");
    let Err(all_at_once) = sys.write_file(&control, request.as_bytes()) else {
        tracing::debug!(controllers = %request, "enabled cgroup controllers");
        return Ok(());
    };
    tracing::debug!(error = %all_at_once, "enabling all controllers at once failed; one at a time");
    let mut refused = Vec::new();
    let mut last_error = all_at_once;
    for one in request.split(' ') {
        if let Err(e) = sys.write_file(&control, one.as_bytes()) {
            refused.push(one);
            last_error = e;
        }
    }
    if refused.is_empty() {
        Ok(())
    } else {
        Err(InitError::Controllers { controllers: refused.join(" "), cause: last_error })
    }
}

/// `"cpu memory pids\n"` → `"+cpu +memory +pids"`.
fn subtree_control_request(available: &str) -> String {
    available.split_whitespace().map(|c| format!("+{c}")).collect::<Vec<_>>().join(" ")
}

/// Makes sure fds 0, 1 and 2 are open: the kernel opens `/dev/console` for
/// init when the initramfs has that node; if it did not, open it now (from
/// the devtmpfs) and put it on all three. One `fcntl` when all is well.
pub fn ensure_console_stdio() -> Result<(), InitError> {
    if fcntl(std::io::stderr(), FcntlArg::F_GETFD).is_ok() {
        return Ok(());
    }
    let console: OwnedFd =
        open("/dev/console", OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC, Mode::empty()).map_err(InitError::Console)?;
    for target in 0..=2 {
        if console.as_raw_fd() == target {
            continue;
        }
        // SAFETY: dup2 onto the stdio descriptors, which are closed (that is
        // why we are here) or the console itself; no Rust object owns fds
        // 0-2 in this process, so none is invalidated behind its back.
        if unsafe { libc::dup2(console.as_raw_fd(), target) } < 0 {
            return Err(InitError::Console(nix::Error::last()));
        }
    }
    if (0..=2).contains(&console.as_raw_fd()) {
        // The console landed on a stdio number: keep it open, without
        // close-on-exec, as the stdio it now is.
        let fd = std::os::fd::IntoRawFd::into_raw_fd(console);
        // SAFETY: fd is a valid descriptor we own and deliberately leak.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    }
    Ok(())
}

/// How much heap [`warm_heap`] keeps mapped.
const WARM_HEAP: usize = 4 << 20;

/// Maps heap once, at boot, and keeps it: one arena for every thread,
/// allocations up to 8 MiB from the heap rather than their own mmap,
/// freed memory not handed back. Where a guest page fault costs ~4 ms
/// (kvm_pvm hosts) a container's create touched ~30 new heap pages; a
/// VM restored from a template has these mapped already.
pub fn warm_heap() {
    // SAFETY: mallopt only sets glibc's malloc parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
    let mut heap: Vec<u8> = Vec::with_capacity(WARM_HEAP);
    let base = heap.as_mut_ptr();
    for offset in (0..WARM_HEAP).step_by(4096) {
        // SAFETY: within the allocation; a volatile write, so that the page
        // is touched (calloc'd or not, the compiler may not drop it).
        unsafe { std::ptr::write_volatile(base.add(offset), 0) };
    }
    drop(heap);
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::sys::test_utils::RecordingSyscall as FakeSyscall;

    fn controllers_fake() -> FakeSyscall {
        let mut fake = FakeSyscall::default();
        fake.files.insert("/sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n");
        fake
    }

    #[test]
    fn setup_mounts_in_order_then_enables_controllers() {
        let fake = controllers_fake();
        let errors = setup(&fake);
        assert!(errors.is_empty(), "{errors:?}");
        let calls = fake.calls();
        let expected = [
            "mount proc /proc proc 0xe -",
            "mount sysfs /sys sysfs 0xe -",
            "mount devtmpfs /dev devtmpfs 0x2 mode=0755",
            "mkdir /dev/pts 755",
            "mount devpts /dev/pts devpts 0xa newinstance,ptmxmode=0666,mode=0620,gid=5",
            "mkdir /dev/shm 755",
            "mount shm /dev/shm tmpfs 0x6 mode=1777",
            "mount cgroup2 /sys/fs/cgroup cgroup2 0xe -",
            "mount tmpfs /run tmpfs 0x6 mode=0755",
            "mount tmpfs /tmp tmpfs 0x6 mode=1777",
            "read /sys/fs/cgroup/cgroup.controllers",
            "write /sys/fs/cgroup/cgroup.subtree_control +cpuset +cpu +io +memory +pids",
        ];
        assert_eq!(*calls, expected);
    }

    #[test]
    fn a_failed_mount_does_not_stop_the_others_and_ebusy_is_fine() {
        let mut fake = controllers_fake();
        fake.fail_mounts = vec![("/sys", nix::Error::ENODEV), ("/proc", nix::Error::EBUSY)];
        let errors = setup(&fake);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(matches!(errors[0], InitError::Mount { target: "/sys", .. }));
        assert!(fake.calls().iter().any(|c| c.starts_with("mount tmpfs /tmp")));
    }

    #[test]
    fn controllers_fall_back_to_one_at_a_time() {
        let mut fake = controllers_fake();
        fake.refuse_writes = vec!["+cpuset"];
        let err = enable_controllers(&fake, Path::new(CGROUP_ROOT)).expect_err("cpuset refused");
        match err {
            InitError::Controllers { controllers, .. } => assert_eq!(controllers, "+cpuset"),
            other => panic!("unexpected {other:?}"),
        }
        let calls = fake.calls();
        assert_eq!(calls.len(), 2 + 5, "{calls:?}");
        assert_eq!(calls[6], "write /sys/fs/cgroup/cgroup.subtree_control +pids");
    }

    #[test]
    fn no_controllers_means_no_write() {
        let mut fake = FakeSyscall::default();
        fake.files.insert("/sys/fs/cgroup/cgroup.controllers", "\n");
        enable_controllers(&fake, Path::new(CGROUP_ROOT)).expect("nothing to do");
        assert_eq!(fake.calls().len(), 1);
    }

    #[test]
    fn request_format() {
        assert_eq!(subtree_control_request("cpu  memory\n"), "+cpu +memory");
        assert_eq!(subtree_control_request(""), "");
    }
}
