//! virtio-vsock with a hybrid (Unix socket) backend.
//!
//! The device ([`Vsock`]) owns the three virtqueues (rx, tx, event) and moves
//! packets between them and a [`VsockBackend`]. The production backend,
//! [`VsockUnixBackend`], speaks the "hybrid vsock" protocol of Firecracker and
//! Cloud Hypervisor:
//!
//! - host-initiated: a client connects to the Unix socket at `uds_path` and
//!   writes `CONNECT <port>\n`; once the guest accepts, the client reads
//!   `OK <local port>\n` and the stream is connected to guest port `<port>`;
//! - guest-initiated: a guest connection to host port `P` is connected to the
//!   Unix socket `<uds_path>_P`.
//!
//! Layout: `packet` (the wire header and descriptor-chain parsing), `csm`
//! (one connection's state machine and credit accounting), `unix` (the
//! Unix-socket backend, a connection multiplexer with its own epoll),
//! `device` (the [`VirtioDevice`](super::VirtioDevice) and its queue
//! processing) and `event_loop` (the worker thread's epoll loop).

use std::io;
use std::path::PathBuf;
use std::time::Instant;

mod csm;
mod device;
mod event_loop;
mod metrics;
mod packet;
mod unix;

#[cfg(feature = "fuzzing")]
pub(crate) mod fuzz;
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;
#[cfg(test)]
mod tests;

pub use device::Vsock;
pub use metrics::VsockMetrics;
pub use packet::{VsockHeader, VsockPacket};
pub use unix::VsockUnixBackend;

/// Protocol and sizing constants.
pub mod defs {
    use std::time::Duration;

    /// The well-known CID of the host.
    pub const HOST_CID: u64 = 2;
    /// Size of `struct virtio_vsock_hdr` on the wire.
    pub const PKT_HDR_SIZE: usize = 44;
    /// The largest payload accepted from, or sent to, the guest in one packet.
    pub const MAX_PKT_BUF_SIZE: usize = 64 * 1024;

    /// Index of the receive queue (device to driver).
    pub const RXQ_INDEX: usize = 0;
    /// Index of the transmit queue (driver to device).
    pub const TXQ_INDEX: usize = 1;
    /// Index of the event queue.
    pub const EVQ_INDEX: usize = 2;
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, the one event type.
    pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
    /// Size of each of the three queues.
    pub const QUEUE_SIZE: u16 = 256;

    /// `VIRTIO_VSOCK_TYPE_STREAM`.
    pub const TYPE_STREAM: u16 = 1;

    /// Connection request.
    pub const OP_REQUEST: u16 = 1;
    /// Connection accepted.
    pub const OP_RESPONSE: u16 = 2;
    /// Connection reset (refused, or torn down).
    pub const OP_RST: u16 = 3;
    /// The sender will no longer receive and/or send (see the flags).
    pub const OP_SHUTDOWN: u16 = 4;
    /// Data.
    pub const OP_RW: u16 = 5;
    /// The sender's buf_alloc / fwd_cnt changed.
    pub const OP_CREDIT_UPDATE: u16 = 6;
    /// The sender asks for a credit update.
    pub const OP_CREDIT_REQUEST: u16 = 7;

    /// SHUTDOWN flag: the sender will receive no more data.
    pub const SHUTDOWN_RCV: u32 = 1;
    /// SHUTDOWN flag: the sender will send no more data.
    pub const SHUTDOWN_SEND: u32 = 2;
    /// Both SHUTDOWN flags.
    pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

    /// Bytes from the guest we buffer per connection when the Unix stream
    /// cannot take them; advertised to the guest as our `buf_alloc`.
    pub const CONN_TX_BUF_SIZE: u32 = 256 * 1024;
    /// Send a CREDIT_UPDATE once this many bytes were forwarded to the host
    /// since the guest last heard our `fwd_cnt`.
    pub const CONN_CREDIT_UPDATE_THRESHOLD: u32 = CONN_TX_BUF_SIZE / 4;
    /// The most connections (established or being set up) at once.
    pub const MAX_CONNECTIONS: usize = 1024;
    /// The most host clients that have connected but not yet sent `CONNECT`.
    pub const MAX_PENDING_CLIENTS: usize = 128;
    /// The most RSTs for unknown connections waiting for an rx buffer.
    pub const MAX_PENDING_RSTS: usize = 1024;
    /// First port handed out to host-initiated connections.
    pub const LOCAL_PORT_START: u32 = 1 << 30;
    /// Longest `CONNECT <port>\n` line accepted.
    pub const MAX_CONNECT_LINE: usize = 32;

    /// How long a host client may take to send its `CONNECT` line.
    pub const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(10);
    /// How long the guest may take to answer our REQUEST once it saw it.
    pub const CONN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    /// How long a graceful close may take (flushing, or the peer's RST).
    pub const CONN_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
}

/// Errors of the vsock device and its backends.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved or out of range.
    #[error("invalid guest CID {0} (must be between 3 and 2^32-2)")]
    InvalidCid(u64),
    /// Another process listens on the socket path.
    #[error("vsock socket {0} is already in use")]
    AddrInUse(PathBuf),
    /// The socket path exists and is not a socket.
    #[error("vsock socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Binding or configuring the host listener failed.
    #[error("cannot listen on vsock socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Creating or controlling an epoll set or eventfd failed.
    #[error("vsock epoll/eventfd")]
    Epoll(#[source] io::Error),
    /// The descriptor chain is shorter than the packet it should carry.
    #[error("descriptor chain too short: {0} bytes")]
    DescChainTooShort(usize),
    /// A device-readable buffer was write-only.
    #[error("write-only descriptor where a device-readable one was expected")]
    UnreadableDescriptor,
    /// A device-writable buffer was read-only.
    #[error("read-only descriptor where a device-writable one was expected")]
    UnwritableDescriptor,
    /// The header's `len` is larger than the maximum packet size.
    #[error("packet length {0} exceeds the maximum")]
    InvalidPktLen(u32),
    /// A descriptor points outside guest memory.
    #[error("guest memory access")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// The virtqueue is broken.
    #[error("virtqueue: {0}")]
    Queue(virtio_queue::Error),
}

/// The host side of the device: where guest packets go and host packets come
/// from. The device is generic over it; [`VsockUnixBackend`] is the real one
/// and `test_utils::TestBackend` a recording fake.
///
/// All methods are called from the device's worker thread only.
pub trait VsockBackend: Send {
    /// Handles a well-formed packet the guest sent on the tx queue.
    fn send_pkt(&mut self, pkt: &VsockPacket);

    /// Handles a packet from the guest whose header could be read but which
    /// is otherwise malformed (bad length, unreadable data): it is dropped,
    /// and the connection it names, if any, is reset.
    fn bad_pkt(&mut self, hdr: &VsockHeader);

    /// Fills `pkt` with the next packet for the guest, with at most
    /// `max_data` bytes of payload. Returns false when nothing is pending.
    fn recv_pkt(&mut self, pkt: &mut VsockPacket, max_data: usize) -> bool;

    /// Whether [`recv_pkt`](Self::recv_pkt) may have something to deliver.
    fn has_pending_rx(&self) -> bool;

    /// A file descriptor the worker polls for readability; when it is
    /// readable, the worker calls [`process_host_events`](Self::process_host_events).
    fn poll_fd(&self) -> Option<std::os::unix::io::RawFd>;

    /// Handles pending host-side events (new clients, readable or writable
    /// streams). Must not block.
    fn process_host_events(&mut self);

    /// The earliest time at which [`process_timeouts`](Self::process_timeouts)
    /// has something to do.
    fn next_timeout(&self) -> Option<Instant>;

    /// Expires what is due at `now` (slow handshakes, graceful closes).
    fn process_timeouts(&mut self, now: Instant);

    /// Drops every connection (the device is being reset).
    fn reset(&mut self);
}
