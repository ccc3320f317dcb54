//! The virtio-fs device: configuration space (`tag[36]`,
//! `num_request_queues`), features, activation (spawns the worker) and
//! reset.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{debug, error, info, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::backend::{build_server, FsServer};
use super::defs::{CONFIG_SPACE_SIZE, NUM_QUEUES, NUM_REQUEST_QUEUES, QUEUE_SIZE, TAG_LEN};
use super::event_loop::FsWorker;
use super::stats::RequestStats;
use super::{FsConfig, FsError};
use crate::devices::virtio::{ActivateError, ActiveQueue, Interrupt, VirtioDevice};

const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];

/// Feature bits the device offers.
pub(crate) const AVAIL_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// A running worker thread and the eventfd that stops it.
struct Worker {
    kill: EventFd,
    handle: JoinHandle<(RequestStats, Vec<ActiveQueue>)>,
}

/// A virtio-fs device sharing one host directory.
pub struct Fs {
    config: FsConfig,
    root: PathBuf,
    config_space: [u8; CONFIG_SPACE_SIZE],
    acked_features: u64,
    /// The FUSE server; `None` only if rebuilding it after a reset failed.
    server: Option<Arc<FsServer>>,
    worker: Option<Worker>,
}

impl fmt::Debug for Fs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fs")
            .field("config", &self.config)
            .field("root", &self.root)
            .field("acked_features", &self.acked_features)
            .field("active", &self.worker.is_some())
            .finish()
    }
}

/// The device's configuration space: the NUL-padded tag, then
/// `num_request_queues` (little endian).
fn config_space(tag: &str) -> [u8; CONFIG_SPACE_SIZE] {
    let mut space = [0u8; CONFIG_SPACE_SIZE];
    let tag = tag.as_bytes();
    let n = tag.len().min(TAG_LEN);
    space[..n].copy_from_slice(&tag[..n]);
    // NUM_REQUEST_QUEUES is a small constant.
    #[allow(clippy::cast_possible_truncation)]
    let nrq = NUM_REQUEST_QUEUES as u32;
    space[TAG_LEN..].copy_from_slice(&nrq.to_le_bytes());
    space
}

/// Raises the soft limit on open files to the hard limit: the backend holds
/// one descriptor per inode the guest knows of. Best effort.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the rlimit struct we pass, which lives
    // for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit only reads the rlimit struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            debug!("virtio-fs: cannot raise RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
        }
    }
}

/// A thread name from the tag (Linux keeps 15 bytes).
fn thread_name(tag: &str) -> String {
    let mut name = format!("fs-{tag}");
    let mut end = name.len().min(15);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.truncate(end);
    name
}

impl Fs {
    /// Validates `config` (tag, shared directory, running as root) and sets
    /// up the passthrough file system. Nothing is opened in the share until
    /// the guest's FUSE INIT.
    pub fn new(config: FsConfig) -> Result<Fs, FsError> {
        let root = config.validate()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(FsError::NotRoot(euid));
        }
        raise_nofile_limit();
        let server = build_server(&config, &root)?;
        Ok(Fs { config_space: config_space(&config.tag), config, root, acked_features: 0, server: Some(Arc::new(server)), worker: None })
    }

    /// The mount tag.
    pub fn tag(&self) -> &str {
        &self.config.tag
    }

    /// The configuration the device was built from.
    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// The canonical path of the shared directory.
    pub fn shared_dir(&self) -> &Path {
        &self.root
    }

    /// Whether the worker thread runs.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// Stops the worker; returns what it served and its queues.
    fn stop_worker(&mut self) -> Option<(RequestStats, Vec<ActiveQueue>)> {
        if let Some(worker) = self.worker.take() {
            if let Err(e) = worker.kill.write(1) {
                error!("virtio-fs {}: cannot stop the worker: {e}", self.config.tag);
                return None;
            }
            match worker.handle.join() {
                // For benchmarks: CARAPACE_VMM_LOG=carapace_vmm::devices::virtio::fs=info.
                Ok((stats, queues)) => {
                    info!("virtio-fs {}: served {stats}", self.config.tag);
                    return Some((stats, queues));
                }
                Err(_) => error!("virtio-fs {}: the worker panicked", self.config.tag),
            }
        }
        None
    }
}

impl Fs {
    /// Builds a fresh FUSE server on a short-lived thread confined like the
    /// worker: a reset runs on a vCPU thread, whose seccomp filter does not
    /// open files (the server opens `/proc/self/fd` and mountinfo).
    fn build_confined(&self) -> Result<FsServer, FsError> {
        let (config, root) = (self.config.clone(), self.root.clone());
        let backend_err = |source| FsError::Backend { path: self.root.clone(), source };
        let handle =
            crate::seccomp::spawn(crate::seccomp::ThreadKind::Fs, thread_name(&self.config.tag), move || build_server(&config, &root))
                .map_err(backend_err)?;
        handle.join().map_err(|_| backend_err(std::io::Error::other("the thread building the server panicked")))?
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        let unknown = features & !AVAIL_FEATURES;
        if unknown != 0 {
            warn!("virtio-fs {}: driver acked unoffered features {unknown:#x}", self.config.tag);
        }
        self.acked_features = features & AVAIL_FEATURES;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset).ok();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = start.and_then(|s| s.checked_add(i)).and_then(|j| self.config_space.get(j)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!("virtio-fs {}: ignoring a {}-byte config write at {offset}", self.config.tag, data.len());
    }

    fn activate(&mut self, mem: GuestMemoryMmap, interrupt: Arc<Interrupt>, queues: Vec<ActiveQueue>) -> Result<(), ActivateError> {
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount { expected: NUM_QUEUES, got: queues.len() });
        }
        if self.worker.is_some() {
            return Err(ActivateError::BadConfig("virtio-fs device already active".into()));
        }
        let Some(server) = self.server.clone() else {
            return Err(ActivateError::BadConfig(format!("virtio-fs {}: backend unavailable after a failed reset", self.config.tag)));
        };
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let worker_kill = kill.try_clone()?;
        let worker = FsWorker::new(server, mem, interrupt, queues);
        let handle = crate::seccomp::spawn(crate::seccomp::ThreadKind::Fs, thread_name(&self.config.tag), move || worker.run(worker_kill))?;
        self.worker = Some(Worker { kill, handle });
        Ok(())
    }

    fn quiesce(&mut self) -> Result<Option<Vec<virtio_queue::Queue>>, String> {
        if self.worker.is_none() {
            return Ok(None);
        }
        let Some((stats, queues)) = self.stop_worker() else {
            return Err("cannot stop the virtio-fs worker".into());
        };
        // A snapshot carries no FUSE state: a share the guest already
        // mounted (any request served) would be broken after a restore.
        if stats.total() != 0 {
            return Err(format!(
                "the guest already used share {:?} ({} FUSE requests); snapshot before mounting it",
                self.config.tag,
                stats.total()
            ));
        }
        Ok(Some(queues.into_iter().map(|q| q.queue).collect()))
    }

    fn reset(&mut self) -> bool {
        let _ = self.stop_worker();
        if self.worker.is_some() {
            return false;
        }
        self.acked_features = 0;
        // Start over with a fresh file system: the next driver's INIT must
        // not find the old driver's inodes and open files.
        self.server = None;
        match self.build_confined() {
            Ok(server) => {
                self.server = Some(Arc::new(server));
                true
            }
            Err(e) => {
                error!("virtio-fs {}: cannot reset: {e}", self.config.tag);
                false
            }
        }
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        let _ = self.stop_worker();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::cast_sign_loss)]
mod tests {
    use std::os::unix::io::AsRawFd;

    use fuse_backend_rs::abi::fuse_abi::{InitIn, InitOut, Opcode, OutHeader, KERNEL_VERSION};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{ByteValued, Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::fs::test_utils::{fs_config, in_header, test_mem};
    use crate::devices::virtio::fs::{CacheMode, FsConfigError};
    use crate::devices::virtio::VIRTIO_MMIO_INT_VRING;

    fn new_fs(tag: &str) -> (tempfile::TempDir, Fs) {
        let dir = tempfile::tempdir().unwrap();
        let fs = Fs::new(fs_config(tag, dir.path(), false, CacheMode::Auto)).unwrap();
        (dir, fs)
    }

    #[test]
    fn identity_and_features() {
        let (_dir, fs) = new_fs("rootfs");
        assert_eq!(fs.device_type(), 26);
        assert_eq!(fs.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        assert_ne!(fs.avail_features() & (1 << 32), 0, "VIRTIO_F_VERSION_1");
        assert_ne!(fs.avail_features() & (1 << 29), 0, "VIRTIO_RING_F_EVENT_IDX");
        assert_ne!(fs.avail_features() & (1 << 28), 0, "VIRTIO_RING_F_INDIRECT_DESC");
        assert_eq!(fs.tag(), "rootfs");
        assert!(!fs.is_active());
    }

    #[test]
    fn acked_features_are_masked() {
        let (_dir, mut fs) = new_fs("t");
        fs.set_acked_features(u64::MAX);
        assert_eq!(fs.acked_features, AVAIL_FEATURES);
    }

    #[test]
    fn config_space_layout() {
        let (_dir, fs) = new_fs("myfs");
        let mut all = [0xffu8; CONFIG_SPACE_SIZE];
        fs.read_config(0, &mut all);
        assert_eq!(&all[..4], b"myfs");
        assert!(all[4..TAG_LEN].iter().all(|&b| b == 0), "tag is NUL padded");
        assert_eq!(u32::from_le_bytes(all[TAG_LEN..].try_into().unwrap()), 1);

        // Partial and unaligned reads.
        let mut nrq = [0u8; 4];
        fs.read_config(TAG_LEN as u64, &mut nrq);
        assert_eq!(u32::from_le_bytes(nrq), 1);
        let mut two = [0u8; 2];
        fs.read_config(1, &mut two);
        assert_eq!(&two, b"yf");

        // Past the end reads as zeros; huge offsets do not overflow.
        let mut tail = [0xffu8; 8];
        fs.read_config(CONFIG_SPACE_SIZE as u64 - 2, &mut tail);
        assert_eq!(tail, [0, 0, 0, 0, 0, 0, 0, 0]);
        let mut far = [0xffu8; 4];
        fs.read_config(u64::MAX, &mut far);
        assert_eq!(far, [0; 4]);
    }

    #[test]
    fn config_space_full_length_tag() {
        let tag = "t".repeat(TAG_LEN);
        let (_dir, mut fs) = new_fs(&tag);
        let mut all = [0u8; CONFIG_SPACE_SIZE];
        fs.read_config(0, &mut all);
        assert_eq!(&all[..TAG_LEN], tag.as_bytes());
        // Writes are ignored.
        fs.write_config(0, b"evil");
        fs.read_config(0, &mut all);
        assert_eq!(&all[..TAG_LEN], tag.as_bytes());
    }

    #[test]
    fn new_rejects_bad_configs() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = Fs::new(fs_config("t", &missing, false, CacheMode::Auto)).unwrap_err();
        assert!(err.to_string().contains(missing.to_str().unwrap()), "{err}");

        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = Fs::new(fs_config("t", &file, false, CacheMode::Auto)).unwrap_err();
        assert!(matches!(err, FsError::Config(FsConfigError::SharedDirNotADirectory(_))), "{err}");
        assert!(err.to_string().contains("not a directory"), "{err}");

        let err = Fs::new(fs_config("", dir.path(), false, CacheMode::Auto)).unwrap_err();
        assert!(matches!(err, FsError::Config(FsConfigError::EmptyTag)));
        let long = "x".repeat(37);
        let err = Fs::new(fs_config(&long, dir.path(), false, CacheMode::Auto)).unwrap_err();
        assert!(matches!(err, FsError::Config(FsConfigError::TagTooLong { .. })));
    }

    #[test]
    fn new_requires_root() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = fs_config("t", dir.path(), false, CacheMode::Auto);
        let result = std::thread::spawn(move || {
            // Drop the effective uid of this thread only (the raw syscall,
            // unlike libc's wrapper, is per thread).
            // SAFETY: setresuid touches no memory; -1 keeps a field as is.
            let rc = unsafe { libc::syscall(libc::SYS_setresuid, -1, 65534, -1) };
            assert_eq!(rc, 0);
            Fs::new(cfg).map(|_| ())
        })
        .join()
        .unwrap();
        let err = result.unwrap_err();
        assert!(matches!(err, FsError::NotRoot(65534)), "{err}");
        assert!(err.to_string().contains("root"), "{err}");
    }

    #[test]
    fn thread_names_fit() {
        assert_eq!(thread_name("rootfs"), "fs-rootfs");
        assert_eq!(thread_name(&"a".repeat(36)).len(), 15);
        assert!(thread_name(&"é".repeat(18)).len() <= 15);
    }

    #[test]
    fn activate_checks_queue_count() {
        let (_dir, mut fs) = new_fs("t");
        let mem = test_mem();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let queues = vec![ActiveQueue { queue: Queue::new(QUEUE_SIZE).unwrap(), notify: EventFd::new(libc::EFD_NONBLOCK).unwrap() }];
        let err = fs.activate(mem, interrupt, queues).unwrap_err();
        assert!(matches!(err, ActivateError::QueueCount { expected: 2, got: 1 }), "{err}");
        assert!(!fs.is_active());
    }

    /// Waits (generously, without asserting on time) for the irqfd.
    fn wait_irq(interrupt: &Interrupt) -> bool {
        let mut pfd = libc::pollfd { fd: interrupt.irqfd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, living across the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 60_000) };
        n == 1 && interrupt.irqfd().read().is_ok()
    }

    /// The whole path through the worker thread: queue notify -> epoll ->
    /// FUSE INIT -> used ring -> interrupt; then reset and a second
    /// activation.
    #[test]
    fn worker_serves_the_request_queue_and_resets() {
        let (_dir, mut fs) = new_fs("work");
        fs.set_acked_features(AVAIL_FEATURES);
        let mem = test_mem();

        for round in 0..2u64 {
            let hiprio = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
            let req = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
            let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
            let req_notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let notify_handle = req_notify.try_clone().unwrap();
            let queues = vec![
                ActiveQueue { queue: hiprio.create_queue().unwrap(), notify: EventFd::new(libc::EFD_NONBLOCK).unwrap() },
                ActiveQueue { queue: req.create_queue().unwrap(), notify: req_notify },
            ];
            fs.activate(mem.clone(), interrupt.clone(), queues).unwrap();
            assert!(fs.is_active());

            // INIT on the request queue.
            let unique = 7 + round;
            let init = InitIn { major: KERNEL_VERSION, minor: 31, max_readahead: 0, flags: 0 };
            let mut bytes = in_header(Opcode::Init as u32, unique, 0, init.as_slice().len()).as_slice().to_vec();
            bytes.extend_from_slice(init.as_slice());
            mem.write_slice(&bytes, GuestAddress(0x20000)).unwrap();
            let descs = [
                RawDescriptor::from(SplitDescriptor::new(0x20000, u32::try_from(bytes.len()).unwrap(), VRING_DESC_F_NEXT as u16, 1)),
                RawDescriptor::from(SplitDescriptor::new(0x30000, 0x1000, VRING_DESC_F_WRITE as u16, 0)),
            ];
            req.add_desc_chains(&descs, 0).unwrap();
            notify_handle.write(1).unwrap();

            assert!(wait_irq(&interrupt), "no interrupt from the worker");
            assert_ne!(interrupt.status() & VIRTIO_MMIO_INT_VRING, 0);
            assert_eq!(req.used().idx().load(), 1);
            let used = req.used().ring().ref_at(0).unwrap().load();
            assert_eq!(used.id(), 0);
            let out: OutHeader = mem.read_obj(GuestAddress(0x30000)).unwrap();
            assert_eq!(out.error, 0);
            assert_eq!(out.unique, unique);
            assert_eq!(used.len(), out.len);
            let init_out: InitOut = mem.read_obj(GuestAddress(0x30010)).unwrap();
            assert_eq!(init_out.major, KERNEL_VERSION);

            assert!(fs.reset(), "reset must succeed");
            assert!(!fs.is_active());
            assert_eq!(fs.acked_features, 0);
        }
    }

    fn thread_umask() -> u32 {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line.trim_start_matches("Umask:").trim(), 8).unwrap()
    }

    /// The backend clears the umask when the guest mounts; that must stay
    /// on the worker thread and not loosen the modes of files the rest of
    /// the VMM creates.
    #[test]
    fn guest_mount_leaves_the_vmm_umask_alone() {
        // This test thread gets its own umask, which the worker would share
        // if it did not detach.
        // SAFETY: unshare(CLONE_FS) only detaches this thread's fs attributes.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_FS) }, 0);
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(0o027) };
        assert_eq!(thread_umask(), 0o027);

        let (_dir, mut fs) = new_fs("umask");
        let mem = test_mem();
        let hiprio = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let req = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let init = InitIn { major: KERNEL_VERSION, minor: 31, max_readahead: 0, flags: 0 };
        let mut bytes = in_header(Opcode::Init as u32, 1, 0, init.as_slice().len()).as_slice().to_vec();
        bytes.extend_from_slice(init.as_slice());
        mem.write_slice(&bytes, GuestAddress(0x20000)).unwrap();
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x20000, u32::try_from(bytes.len()).unwrap(), VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x30000, 0x1000, VRING_DESC_F_WRITE as u16, 0)),
        ];
        // Queued before activation: the worker's first pass picks it up.
        req.add_desc_chains(&descs, 0).unwrap();
        let queues = vec![
            ActiveQueue { queue: hiprio.create_queue().unwrap(), notify: EventFd::new(libc::EFD_NONBLOCK).unwrap() },
            ActiveQueue { queue: req.create_queue().unwrap(), notify: EventFd::new(libc::EFD_NONBLOCK).unwrap() },
        ];
        fs.activate(mem.clone(), interrupt.clone(), queues).unwrap();
        assert!(wait_irq(&interrupt), "no interrupt from the worker");
        let out: OutHeader = mem.read_obj(GuestAddress(0x30000)).unwrap();
        assert_eq!(out.error, 0, "INIT failed");
        assert_eq!(thread_umask(), 0o027, "the worker changed the VMM's umask");
    }

    /// The driver's side of a virtio-mmio handshake, through the real
    /// transport: identification, features, queues, DRIVER_OK, a FUSE INIT
    /// on the request queue, the interrupt, then a reset.
    #[test]
    fn works_behind_the_mmio_transport() {
        use crate::devices::bus::BusDevice;
        use crate::devices::virtio::mmio::MmioTransport;
        use virtio_bindings::virtio_config::{
            VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
        };
        use virtio_bindings::virtio_mmio::*;

        fn rd(t: &mut MmioTransport, reg: u32) -> u32 {
            let mut b = [0u8; 4];
            t.read(u64::from(reg), &mut b);
            u32::from_le_bytes(b)
        }
        fn wr(t: &mut MmioTransport, reg: u32, v: u32) {
            t.write(u64::from(reg), &v.to_le_bytes());
        }

        let (_dir, fs) = new_fs("viammio");
        let mem = test_mem();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut t = MmioTransport::new(mem.clone(), Box::new(fs), interrupt.clone());

        assert_eq!(rd(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), 26);
        let mut tag = [0u8; 8];
        t.read(u64::from(VIRTIO_MMIO_CONFIG), &mut tag);
        assert_eq!(&tag[..7], b"viammio");
        let mut nrq = [0u8; 4];
        t.read(u64::from(VIRTIO_MMIO_CONFIG) + TAG_LEN as u64, &mut nrq);
        let nrq = u32::from_le_bytes(nrq);
        assert_eq!(nrq, 1);

        wr(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        wr(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        let mut features = 0u64;
        for sel in 0..2u32 {
            wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
            features |= u64::from(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES)) << (32 * sel);
        }
        assert_eq!(features, AVAIL_FEATURES);
        for sel in 0..2u32 {
            wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        wr(&mut t, VIRTIO_MMIO_STATUS, s);
        assert_ne!(rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);

        // hiprio + `num_request_queues` request queues, as Linux sets them up.
        let mocks = [MockSplitQueue::create(&mem, GuestAddress(0x8000), 16), MockSplitQueue::create(&mem, GuestAddress(0x10000), 16)];
        assert_eq!(mocks.len(), 1 + nrq as usize);
        for (i, q) in mocks.iter().enumerate() {
            wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, i as u32);
            assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
            wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
            wr(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc_table_addr().0 as u32);
            wr(&mut t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
            wr(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail_addr().0 as u32);
            wr(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
            wr(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, q.used_addr().0 as u32);
            wr(&mut t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
            wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        }
        wr(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        assert!(t.is_activated(), "status {:#x}", rd(&mut t, VIRTIO_MMIO_STATUS));

        let init = InitIn { major: KERNEL_VERSION, minor: 36, max_readahead: 0, flags: 0 };
        let mut bytes = in_header(Opcode::Init as u32, 42, 0, init.as_slice().len()).as_slice().to_vec();
        bytes.extend_from_slice(init.as_slice());
        mem.write_slice(&bytes, GuestAddress(0x20000)).unwrap();
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x20000, u32::try_from(bytes.len()).unwrap(), VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x30000, 0x1000, VRING_DESC_F_WRITE as u16, 0)),
        ];
        mocks[1].add_desc_chains(&descs, 0).unwrap();
        // EVENT_IDX: the driver asks for an interrupt on the first used entry.
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert!(wait_irq(&interrupt), "no interrupt");
        assert_ne!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING, 0);
        wr(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        let out: OutHeader = mem.read_obj(GuestAddress(0x30000)).unwrap();
        assert_eq!((out.error, out.unique), (0, 42));
        assert_eq!(mocks[1].used().idx().load(), 1);

        // Driver reset: the worker stops and the device can start over.
        wr(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert!(!t.is_activated());
    }

    #[test]
    fn drop_stops_the_worker() {
        let (_dir, mut fs) = new_fs("drop");
        let mem = test_mem();
        let hiprio = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let req = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let queues = vec![
            ActiveQueue { queue: hiprio.create_queue().unwrap(), notify: EventFd::new(libc::EFD_NONBLOCK).unwrap() },
            ActiveQueue { queue: req.create_queue().unwrap(), notify: EventFd::new(libc::EFD_NONBLOCK).unwrap() },
        ];
        fs.activate(mem.clone(), interrupt.clone(), queues).unwrap();
        let again = (0..NUM_QUEUES)
            .map(|_| ActiveQueue { queue: Queue::new(QUEUE_SIZE).unwrap(), notify: EventFd::new(libc::EFD_NONBLOCK).unwrap() })
            .collect();
        let err = fs.activate(mem, interrupt, again).unwrap_err();
        assert!(matches!(err, ActivateError::BadConfig(_)), "{err}");
        assert!(fs.is_active());
        drop(fs); // joins the worker; a hang here fails the test run
    }
}
