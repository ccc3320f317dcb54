//! Host ends of a guest process's stdio. The agent connects to host vsock
//! ports; the VMM turns a guest connection to port P into a connection to
//! the Unix socket `<vsock uds>_P`, where we listen. Each stream is copied
//! to or from a host file: the caller's stdio, or a pty whose master went to
//! a `--console-socket`.

use std::fs::File;
use std::io::{IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use carapace_protocol::agent::StdioStreams;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios::{self, SetArg, Termios};

/// Errors setting up stdio.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("cannot listen on {path}")]
    Listen { path: PathBuf, source: std::io::Error },
    #[error("no free stdio port near {0}")]
    NoPort(u32),
    #[error("cannot duplicate stdio: {0}")]
    Dup(std::io::Error),
    #[error("cannot open a pty: {0}")]
    Pty(nix::Error),
    #[error("--console-socket {path}")]
    ConsoleSocket { path: PathBuf, source: std::io::Error },
    #[error("terminal settings: {0}")]
    Termios(nix::Error),
}

/// A listening host port; its socket file is removed on drop.
#[derive(Debug)]
pub struct PortListener {
    pub port: u32,
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for PortListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl PortListener {
    /// Binds the first free port from a pid-derived start, so that
    /// concurrent commands on one VM rarely try the same ports.
    pub fn bind(uds: &Path) -> Result<Self, StdioError> {
        let start = 10_000 + (std::process::id() * 7 + nanos()) % 50_000;
        for i in 0..512 {
            let port = 10_000 + (start - 10_000 + i) % 50_000;
            let path = PathBuf::from(format!("{}_{port}", uds.display()));
            match UnixListener::bind(&path) {
                Ok(listener) => return Ok(Self { port, listener, path }),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(source) => return Err(StdioError::Listen { path, source }),
            }
        }
        Err(StdioError::NoPort(start))
    }

    /// Waits for the agent's connection; the socket file goes once it came.
    fn accept(self) -> std::io::Result<UnixStream> {
        self.listener.accept().map(|(s, _)| s)
    }
}

fn nanos() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
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

/// The listeners of one process's streams, bound before the agent is asked
/// to connect.
#[derive(Debug)]
pub struct StdioPorts {
    stdin: PortListener,
    stdout: PortListener,
    stderr: Option<PortListener>,
}

impl StdioPorts {
    /// Binds the ports `io` needs on the VM whose vsock socket is `uds`.
    pub fn bind(uds: &Path, io: &HostIo) -> Result<Self, StdioError> {
        let stdin = PortListener::bind(uds)?;
        let stdout = PortListener::bind(uds)?;
        let stderr = match io {
            HostIo::Pipes { .. } => Some(PortListener::bind(uds)?),
            HostIo::Terminal { .. } => None,
        };
        Ok(Self { stdin, stdout, stderr })
    }

    /// The ports to give the agent.
    pub fn streams(&self) -> StdioStreams {
        let mut s = StdioStreams::new();
        s.stdin_port = self.stdin.port;
        s.stdout_port = self.stdout.port;
        s.stderr_port = self.stderr.as_ref().map_or(0, |l| l.port);
        s
    }

    /// Starts copying: each listener accepts the agent's connection in its
    /// own thread. Input is copied until the host side ends, then the
    /// stream's write half is shut (the process sees EOF).
    pub fn relay(self, io: HostIo) -> Relay {
        let mut outputs = Vec::new();
        let (input, out, err) = match io {
            HostIo::Pipes { stdin, stdout, stderr } => (stdin, stdout, Some(stderr)),
            HostIo::Terminal { input, output } => (Some(input), output, None),
        };
        let stdin_port = self.stdin;
        std::thread::spawn(move || {
            let Ok(mut stream) = stdin_port.accept() else { return };
            if let Some(mut input) = input {
                let _ = std::io::copy(&mut input, &mut stream);
            }
            let _ = stream.shutdown(std::net::Shutdown::Write);
        });
        outputs.push(spawn_output(self.stdout, out));
        if let (Some(l), Some(f)) = (self.stderr, err) {
            outputs.push(spawn_output(l, f));
        }
        Relay { outputs }
    }
}

fn spawn_output(listener: PortListener, mut sink: File) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok(mut stream) = listener.accept() else { return };
        let _ = std::io::copy(&mut stream, &mut sink);
        let _ = sink.flush();
    })
}

/// Running copies of one process's output streams.
#[derive(Debug)]
pub struct Relay {
    outputs: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Waits up to `timeout` for every output stream to reach EOF (the agent
    /// closes them once the process's output ends). A process whose
    /// background children keep its stdout open would otherwise hold us.
    pub fn finish(self, timeout: Duration) {
        let end = Instant::now() + timeout;
        for h in self.outputs {
            while !h.is_finished() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
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
    use std::io::Read;

    #[test]
    fn relays_output_in_order_and_input_to_eof() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("vsock.sock");
        let out_path = dir.path().join("out");
        let (in_read, mut in_write) = std::io::pipe().expect("pipe");
        let io = HostIo::Pipes {
            stdin: Some(File::from(OwnedFd::from(in_read))),
            stdout: File::create(&out_path).expect("out"),
            stderr: File::create(dir.path().join("err")).expect("err"),
        };
        let ports = StdioPorts::bind(&uds, &io).expect("bind");
        let s = ports.streams();
        assert!(s.stdin_port != s.stdout_port && s.stderr_port != 0);
        let relay = ports.relay(io);
        // Play the agent: connect to each port as the VMM would.
        let connect = |p: u32| UnixStream::connect(format!("{}_{p}", uds.display())).expect("connect");
        let mut stdin = connect(s.stdin_port);
        let mut stdout = connect(s.stdout_port);
        let _stderr = connect(s.stderr_port);
        in_write.write_all(b"typed").expect("write");
        drop(in_write);
        let mut got = Vec::new();
        stdin.read_to_end(&mut got).expect("stdin EOF");
        assert_eq!(got, b"typed");
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        stdout.write_all(&data).expect("stdout");
        drop(stdout);
        drop(_stderr);
        relay.finish(Duration::from_secs(10));
        assert_eq!(std::fs::read(&out_path).expect("read"), data);
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").filter_map(Result::ok).map(|e| e.file_name()).collect();
        assert!(left.iter().all(|n| !n.to_string_lossy().starts_with("vsock.sock_")), "{left:?}");
    }
}
