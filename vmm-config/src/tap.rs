//! Creating a tap the way the VMM's virtio-net device needs it: Ethernet
//! frames (`IFF_TAP`), no packet-info prefix (`IFF_NO_PI`), a virtio-net
//! header before each frame (`IFF_VNET_HDR`). The runtime creates a pod's
//! taps with it and hands the VMM the file; the VMM creates one itself
//! when its config names a tap.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::net::MAX_IFNAME_LEN;

/// The flags a tap must have for the VMM.
pub const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// Opens the tun control file (`/dev/net/tun`), close-on-exec.
pub fn open_tun() -> io::Result<OwnedFd> {
    Ok(OpenOptions::new().read(true).write(true).open("/dev/net/tun")?.into())
}

/// Attaches `tun` (from [`open_tun`]) to tap `name` with [`TAP_FLAGS`] in
/// the calling thread's network namespace, creating it if missing (a
/// missing tap is not persistent: it goes when the last file on it is
/// closed). Returns the name the kernel gave it.
pub fn attach(tun: &OwnedFd, name: &str) -> io::Result<String> {
    check_name(name)?;
    let bytes = name.as_bytes();
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = src.cast_signed();
    }
    #[allow(clippy::cast_possible_truncation)] // the flags fit the C short (0x5002)
    let flags = TAP_FLAGS as libc::c_short;
    req.ifr_ifru.ifru_flags = flags;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is and
    // outlives the call; the fd is an open tun control file.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ifreq_name(&req))
}

/// An interface name the kernel takes: 1 to 15 bytes, no NUL.
fn check_name(name: &str) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_IFNAME_LEN || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
    }
    Ok(())
}

/// Creates tap `name` (see [`attach`]) and returns its file.
pub fn create(name: &str) -> io::Result<OwnedFd> {
    let tun = open_tun()?;
    attach(&tun, name)?;
    Ok(tun)
}

/// The interface name in an ifreq (NUL-terminated, or the whole field).
pub fn ifreq_name(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req.ifr_name.iter().take_while(|&&c| c != 0).map(|&c| c.cast_unsigned()).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_the_kernel() {
        for bad in ["", "sixteen-letters!", "a\0b"] {
            let e = check_name(bad).expect_err(bad);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}: {e}");
        }
        check_name("fifteen-letters").expect("15 bytes");
    }

    #[test]
    fn ifreq_names_end_at_the_nul_or_the_field() {
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(b"tap0") {
            *dst = src.cast_signed();
        }
        assert_eq!(ifreq_name(&req), "tap0");
        for c in req.ifr_name.iter_mut() {
            *c = b'x'.cast_signed();
        }
        assert_eq!(ifreq_name(&req), "x".repeat(req.ifr_name.len()));
    }
}
