//! The Unix sockets libcontainer sends a terminal's pty master to.
//!
//! A socket's path must fit `sun_path` (108 bytes with the NUL), so it is
//! never derived from container or exec ids (a CRI id alone is 64
//! characters): each socket is `<state dir>/tty/<n>.sock`, `n` counting up
//! for the agent's lifetime.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{ContainerError, Result};

/// The longest path a Unix socket can be bound at (`sun_path` less its
/// terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Hands out short, unique console socket paths under one directory.
#[derive(Debug)]
pub struct ConsoleSockets {
    dir: PathBuf,
    next: AtomicU64,
}

impl ConsoleSockets {
    /// Sockets under `<state_dir>/tty`.
    pub fn new(state_dir: &Path) -> Self {
        Self { dir: state_dir.join("tty"), next: AtomicU64::new(1) }
    }

    /// The path the next socket gets; unique for this agent.
    pub fn next_path(&self) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{n}.sock"))
    }

    /// Binds a new console socket.
    pub fn bind(&self) -> Result<ConsoleListener> {
        std::fs::create_dir_all(&self.dir).map_err(|e| ContainerError::io(format!("creating {}", self.dir.display()), e))?;
        ConsoleListener::bind(self.next_path())
    }
}

/// A bound console socket; removed when dropped.
#[derive(Debug)]
pub struct ConsoleListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleListener {
    fn bind(path: PathBuf) -> Result<Self> {
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(ContainerError::io(
                format!("binding the console socket {}", path.display()),
                io::Error::other(format!(
                    "{len} bytes, longer than a Unix socket path can be ({MAX_SOCKET_PATH}): use a shorter --state-dir"
                )),
            ));
        }
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|e| ContainerError::io(format!("binding {}", path.display()), e))?;
        listener.set_nonblocking(true).map_err(|e| ContainerError::io("console socket", e))?;
        Ok(Self { listener, path })
    }

    /// Where the socket is, for libcontainer.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pty master: the container connected (in libcontainer's build)
    /// and sent it before the build returned.
    pub fn receive_master(&self) -> Result<OwnedFd> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let (stream, _) = self.listener.accept().map_err(|e| ContainerError::io("the container did not connect its console socket", e))?;
        stream.set_nonblocking(false).map_err(|e| ContainerError::io("console socket", e))?;
        let mut buf = [0u8; 256];
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|e| ContainerError::io("receiving the pty master", e.into()))?;
        let cmsgs = msg.cmsgs().map_err(|e| ContainerError::io("receiving the pty master", e.into()))?;
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                if let Some(&fd) = fds.first() {
                    for &extra in &fds[1..] {
                        let _ = nix::unistd::close(extra);
                    }
                    // SAFETY: the kernel just installed fd in our table for
                    // us (SCM_RIGHTS); nothing else owns it.
                    return Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
                }
            }
        }
        Err(ContainerError::io("receiving the pty master", io::Error::other("no descriptor in the message")))
    }
}

impl Drop for ConsoleListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn paths_are_short_whatever_the_ids_and_unique() {
        // The guest's state dir; ids play no part, however long.
        let sockets = ConsoleSockets::new(Path::new("/run/carapace-agent"));
        let id = "a".repeat(64);
        let exec_id = "b".repeat(64);
        let first = sockets.next_path();
        let second = sockets.next_path();
        assert_ne!(first, second);
        for p in [&first, &second] {
            let text = p.to_string_lossy();
            assert!(text.len() <= 40, "{text}");
            assert!(!text.contains(&id) && !text.contains(&exec_id), "{text}");
            assert!(p.starts_with("/run/carapace-agent/tty"), "{text}");
        }
    }

    #[test]
    fn binds_receives_a_descriptor_and_cleans_up() {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let dir = tempfile::tempdir().expect("tempdir");
        let sockets = ConsoleSockets::new(dir.path());
        let console = sockets.bind().expect("bind");
        let path = console.path().to_path_buf();
        assert!(path.exists());
        let client = UnixStream::connect(&path).expect("connect");
        let sent = std::fs::File::open("/dev/null").expect("open");
        let fds = [sent.as_raw_fd()];
        sendmsg::<()>(client.as_raw_fd(), &[io::IoSlice::new(b"x")], &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None)
            .expect("sendmsg");
        let master = console.receive_master().expect("receive");
        assert!(master.as_raw_fd() >= 0);
        drop(console);
        assert!(!path.exists(), "the socket file is removed");
    }

    #[test]
    fn a_path_too_long_for_a_socket_is_refused_by_length() {
        let long = PathBuf::from(format!("/{}", "d".repeat(120)));
        let err = ConsoleListener::bind(long).expect_err("too long");
        assert!(err.to_string().contains("longer than a Unix socket path"), "{err}");
    }
}
