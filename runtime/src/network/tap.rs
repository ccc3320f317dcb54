//! Tap devices: the VM's end of a pod interface.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// Creates tap `name` in the calling thread's network namespace and returns
/// its file. The tap is not persistent: it goes away when the last process
/// holding the file (the VMM) closes it. Frames carry a virtio-net header
/// (IFF_VNET_HDR), which the VMM's device passes to and from the guest.
pub(super) fn create(name: &str) -> io::Result<OwnedFd> {
    let file = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = src.cast_signed();
    }
    #[allow(clippy::cast_possible_truncation)] // the flags fit the C short
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    req.ifr_ifru.ifru_flags = flags;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is and
    // outlives the call; the fd is the tun control file opened above.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file.into())
}
