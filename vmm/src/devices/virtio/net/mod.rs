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

use serde::{Deserialize, Serialize};
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
    /// The smallest MTU accepted (the IPv4 minimum).
    pub const MIN_MTU: u32 = 68;
    /// The largest MTU accepted (the config space field is 16 bits, and
    /// a tap allows no more).
    pub const MAX_MTU: u32 = 65535;
    /// The MTU when none is configured.
    pub const DEFAULT_MTU: u32 = 1500;
    /// Longest interface name (`IFNAMSIZ` minus the terminator).
    pub const MAX_IFNAME_LEN: usize = 15;
}

/// A MAC address (six octets), written `02:00:00:00:00:01`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Whether the guest may use it as its own address: not multicast (the
    /// low bit of the first octet) and not all zeros.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl std::str::FromStr for MacAddr {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetError::BadMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = NetError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

/// Where a device's tap comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum TapSource {
    /// An open tap file the VMM inherited (the runtime's way). The VMM
    /// works on a duplicate; the number itself is left as it is.
    Fd(RawFd),
    /// A tap interface by name, created (or attached to, if it exists with
    /// the same flags) in the VMM's network namespace.
    Name(String),
}

fn default_mtu() -> u32 {
    defs::DEFAULT_MTU
}

/// One network device: what the VMM's configuration carries per device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap the frames go through.
    pub tap: TapSource,
    /// The guest's MAC address.
    pub mac: MacAddr,
    /// The MTU the guest is told to use (68..=65535).
    #[serde(default = "default_mtu")]
    pub mtu: u32,
}

impl NetConfig {
    /// Checks what can be checked without opening anything.
    pub fn validate(&self) -> Result<(), NetError> {
        if !self.mac.is_unicast() {
            return Err(NetError::MacNotUnicast(self.mac));
        }
        if !(defs::MIN_MTU..=defs::MAX_MTU).contains(&self.mtu) {
            return Err(NetError::BadMtu(self.mtu));
        }
        match &self.tap {
            TapSource::Fd(fd) if *fd < 0 => Err(NetError::BadFd(*fd)),
            TapSource::Name(n) if n.is_empty() => Err(NetError::EmptyTapName),
            TapSource::Name(n) if n.len() > defs::MAX_IFNAME_LEN || n.contains(['/', '\0', ' ', ':']) || n == "." || n == ".." => {
                Err(NetError::BadTapName(n.clone()))
            }
            _ => Ok(()),
        }
    }
}

impl std::str::FromStr for NetConfig {
    type Err = NetError;

    /// `fd=N,mac=MAC[,mtu=M]` or `tap=NAME,mac=MAC[,mtu=M]` (the
    /// `carapace-vmm --net` syntax).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut mac = None;
        let mut mtu = defs::DEFAULT_MTU;
        for item in s.split(',') {
            let (key, value) = item.split_once('=').ok_or_else(|| NetError::BadOption(item.to_string()))?;
            match key {
                "fd" | "tap" if tap.is_some() => return Err(NetError::TwoTaps(s.to_string())),
                "fd" => tap = Some(TapSource::Fd(value.parse().map_err(|_| NetError::BadFdValue(value.to_string()))?)),
                "tap" => tap = Some(TapSource::Name(value.to_string())),
                "mac" => mac = Some(value.parse()?),
                "mtu" => mtu = value.parse().map_err(|_| NetError::BadMtuValue(value.to_string()))?,
                _ => return Err(NetError::BadOption(item.to_string())),
            }
        }
        let config = NetConfig {
            tap: tap.ok_or_else(|| NetError::NoTap(s.to_string()))?,
            mac: mac.ok_or_else(|| NetError::NoMac(s.to_string()))?,
            mtu,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Errors of the net device, its configuration and its backends.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A MAC address that is not six colon-separated hex octets.
    #[error("invalid MAC address {0:?} (expected six hex octets like 02:00:00:00:00:01)")]
    BadMac(String),
    /// A multicast or all-zero MAC address.
    #[error("MAC address {0} is not a unicast address (multicast bit set, or all zeros)")]
    MacNotUnicast(MacAddr),
    /// An MTU out of range.
    #[error("net mtu {0} is out of range ({min}..={max})", min = defs::MIN_MTU, max = defs::MAX_MTU)]
    BadMtu(u32),
    /// An MTU that is not a number.
    #[error("net mtu {0:?} is not a number")]
    BadMtuValue(String),
    /// A negative fd.
    #[error("net fd {0} is not a file descriptor number")]
    BadFd(RawFd),
    /// An fd that is not a number.
    #[error("net fd {0:?} is not a file descriptor number")]
    BadFdValue(String),
    /// An empty tap name.
    #[error("net tap name is empty")]
    EmptyTapName,
    /// A tap name the kernel would refuse.
    #[error("net tap name {0:?} is not a valid interface name (1-15 bytes, no '/', ':', space or NUL)")]
    BadTapName(String),
    /// A `--net` item that is not `key=value` or has an unknown key.
    #[error("net option {0:?} is unknown (expected fd=N or tap=NAME, mac=MAC, mtu=M)")]
    BadOption(String),
    /// Neither `fd=` nor `tap=`.
    #[error("net {0:?}: missing fd=N or tap=NAME")]
    NoTap(String),
    /// Both `fd=` and `tap=` (or one twice).
    #[error("net {0:?}: give one of fd=N or tap=NAME, once")]
    TwoTaps(String),
    /// No `mac=`.
    #[error("net {0:?}: missing mac=MAC")]
    NoMac(String),
    /// Two devices with one MAC or one fd.
    #[error("net: {0} is used by more than one device")]
    Duplicate(String),
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
