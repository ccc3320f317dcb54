//! The CLI's host ends of a guest process's stdio: the caller's own stdio,
//! or a pty whose master went to a `--console-socket`; the terminal's raw
//! mode and window size. [`crate::relay`] copies the streams.

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios::{self, SetArg, Termios};

use crate::relay::{HostEnd, HostStdio, RelayError};

/// Errors setting up stdio.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error("cannot duplicate stdio: {0}")]
    Dup(std::io::Error),
    #[error("cannot open a pty: {0}")]
    Pty(nix::Error),
    #[error("--console-socket {path}")]
    ConsoleSocket { path: PathBuf, source: std::io::Error },
    #[error("terminal settings: {0}")]
    Termios(nix::Error),
}

/// Where a process's stdio goes on the host.
#[derive(Debug)]
pub enum HostIo {
    /// Separate streams: the caller's stdin (if any), stdout and stderr.
    Pipes { stdin: Option<File>, stdout: File, stderr: File },
    /// One terminal: input read from `input`, output written to `output`
    /// (the same pty slave, or the caller's own terminal).
    Terminal { input: File, output: File },
}

impl HostIo {
    /// The caller's fds 0, 1 and 2 (duplicated, so they outlive our own use).
    pub fn inherited(terminal: bool) -> Result<Self, StdioError> {
        let dup = |fd: i32| -> Result<File, StdioError> {
            // SAFETY: fds 0-2 are open for the life of the process.
            let b = unsafe { BorrowedFd::borrow_raw(fd) };
            b.try_clone_to_owned().map(File::from).map_err(StdioError::Dup)
        };
        if terminal {
            Ok(Self::Terminal { input: dup(0)?, output: dup(1)? })
        } else {
            Ok(Self::Pipes { stdin: Some(dup(0)?), stdout: dup(1)?, stderr: dup(2)? })
        }
    }
}

/// The relay's view: with a terminal, stderr is part of its output. An
/// output the caller closed is dropped, so the process's writes fail as on
/// a closed pipe.
impl From<HostIo> for HostStdio {
    fn from(io: HostIo) -> Self {
        let (stdin, stdout, stderr) = match io {
            HostIo::Pipes { stdin, stdout, stderr } => (stdin, stdout, Some(stderr)),
            HostIo::Terminal { input, output } => (Some(input), output, None),
        };
        HostStdio {
            stdin: stdin.map(HostEnd::File),
            stdout: Some(HostEnd::File(stdout)),
            stderr: stderr.map(HostEnd::File),
            drain_closed_output: false,
        }
    }
}

/// A pty whose master was handed to a console socket; we keep the slave.
#[derive(Debug)]
pub struct ConsolePty {
    pub slave: File,
}

impl ConsolePty {
    /// Opens a pty, puts the slave in raw mode (the guest's pty does the
    /// line discipline) and sends the master over `socket` with SCM_RIGHTS,
    /// the slave's name as payload, as runc does.
    pub fn send_to(socket: &Path) -> Result<Self, StdioError> {
        let pty = nix::pty::openpty(None, None).map_err(StdioError::Pty)?;
        let mut t = termios::tcgetattr(&pty.slave).map_err(StdioError::Termios)?;
        termios::cfmakeraw(&mut t);
        termios::tcsetattr(&pty.slave, SetArg::TCSANOW, &t).map_err(StdioError::Termios)?;
        let name = pty_name(&pty.slave).unwrap_or_else(|| "/dev/ptmx".into());
        let sock_err = |source| StdioError::ConsoleSocket { path: socket.to_path_buf(), source };
        let stream = UnixStream::connect(socket).map_err(sock_err)?;
        let fds = [pty.master.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(stream.as_raw_fd(), &[IoSlice::new(name.as_bytes())], &cmsg, MsgFlags::empty(), None)
            .map_err(|e| sock_err(e.into()))?;
        drop(pty.master);
        Ok(Self { slave: File::from(pty.slave) })
    }

    /// The host side of the process's terminal.
    pub fn host_io(&self) -> Result<HostIo, StdioError> {
        let input = self.slave.try_clone().map_err(StdioError::Dup)?;
        let output = self.slave.try_clone().map_err(StdioError::Dup)?;
        Ok(HostIo::Terminal { input, output })
    }
}

fn pty_name(fd: &OwnedFd) -> Option<String> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok().map(|p| p.to_string_lossy().into_owned())
}

/// Puts a terminal in raw mode and restores it on drop.
#[derive(Debug)]
pub struct RawMode {
    fd: File,
    saved: Termios,
}

impl RawMode {
    /// Raw mode for `fd` if it is a terminal; `None` otherwise.
    pub fn enter(fd: &File) -> Option<Self> {
        let saved = termios::tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSANOW, &raw).ok()?;
        Some(Self { fd: fd.try_clone().ok()?, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(&self.fd, SetArg::TCSANOW, &self.saved);
    }
}

/// Watches a terminal's window size and calls `resize(rows, cols)` on each
/// change (and once at the start) until it succeeds, until the returned
/// flag is set. (The process may not exist yet when the size is first set.)
pub fn watch_winsize(tty: File, resize: impl Fn(u16, u16) -> bool + Send + 'static) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let mut last = None;
        while !flag.load(Ordering::Relaxed) {
            if let Some(ws) = winsize(tty.as_fd()) {
                if last != Some(ws) && ws.0 > 0 && ws.1 > 0 && resize(ws.0, ws.1) {
                    last = Some(ws);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    stop
}

/// Rows and columns of a terminal.
pub fn winsize(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we pass.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0).then_some((ws.ws_row, ws.ws_col))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> File {
        tempfile::tempfile().expect("tempfile")
    }

    #[test]
    fn a_terminal_relays_no_stderr_and_closed_outputs_are_dropped() {
        let host = HostStdio::from(HostIo::Terminal { input: file(), output: file() });
        assert!(matches!(host.stdin, Some(HostEnd::File(_))) && matches!(host.stdout, Some(HostEnd::File(_))));
        assert!(host.stderr.is_none());
        assert!(!host.drain_closed_output);
        let host = HostStdio::from(HostIo::Pipes { stdin: None, stdout: file(), stderr: file() });
        assert!(host.stdin.is_none() && host.stdout.is_some() && host.stderr.is_some());
    }
}
