//! virtio-net with a tap backend.
//!
//! The device ([`Net`]) owns two virtqueues (receive and transmit; no
//! control queue, no multiqueue) and moves Ethernet frames between them and
//! a [`NetBackend`]. The production backend, [`Tap`], is a Linux tap file
//! opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte
//! virtio-net header: either inherited from the runtime (`fd=N`, the tap was
//! created and attached to the sandbox's network by it) or opened by the VMM
//! by name in its own network namespace.
//!
//! Offered features: VERSION_1, MAC, MTU (the config space's `mtu`), STATUS
//! (link always up), EVENT_IDX, and the checksum and TCP segmentation
//! offloads in both directions (CSUM, HOST_TSO4/6; GUEST_CSUM,
//! GUEST_TSO4/6), which spare the guest's emulated kernel most of its
//! per-packet work. Without MRG_RXBUF, a guest that takes GUEST_TSO posts
//! 64 KiB receive chains. The virtio-net header crosses the device only as
//! far as the negotiated features allow: towards the tap, the guest's header
//! is checked against what it may use (anything else drops the frame) and
//! all zeros without CSUM; towards the guest, the tap is told (TUNSETOFFLOAD)
//! to hand over only what the guest accepted, a frame that needs more is
//! dropped, and the header is all zeros without GUEST_CSUM; `num_buffers` is
//! always 1.
//!
//! Frames are never lost for lack of guest buffers: the worker reads the
//! tap only when the guest has a receive buffer ready, and otherwise stops
//! polling the tap until the guest adds one (a queue notification); the tap
//! queues (and past its queue length drops) like a real link. A frame that
//! is too large for the buffer the guest posted is dropped (a real NIC does
//! the same with an oversized frame) and the buffer kept for the next one.
//!
//! Layout: `device` (the [`VirtioDevice`](super::VirtioDevice), the
//! worker's queue processing), `event_loop` (the worker thread's epoll
//! loop), `tap` (the tap backend and the shared fd I/O), `metrics`
//! (counters).
//!
//! Hostile-guest rules as for the other devices: a malformed chain (a
//! writable descriptor where a readable one belongs or the reverse, memory
//! outside the guest, too short or too long) is given back unused and
//! counted, with a rate-limited warning; a queue whose indices are corrupt
//! marks the device DEVICE_NEEDS_RESET and stops it.

use std::io;
use std::os::unix::io::RawFd;

use vm_memory::GuestMemoryMmap;

mod device;
mod event_loop;
mod metrics;
mod tap;

#[cfg(test)]
pub mod test_utils;
#[cfg(test)]
mod tests;

pub use device::Net;

pub use metrics::NetMetrics;
pub use tap::Tap;

/// Protocol and sizing constants.
pub mod defs {
    /// Size of `struct virtio_net_hdr_v1` (VIRTIO_F_VERSION_1 is always
    /// negotiated, so the header always has `num_buffers`).
    pub const VNET_HDR_LEN: usize = 12;
    /// The largest Ethernet frame (without the virtio-net header) moved in
    /// either direction: a 64 KiB IP packet plus link headers.
    pub const MAX_FRAME_LEN: usize = 65562;
    /// The smallest frame a guest may send: an Ethernet header.
    pub const MIN_FRAME_LEN: usize = 14;
    /// Size of the device's `struct virtio_net_config` (mac, status,
    /// max_virtqueue_pairs, mtu).
    pub const CONFIG_SPACE_SIZE: usize = 12;
    /// Index of the receive queue (device to driver).
    pub const RXQ_INDEX: usize = 0;
    /// Index of the transmit queue (driver to device).
    pub const TXQ_INDEX: usize = 1;
    /// Size of each queue.
    pub const QUEUE_SIZE: u16 = 256;
    pub use carapace_vmm_config::net::{DEFAULT_MTU, MAX_IFNAME_LEN, MAX_MTU, MIN_MTU};
}

pub use carapace_vmm_config::net::{MacAddr, NetConfig, NetConfigError, TapSource};

/// Errors of the net device and its backends.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The device's configuration (MAC, MTU, tap source).
    #[error(transparent)]
    Config(#[from] NetConfigError),
    /// The inherited fd is not open.
    #[error("net fd {fd} is not open")]
    FdNotOpen { fd: RawFd },
    /// The inherited fd is not a tap (or lacks the flags we need).
    #[error("net fd {fd} is not a usable tap: {reason}")]
    NotATap { fd: RawFd, reason: String },
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// The named tap could not be created or attached.
    #[error("cannot create or attach tap {name:?}")]
    CreateTap {
        name: String,
        #[source]
        source: io::Error,
    },
    /// Configuring the tap failed (vnet header size, non-blocking mode).
    #[error("cannot configure tap {what}")]
    ConfigureTap {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// A frame the guest queued for transmission: its virtio-net header (the
/// device's, not the guest's: see the module docs) followed by spans of
/// guest memory.
#[derive(Debug)]
pub struct TxFrame<'a> {
    pub(crate) mem: &'a GuestMemoryMmap,
    /// Header first, then the frame's bytes in guest memory. Every span is
    /// inside `mem`, which outlives the frame.
    pub(crate) iovecs: &'a [libc::iovec],
    /// Guest address and length of each span after the header (for copies).
    pub(crate) spans: &'a [(vm_memory::GuestAddress, usize)],
    pub(crate) hdr: &'a [u8; defs::VNET_HDR_LEN],
    pub(crate) len: usize,
}

impl TxFrame<'_> {
    /// The spans to hand `writev` (header included).
    pub fn iovecs(&self) -> &[libc::iovec] {
        self.iovecs
    }

    /// Length in bytes, header included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the frame is empty (never: it has a header).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the frame (header included) out of guest memory.
    pub fn to_vec(&self) -> Vec<u8> {
        use vm_memory::Bytes;
        let mut out = self.hdr.to_vec();
        for &(addr, len) in self.spans {
            let start = out.len();
            out.resize(start + len, 0);
            if self.mem.read_slice(&mut out[start..], addr).is_err() {
                // Checked when the frame was built; a hole now would be a bug.
                out.truncate(start);
            }
        }
        out
    }
}

/// Which offloaded frames the guest accepts on receive (and so the backend
/// may hand over): partial checksums, TCP segmentation over IPv4 / IPv6.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
}

/// The host side of the device: where guest frames go and host frames come
/// from, one whole frame per call, each starting with the 12-byte
/// virtio-net header. The device is generic over it; [`Tap`] is the real
/// one and `test_utils::PairBackend` a socketpair stand-in.
///
/// All methods are called from the device's worker thread only, and must
/// not block (`WouldBlock` instead).
pub trait NetBackend: Send {
    /// Reads the next frame into `buf` (at least `VNET_HDR_LEN +
    /// MAX_FRAME_LEN` bytes) and returns its length, or `WouldBlock` when
    /// none is pending.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes one frame; returns `WouldBlock` if the backend cannot take it
    /// now (the device retries when [`poll_fd`](Self::poll_fd) is writable).
    fn write_frame(&mut self, frame: &TxFrame<'_>) -> io::Result<usize>;

    /// The descriptor the worker polls for readability and writability.
    fn poll_fd(&self) -> RawFd;

    /// From now on hand over only frames that need at most `offloads` of
    /// the guest (the default: nothing beyond whole, checksummed frames).
    fn set_rx_offloads(&mut self, offloads: Offloads) -> io::Result<()>;
}
