//! The tap backend: a `/dev/net/tun` file attached to a tap interface with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, one Ethernet frame (after a
//! 12-byte virtio-net header) per read or write.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tracing::debug;

use super::defs::{MAX_IFNAME_LEN, VNET_HDR_LEN};
use super::{NetBackend, NetConfigError, NetError, Offloads, TapSource, TxFrame};
use carapace_vmm_config::tap;

/// An open tap, non-blocking, with a 12-byte virtio-net header and every
/// offload off.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Opens the tap `source` names (see [`TapSource`]).
    pub fn open(source: &TapSource) -> Result<Self, NetError> {
        match source {
            TapSource::Fd(fd) => Self::from_fd(*fd),
            TapSource::Name(name) => Self::open_named(name),
        }
    }

    /// Creates tap `name` in the calling thread's network namespace, or
    /// attaches to it if it exists (a persistent tap with the same flags).
    pub fn open_named(name: &str) -> Result<Self, NetError> {
        if name.is_empty() {
            return Err(NetConfigError::EmptyTapName.into());
        }
        if name.len() > MAX_IFNAME_LEN || name.as_bytes().contains(&0) {
            return Err(NetConfigError::BadTapName(name.to_string()).into());
        }
        let fd = tap::open_tun().map_err(NetError::OpenTun)?;
        let name = tap::attach(&fd, name).map_err(|source| NetError::CreateTap { name: name.to_string(), source })?;
        let tap = Tap { fd, name };
        tap.configure()?;
        debug!(tap = %tap.name, "net: tap opened by name");
        Ok(tap)
    }

    /// Uses an inherited tap file: checks that `fd` is one with the flags
    /// we need and works on a duplicate (the caller keeps `fd`).
    pub fn from_fd(fd: RawFd) -> Result<Self, NetError> {
        if fd < 0 {
            return Err(NetConfigError::BadFd(fd).into());
        }
        // SAFETY: F_DUPFD_CLOEXEC takes an integer argument; on an invalid
        // fd it fails with EBADF and touches nothing.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBADF) {
                return Err(NetError::FdNotOpen { fd });
            }
            return Err(NetError::NotATap { fd, reason: format!("cannot duplicate it: {e}") });
        }
        // SAFETY: `dup` was just created and is owned by nothing else.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        // SAFETY: ifreq is plain data; all zeros is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: `req` is a valid ifreq that outlives the call; TUNGETIFF
        // only writes into it.
        if unsafe { libc::ioctl(owned.as_raw_fd(), libc::TUNGETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(NetError::NotATap { fd, reason: format!("not an attached tun/tap file (TUNGETIFF: {e})") });
        }
        // SAFETY: TUNGETIFF filled the flags member of the union.
        let flags = libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags }) & 0xffff;
        let name = tap::ifreq_name(&req);
        if flags & libc::IFF_TAP == 0 {
            return Err(NetError::NotATap { fd, reason: format!("{name} is a tun (IP) device, not a tap") });
        }
        for (flag, what) in [(libc::IFF_NO_PI, "IFF_NO_PI"), (libc::IFF_VNET_HDR, "IFF_VNET_HDR")] {
            if flags & flag == 0 {
                return Err(NetError::NotATap { fd, reason: format!("tap {name} was opened without {what}") });
            }
        }
        let tap = Tap { fd: owned, name };
        tap.configure()?;
        debug!(tap = %tap.name, fd, "net: inherited tap");
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn configure(&self) -> Result<(), NetError> {
        let fail = |what: &str| {
            let source = io::Error::last_os_error();
            NetError::ConfigureTap { what: format!("{} ({what})", self.name), source }
        };
        let raw = self.fd.as_raw_fd();
        // 12: fits any int.
        #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int from the valid pointer.
        if unsafe { libc::ioctl(raw, libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(fail("TUNSETVNETHDRSZ"));
        }
        // Whoever created the tap may have turned offloads on: the guest
        // negotiated none, so the host must hand us whole, checksummed frames.
        // SAFETY: TUNSETOFFLOAD takes an integer argument.
        if unsafe { libc::ioctl(raw, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(fail("TUNSETOFFLOAD"));
        }
        // SAFETY: F_GETFL/F_SETFL take integer arguments.
        let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(fail("O_NONBLOCK"));
        }
        Ok(())
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_fd(self.fd.as_raw_fd(), buf)
    }

    fn write_frame(&mut self, frame: &TxFrame<'_>) -> io::Result<usize> {
        writev_fd(self.fd.as_raw_fd(), frame.iovecs())
    }

    fn poll_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn set_rx_offloads(&mut self, o: Offloads) -> io::Result<()> {
        // Segmentation offloads need checksum offload (the tap refuses them alone).
        let mut flags = 0;
        if o.csum {
            flags |= libc::TUN_F_CSUM;
            if o.tso4 {
                flags |= libc::TUN_F_TSO4;
            }
            if o.tso6 {
                flags |= libc::TUN_F_TSO6;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes an integer argument.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// One `read` into `buf`, retried on EINTR.
pub(crate) fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a live, exclusively borrowed buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One `writev` of `iovecs`, retried on EINTR.
pub(crate) fn writev_fd(fd: RawFd, iovecs: &[libc::iovec]) -> io::Result<usize> {
    let count = libc::c_int::try_from(iovecs.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: every iovec points into memory that stays mapped for the
        // call (host buffers, or guest memory held by the frame's owner),
        // and the kernel only reads it.
        let n = unsafe { libc::writev(fd, iovecs.as_ptr(), count) };
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
