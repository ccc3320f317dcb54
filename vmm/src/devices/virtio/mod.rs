//! Virtio devices and their virtio-mmio transport.
//!
//! The transport (`mmio`) owns the registers and the feature/queue
//! negotiation; a device implements [`VirtioDevice`] and is handed its queues
//! and an [`Interrupt`] when the driver sets DRIVER_OK.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;

/// virtio-mmio InterruptStatus bit: the device used buffers.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// virtio-mmio InterruptStatus bit: the configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// Errors a device can report when the driver activates it.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("expected {expected} queues, the driver enabled {got}")]
    QueueCount { expected: usize, got: usize },
    /// A host resource (thread, socket, epoll) could not be set up.
    #[error("cannot activate device: {0}")]
    Io(std::io::Error),
    /// The device cannot work with what the driver negotiated.
    #[error("invalid driver configuration: {0}")]
    BadConfig(String),
}

// A leaf, only ever logged with `{e}`: its cause is in its message, not a
// `source()` as well.
impl From<std::io::Error> for ActivateError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// The interrupt line of one virtio-mmio device: a status word the guest
/// reads through the transport, and an irqfd wired to the device's GSI.
///
/// It is also how a running device tells its transport that it is broken:
/// a worker thread that finds a queue the driver corrupted (an available
/// index more than a queue size ahead, rings it cannot read) calls
/// [`set_needs_reset`](Self::set_needs_reset) and stops processing; the
/// transport then shows DEVICE_NEEDS_RESET in Status until the driver resets
/// the device.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    needs_reset: AtomicBool,
}

impl Interrupt {
    /// Wraps an eventfd that KVM delivers as the device's interrupt (irqfd).
    pub fn new(irqfd: EventFd) -> Self {
        Self { status: AtomicU32::new(0), irqfd, needs_reset: AtomicBool::new(false) }
    }

    /// Marks the device broken (DEVICE_NEEDS_RESET) and raises a
    /// configuration-change interrupt so the driver looks at Status.
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            if let Err(e) = self.trigger(VIRTIO_MMIO_INT_CONFIG) {
                tracing::error!("virtio: cannot raise the config interrupt: {e}");
            }
        }
    }

    /// Whether the device marked itself broken since the last reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Clears the broken mark (the transport reset the device).
    pub fn clear_needs_reset(&self) {
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Raises the interrupt with the given InterruptStatus bit(s).
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// After used buffers were added to `queue`: raises the vring interrupt
    /// unless the driver asked not to be told (event index). An unreadable
    /// ring gets the interrupt anyway; `device` names the failure's source.
    pub(crate) fn signal_used(&self, device: &str, queue: &mut Queue, mem: &GuestMemoryMmap) {
        use virtio_queue::QueueT;
        if matches!(queue.needs_notification(mem), Ok(false)) {
            return;
        }
        if let Err(e) = self.trigger(VIRTIO_MMIO_INT_VRING) {
            tracing::error!("{device}: cannot raise the interrupt: {e}");
        }
    }

    /// The current InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd behind the line (for registering it with KVM, or for tests).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// A queue handed to a device on activation, with the eventfd the transport
/// signals when the driver writes QueueNotify for it.
#[derive(Debug)]
pub struct ActiveQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

/// What every virtio device offers its transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (e.g. 1 for net, 19 for vsock, 26 for fs).
    fn device_type(&self) -> u32;
    /// The maximum size of each of the device's queues; its length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (including VIRTIO_F_VERSION_1).
    fn avail_features(&self) -> u64;
    /// The feature bits the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored where read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device: from here it processes `queues` (in queue-index order)
    /// against `mem`, and raises `interrupt` when it has used buffers.
    fn activate(&mut self, mem: GuestMemoryMmap, interrupt: Arc<Interrupt>, queues: Vec<ActiveQueue>) -> Result<(), ActivateError>;
    /// For a snapshot: stops the running device for good and returns its
    /// queues as its worker left them (`None`: it was not running). An
    /// error says why this device's state cannot be snapshotted.
    fn quiesce(&mut self) -> Result<Option<Vec<Queue>>, String> {
        Ok(None)
    }
    /// The next [`activate`](Self::activate) resumes a snapshot: the queues
    /// carry the indices of the VM the snapshot was taken of.
    fn prepare_restore(&mut self) {}
    /// Stops the device after the driver wrote 0 to Status; returns false if it cannot be reset.
    fn reset(&mut self) -> bool {
        false
    }
}

/// A driver's read of `data.len()` bytes at `offset` of a device's config
/// space `cfg`: bytes past its end read as 0, and a read that starts past
/// it is a guest mistake worth a (rate-limited) warning naming `device`.
pub(crate) fn read_config_space(device: &str, cfg: &[u8], offset: u64, data: &mut [u8]) {
    let Some(start) = usize::try_from(offset).ok().filter(|o| *o < cfg.len()) else {
        crate::guest_warn!(offset, device, "config read out of range");
        data.fill(0);
        return;
    };
    let n = data.len().min(cfg.len() - start);
    data[..n].copy_from_slice(&cfg[start..start + n]);
    data[n..].fill(0);
}

/// Blocks until `kill` is signalled (a broken device waits for its reset).
pub(crate) fn wait_for_kill(kill: &EventFd) {
    let mut pfd = libc::pollfd { fd: std::os::unix::io::AsRawFd::as_raw_fd(kill), events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and
        // the count is 1.
        let r = unsafe { libc::poll(&mut pfd, 1, -1) };
        if r > 0 || (r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted) {
            return;
        }
    }
}
