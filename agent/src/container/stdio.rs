//! A process's stdio over dedicated streams to the host.
//!
//! For each process the host names up to three ports ([`StdioPorts`]). The
//! agent connects to them *before* the process starts: in the guest to
//! vsock CID 2 (the host), port P, which the VMM turns into a connection to
//! its Unix socket `<uds>_P`; on the host (`--listen unix://PATH`, tests) to
//! the Unix socket `PATH_P` directly. Port 0 means "not connected": the
//! process gets `/dev/null` there.
//!
//! Without a terminal the process gets pipes and one copier thread per
//! stream (from a pool the agent fills at boot, [`start_copiers`]) moves
//! the bytes: blocking writes to the host with large buffers,
//! so a slow reader holds the process back (back-pressure) and nothing is
//! queued without bound. With a terminal the process gets the slave of a
//! pty (created by libcontainer inside the container); the agent holds the
//! master: the stdout stream carries what the terminal outputs and the
//! stdin stream what is typed.
//!
//! Exit and drain: when the reaper reports the process's exit,
//! [`ProcessIo::notify_exit`] wakes the output copiers; each one reads
//! until its pipe is empty (everything written before the exit is then on
//! its way to the host) and reports itself drained; [`ProcessIo::wait_drained`]
//! returns once all have. A copier keeps copying after that until EOF, so
//! output of a grandchild that kept the pipe still arrives, but it does not
//! hold WaitProcess back.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};

/// Bytes moved per read: few system calls per MiB (each costs ~0.6 ms in
/// the guest).
const COPY_BUFFER: usize = 256 * 1024;

/// Pipe capacity asked for (the kernel rounds; root may exceed
/// `fs.pipe-max-size`). A failure only costs more context switches.
const PIPE_SIZE: i32 = 1024 * 1024;

/// Stack of a copier thread: the buffer is on the heap.
const COPIER_STACK: usize = 64 * 1024;

/// After a terminal process exits, how long the pty may stay silent before
/// its output counts as drained even without the hang-up (a descendant may
/// keep the slave open).
const TTY_DRAIN_QUIET: Duration = Duration::from_millis(2000);

/// The terminal's end-of-file character (^D), written on CloseStdin.
const VEOF_CHAR: u8 = 0x04;

/// Where the process's stdio goes: host ports, 0 = none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StdioPorts {
    pub stdin: u32,
    pub stdout: u32,
    pub stderr: u32,
}

impl From<&carapace_protocol::agent::StdioStreams> for StdioPorts {
    fn from(s: &carapace_protocol::agent::StdioStreams) -> Self {
        Self { stdin: s.stdin_port, stdout: s.stdout_port, stderr: s.stderr_port }
    }
}

/// Why stdio could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("connecting the {stream} stream to host port {port}: {cause}")]
    Connect { stream: &'static str, port: u32, cause: io::Error },
    #[error("creating a pipe for {stream}: {cause}")]
    Pipe { stream: &'static str, cause: nix::Error },
    #[error("opening /dev/null: {0}")]
    DevNull(io::Error),
    #[error("creating an eventfd: {0}")]
    EventFd(nix::Error),
    #[error("starting a copier thread: {0}")]
    Thread(io::Error),
    #[error("setting the terminal size: {0}")]
    Winsize(nix::Error),
}

/// How the agent reaches the host's stdio ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dialer {
    /// vsock to this CID (the host: 2).
    Vsock { cid: u32 },
    /// Unix sockets `<base>_<port>` (the agent serves on `unix://<base>`).
    Unix { base: PathBuf },
}

/// How long the streams of one process may take to connect (the kernel's
/// vsock connect timeout is 2 s).
const CONNECT_WAIT: Duration = Duration::from_secs(10);

impl Dialer {
    /// Opens a stream to each port (blocking, close-on-exec once open), in
    /// order. Over vsock the connects are in flight together: each waits
    /// for the host to accept, a round trip through the VMM that took ~30
    /// ms of a kvm_pvm guest's time, and a process has up to three.
    pub fn connect_all(&self, ports: &[u32]) -> Vec<io::Result<OwnedFd>> {
        match self {
            Self::Vsock { cid } => connect_vsock(*cid, ports),
            Self::Unix { base } => ports.iter().map(|&port| connect_unix(base, port)).collect(),
        }
    }
}

/// [`Dialer::connect_all`] over vsock: non-blocking connects, then polls
/// until each is made or failed.
fn connect_vsock(cid: u32, ports: &[u32]) -> Vec<io::Result<OwnedFd>> {
    let mut socks: Vec<io::Result<OwnedFd>> = ports
        .iter()
        .map(|&port| {
            let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
            match connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)) {
                Ok(()) | Err(nix::Error::EINPROGRESS) => Ok(fd),
                Err(e) => Err(e.into()),
            }
        })
        .collect();
    // In flight: the sockets whose connect is not over (made or failed).
    let mut pending: Vec<usize> = (0..socks.len()).filter(|&i| socks[i].is_ok()).collect();
    let end = std::time::Instant::now() + CONNECT_WAIT;
    while !pending.is_empty() {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            for &i in &pending {
                socks[i] = Err(io::Error::from(io::ErrorKind::TimedOut));
            }
            break;
        }
        let over: Vec<(usize, bool)> = {
            let mut fds: Vec<PollFd<'_>> =
                pending.iter().filter_map(|&i| socks[i].as_ref().ok().map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLOUT))).collect();
            match poll(&mut fds, PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return ports.iter().map(|_| Err(io::Error::from(e))).collect(),
            }
            let failed = PollFlags::POLLERR | PollFlags::POLLHUP;
            pending
                .iter()
                .zip(&fds)
                .filter_map(|(&i, fd)| fd.revents().filter(|r| !r.is_empty()).map(|r| (i, r.intersects(failed))))
                .collect()
        };
        for &(i, failed) in &over {
            // Only a failed connect needs its error read.
            if failed {
                if let Ok(fd) = &socks[i] {
                    let error = nix::sys::socket::getsockopt(fd, nix::sys::socket::sockopt::SocketError)
                        .map_or_else(io::Error::from, io::Error::from_raw_os_error);
                    socks[i] = Err(error);
                }
            }
        }
        pending.retain(|i| !over.iter().any(|(j, _)| j == i));
    }
    socks
        .into_iter()
        .map(|sock| {
            let fd = sock?;
            // Blocking again: O_NONBLOCK is the only status flag set.
            fcntl(&fd, FcntlArg::F_SETFL(OFlag::empty()))?;
            Ok(fd)
        })
        .collect()
}

/// One stream to the Unix socket `base` + `_port` (blocking,
/// close-on-exec); `@name`: an abstract socket, as the listener's address.
fn connect_unix(base: &std::path::Path, port: u32) -> io::Result<OwnedFd> {
    let mut path = base.to_path_buf().into_os_string();
    path.push(format!("_{port}"));
    let path = PathBuf::from(path);
    if let Some(name) = path.to_str().and_then(|p| p.strip_prefix('@')) {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        return Ok(UnixStream::connect_addr(&addr)?.into());
    }
    Ok(UnixStream::connect(path)?.into())
}

/// The fds the process gets as 0, 1 and 2 (pipe ends or /dev/null).
#[derive(Debug)]
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// A connected host stream and the agent's end of the process's pipe
/// (none with a terminal).
type Stream = (OwnedFd, Option<OwnedFd>);

/// Streams connected and pipes made, copiers not yet started.
#[derive(Debug)]
pub struct PendingIo {
    terminal: bool,
    stdin: Option<Stream>,
    stdout: Option<Stream>,
    stderr: Option<Stream>,
}

/// Connects the streams of `ports` and, without a terminal, makes the
/// pipes the process gets. With `terminal`, no [`ChildStdio`] is returned:
/// the process gets the pty slave, and stderr is unused.
pub fn prepare(dialer: &Dialer, ports: StdioPorts, terminal: bool) -> Result<(PendingIo, Option<ChildStdio>), StdioError> {
    let wanted: Vec<(&'static str, u32)> =
        [("stdin", ports.stdin), ("stdout", ports.stdout), ("stderr", if terminal { 0 } else { ports.stderr })]
            .into_iter()
            .filter(|(_, port)| *port != 0)
            .collect();
    let connected = dialer.connect_all(&wanted.iter().map(|(_, port)| *port).collect::<Vec<_>>());
    let mut socks: Vec<_> = wanted.into_iter().zip(connected).collect();
    let mut take = |name: &'static str| -> Result<Option<OwnedFd>, StdioError> {
        let Some(i) = socks.iter().position(|((stream, _), _)| *stream == name) else { return Ok(None) };
        let ((stream, port), result) = socks.remove(i);
        result.map(Some).map_err(|cause| StdioError::Connect { stream, port, cause })
    };
    let stdin_sock = take("stdin")?;
    let stdout_sock = take("stdout")?;
    let stderr_sock = take("stderr")?;

    if terminal {
        let pending = PendingIo { terminal, stdin: stdin_sock.map(|s| (s, None)), stdout: stdout_sock.map(|s| (s, None)), stderr: None };
        return Ok((pending, None));
    }

    let mut null: Option<OwnedFd> = None;
    let mut dev_null = || -> Result<OwnedFd, StdioError> {
        if null.is_none() {
            let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").map_err(StdioError::DevNull)?;
            null = Some(f.into());
        }
        match &null {
            Some(fd) => fd.try_clone().map_err(StdioError::DevNull),
            None => Err(StdioError::DevNull(io::Error::other("unreachable"))),
        }
    };

    // stdin: the process reads the pipe, the agent writes it.
    let (child_in, stdin) = match stdin_sock {
        Some(sock) => {
            let (r, w) = make_pipe("stdin")?;
            (r, Some((sock, Some(w))))
        }
        None => (dev_null()?, None),
    };
    let mut output = |stream: &'static str, sock: Option<OwnedFd>| -> Result<(OwnedFd, Option<Stream>), StdioError> {
        match sock {
            Some(sock) => {
                let (r, w) = make_pipe(stream)?;
                // Large pipes: fewer wake-ups; not fatal if refused.
                let _ = fcntl(&r, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
                Ok((w, Some((sock, Some(r)))))
            }
            None => Ok((dev_null()?, None)),
        }
    };
    let (child_out, stdout) = output("stdout", stdout_sock)?;
    let (child_err, stderr) = output("stderr", stderr_sock)?;
    Ok((PendingIo { terminal, stdin, stdout, stderr }, Some(ChildStdio { stdin: child_in, stdout: child_out, stderr: child_err })))
}

fn make_pipe(stream: &'static str) -> Result<(OwnedFd, OwnedFd), StdioError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|source| StdioError::Pipe { stream, cause: source })
}

fn eventfd() -> Result<OwnedFd, StdioError> {
    // SAFETY: eventfd(2) with valid flags; the returned descriptor, if any,
    // is owned by nobody else.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(StdioError::EventFd(nix::Error::last()));
    }
    // SAFETY: fd was just returned by eventfd and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn signal_eventfd(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // A full counter (EAGAIN) still reads as "set": nothing to do then.
    let _ = nix::unistd::write(fd, &one);
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

/// How many output streams still have to drain after the exit.
#[derive(Debug, Default)]
struct Drain {
    pending: Mutex<usize>,
    cond: Condvar,
}

impl Drain {
    fn done_one(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        *pending = pending.saturating_sub(1);
        self.cond.notify_all();
    }
}

/// The exit notification the output copiers watch.
#[derive(Debug)]
struct ExitSignal {
    exited: AtomicBool,
    fd: OwnedFd,
}

/// The stdin side's close request.
#[derive(Debug)]
struct StdinControl {
    requested: AtomicBool,
    fd: OwnedFd,
}

/// The running stdio of one process.
#[derive(Debug)]
pub struct ProcessIo {
    exit: Arc<ExitSignal>,
    drain: Arc<Drain>,
    stdin: Option<Arc<StdinControl>>,
    tty: Option<Arc<OwnedFd>>,
}

impl PendingIo {
    /// Whether a terminal was asked for.
    pub fn terminal(&self) -> bool {
        self.terminal
    }

    /// Starts the copiers; `master` is the pty master of a terminal
    /// process (required iff [`PendingIo::terminal`]).
    pub fn start(self, name: &str, master: Option<OwnedFd>) -> Result<ProcessIo, StdioError> {
        let exit = Arc::new(ExitSignal { exited: AtomicBool::new(false), fd: eventfd()? });
        let drain = Arc::new(Drain::default());
        let tty = master.map(Arc::new);
        if let Some(master) = &tty {
            // Shared by the reader and the writer: both cope with EAGAIN.
            set_nonblocking(master.as_fd()).map_err(StdioError::Winsize)?;
        }

        let mut outputs: Vec<(&'static str, OwnedFd, Source)> = Vec::new();
        let mut input: Option<(OwnedFd, Sink)> = None;
        match &tty {
            Some(master) => {
                if let Some((sock, _)) = self.stdout {
                    outputs.push(("stdout", sock, Source::Tty(master.clone())));
                }
                if let Some((sock, _)) = self.stdin {
                    input = Some((sock, Sink::Tty(master.clone())));
                }
            }
            None => {
                for (stream, entry) in [("stdout", self.stdout), ("stderr", self.stderr)] {
                    if let Some((sock, Some(r))) = entry {
                        set_nonblocking(r.as_fd()).map_err(|source| StdioError::Pipe { stream, cause: source })?;
                        outputs.push((stream, sock, Source::Pipe(r)));
                    }
                }
                if let Some((sock, Some(w))) = self.stdin {
                    input = Some((sock, Sink::Pipe(w)));
                }
            }
        }

        *drain.pending.lock().unwrap_or_else(PoisonError::into_inner) = outputs.len();
        for (stream, sock, source) in outputs {
            let (exit, thread_drain) = (exit.clone(), drain.clone());
            spawn(format!("{stream}:{name}"), move || {
                copy_out(stream, source, sock, &exit, &thread_drain);
            })
            .inspect_err(|_| drain.done_one())?;
        }
        let stdin = match input {
            Some((sock, sink)) => {
                let control = Arc::new(StdinControl { requested: AtomicBool::new(false), fd: eventfd()? });
                set_nonblocking(sock.as_fd()).map_err(|source| StdioError::Pipe { stream: "stdin", cause: source })?;
                let c = control.clone();
                spawn(format!("stdin:{name}"), move || copy_in(sock, sink, &c))?;
                Some(control)
            }
            None => None,
        };
        Ok(ProcessIo { exit, drain, stdin, tty })
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<(), StdioError> {
    copiers().run(&name, Box::new(f))
}

/// A copier to run.
pub type Job = Box<dyn FnOnce() + Send>;

/// Copier threads kept for the next process instead of exiting.
///
/// A new thread costs ~0.2 s of guest time on kvm_pvm hosts (clone, stack
/// mapping, its first faults: `../shared/PVM-HOSTS.md`) and each process
/// needs up to three copiers: the agent starts a few at boot
/// ([`start_copiers`]), so that with VM templates they are part of the
/// snapshot and a container's or an exec's start creates no thread.
#[derive(Default)]
pub struct Copiers {
    state: Mutex<PoolState>,
    wake: Condvar,
}

#[derive(Default)]
struct PoolState {
    jobs: std::collections::VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    /// Threads in all.
    threads: usize,
}

impl Copiers {
    /// Runs `job` on an idle thread if there is one, else on a new thread,
    /// which joins the pool when the job ends.
    pub fn run(&'static self, name: &str, job: Job) -> Result<(), StdioError> {
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.idle > state.jobs.len() {
                state.jobs.push_back(job);
                self.wake.notify_one();
                return Ok(());
            }
        }
        tracing::debug!(copier = %name, "no idle copier thread; starting one");
        self.start_thread(Some(job))
    }

    fn start_thread(&'static self, first: Option<Job>) -> Result<(), StdioError> {
        std::thread::Builder::new()
            .name("stdio".into())
            .stack_size(COPIER_STACK)
            .spawn(move || {
                if let Some(job) = first {
                    job();
                }
                self.serve()
            })
            .map_err(StdioError::Thread)?;
        self.state.lock().unwrap_or_else(PoisonError::into_inner).threads += 1;
        Ok(())
    }

    fn serve(&self) -> ! {
        loop {
            let job = {
                let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                state.idle += 1;
                let mut state = self.wake.wait_while(state, |s| s.jobs.is_empty()).unwrap_or_else(PoisonError::into_inner);
                state.idle -= 1;
                state.jobs.pop_front()
            };
            if let Some(job) = job {
                job();
            }
        }
    }

    /// (idle, all) threads.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (state.idle, state.threads)
    }
}

impl std::fmt::Debug for Copiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (idle, threads) = self.counts();
        f.debug_struct("Copiers").field("idle", &idle).field("threads", &threads).finish()
    }
}

/// The agent's copier threads.
pub fn copiers() -> &'static Copiers {
    static COPIERS: std::sync::OnceLock<Copiers> = std::sync::OnceLock::new();
    COPIERS.get_or_init(Copiers::default)
}

/// Starts `n` idle copier threads (call after the signal mask is set:
/// threads inherit it).
pub fn start_copiers(n: usize) -> Result<(), StdioError> {
    for _ in 0..n {
        copiers().start_thread(None)?;
    }
    Ok(())
}

impl ProcessIo {
    /// The reaper saw the process exit: the output copiers drain and report.
    pub fn notify_exit(&self) {
        self.exit.exited.store(true, Ordering::SeqCst);
        signal_eventfd(&self.exit.fd);
    }

    /// Blocks until every output stream has been drained after the exit.
    pub fn wait_drained(&self) {
        let mut pending = self.drain.pending.lock().unwrap_or_else(PoisonError::into_inner);
        while *pending > 0 {
            pending = self.drain.cond.wait(pending).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Closes the process's stdin once what the host already sent is
    /// delivered: the pipe's EOF, or ^D on a terminal. Nothing to do without
    /// a stdin stream.
    pub fn close_stdin(&self) {
        if let Some(control) = &self.stdin {
            control.requested.store(true, Ordering::SeqCst);
            signal_eventfd(&control.fd);
        }
    }

    /// Whether the process has a terminal.
    pub fn is_terminal(&self) -> bool {
        self.tty.is_some()
    }

    /// Sets the terminal's window size; false if there is no terminal.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<bool, StdioError> {
        match &self.tty {
            Some(master) => set_winsize(master.as_fd(), rows, cols).map(|()| true),
            None => Ok(false),
        }
    }
}

/// TIOCSWINSZ on a pty.
pub fn set_winsize(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> Result<(), StdioError> {
    let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a winsize struct from the valid pointer we
    // pass; fd is a live descriptor borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc < 0 {
        return Err(StdioError::Winsize(nix::Error::last()));
    }
    Ok(())
}

enum Source {
    Pipe(OwnedFd),
    Tty(Arc<OwnedFd>),
}

impl Source {
    fn fd(&self) -> RawFd {
        match self {
            Self::Pipe(fd) => fd.as_raw_fd(),
            Self::Tty(fd) => fd.as_raw_fd(),
        }
    }
}

enum Sink {
    Pipe(OwnedFd),
    Tty(Arc<OwnedFd>),
}

impl Sink {
    fn fd(&self) -> RawFd {
        match self {
            Self::Pipe(fd) => fd.as_raw_fd(),
            Self::Tty(fd) => fd.as_raw_fd(),
        }
    }
}

fn raw_read(fd: RawFd, buf: &mut [u8]) -> nix::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes; fd stays open for
    // the call (its owner outlives it).
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(nix::Error::last());
    }
    Ok(n.unsigned_abs())
}

fn raw_write(fd: RawFd, buf: &[u8]) -> nix::Result<usize> {
    // SAFETY: buf is valid for reads of buf.len() bytes; fd stays open for
    // the call.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(nix::Error::last());
    }
    Ok(n.unsigned_abs())
}

/// Writes all of `data`, waiting for room when the descriptor is
/// non-blocking.
fn write_all(fd: RawFd, mut data: &[u8]) -> nix::Result<()> {
    while !data.is_empty() {
        match raw_write(fd, data) {
            Ok(0) => return Err(nix::Error::EPIPE),
            Ok(n) => data = &data[n..],
            Err(nix::Error::EINTR) => {}
            Err(nix::Error::EAGAIN) => {
                // SAFETY: fd is open for the duration of this call.
                let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
                let mut fds = [PollFd::new(borrowed, PollFlags::POLLOUT)];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(nix::Error::EINTR) => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Process output → host stream, until EOF (pipe) or hang-up (pty).
fn copy_out(stream: &'static str, source: Source, sink: OwnedFd, exit: &ExitSignal, drain: &Drain) {
    let tty = matches!(source, Source::Tty(_));
    let src = source.fd();
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut drained = false;
    let mut sink_ok = true;
    loop {
        match raw_read(src, &mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if sink_ok {
                    if let Err(e) = write_all(sink.as_raw_fd(), &buf[..n]) {
                        // The host went away: keep reading (and dropping) so
                        // that the process does not block on a full pipe.
                        tracing::warn!(stream, error = %e, "host stdio stream closed; discarding output");
                        sink_ok = false;
                    }
                }
            }
            Err(nix::Error::EINTR) => {}
            Err(nix::Error::EAGAIN) => {
                let exited = exit.exited.load(Ordering::SeqCst);
                if exited && !drained && !tty {
                    // Empty after the exit: all written before it is sent.
                    drained = true;
                    drain.done_one();
                }
                // SAFETY: src and the eventfd stay open while we poll.
                let src_fd = unsafe { BorrowedFd::borrow_raw(src) };
                let mut fds = vec![PollFd::new(src_fd, PollFlags::POLLIN)];
                if !drained && !exited {
                    fds.push(PollFd::new(exit.fd.as_fd(), PollFlags::POLLIN));
                }
                let timeout = if tty && exited && !drained {
                    PollTimeout::try_from(TTY_DRAIN_QUIET).unwrap_or(PollTimeout::MAX)
                } else {
                    PollTimeout::NONE
                };
                match poll(&mut fds, timeout) {
                    Ok(0) if tty && exited && !drained => {
                        drained = true;
                        drain.done_one();
                    }
                    Ok(_) | Err(nix::Error::EINTR) => {}
                    Err(e) => {
                        tracing::warn!(stream, error = %e, "poll failed");
                        break;
                    }
                }
            }
            // The pty's slave side is closed by everyone: the end.
            Err(nix::Error::EIO) if tty => break,
            Err(e) => {
                tracing::warn!(stream, error = %e, "reading process output");
                break;
            }
        }
    }
    if !drained {
        drain.done_one();
    }
    // Dropping the socket tells the host: EOF.
    drop(sink);
}

/// Host stream → process stdin, until the host's EOF or CloseStdin.
fn copy_in(source: OwnedFd, sink: Sink, control: &StdinControl) {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut by_request = false;
    loop {
        match raw_read(source.as_raw_fd(), &mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Err(e) = write_all(sink.fd(), &buf[..n]) {
                    tracing::debug!(error = %e, "process stdin closed");
                    return;
                }
            }
            Err(nix::Error::EINTR) => {}
            Err(nix::Error::EAGAIN) => {
                if control.requested.load(Ordering::SeqCst) {
                    by_request = true;
                    break;
                }
                let mut fds = [PollFd::new(source.as_fd(), PollFlags::POLLIN), PollFd::new(control.fd.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(nix::Error::EINTR) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "poll failed");
                        break;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "reading the host's stdin stream");
                break;
            }
        }
    }
    match sink {
        // Dropping the write end: the process reads EOF.
        Sink::Pipe(w) => drop(w),
        // A terminal has no EOF of its own: type ^D when asked to close.
        Sink::Tty(master) => {
            if by_request {
                let _ = write_all(master.as_raw_fd(), &[VEOF_CHAR]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn copier_threads_are_reused() {
        use std::sync::mpsc;
        use std::time::{Duration, Instant};
        let pool: &'static Copiers = Box::leak(Box::default());
        let wait_idle = |n: usize| {
            let end = Instant::now() + Duration::from_secs(10);
            while pool.counts().0 < n {
                assert!(Instant::now() < end, "{:?} idle, want {n}", pool.counts());
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let (tx, rx) = mpsc::channel();
        // No idle thread: the first job gets a new one, which then stays.
        let t = tx.clone();
        pool.run("a", Box::new(move || t.send(1).expect("send"))).expect("run");
        assert_eq!(rx.recv().expect("ran"), 1);
        wait_idle(1);
        assert_eq!(pool.counts(), (1, 1));
        // The idle thread runs the next ones: no new thread.
        for i in 2..5 {
            let t = tx.clone();
            pool.run("b", Box::new(move || t.send(i).expect("send"))).expect("run");
            assert_eq!(rx.recv().expect("ran"), i);
            wait_idle(1);
        }
        assert_eq!(pool.counts(), (1, 1));
        // Two at once while one is busy: a second thread.
        let (block_tx, block_rx) = mpsc::channel::<()>();
        pool.run(
            "busy",
            Box::new(move || {
                let _ = block_rx.recv();
            }),
        )
        .expect("run");
        let t = tx.clone();
        pool.run("c", Box::new(move || t.send(9).expect("send"))).expect("run");
        assert_eq!(rx.recv().expect("ran"), 9);
        drop(block_tx);
        wait_idle(2);
        assert_eq!(pool.counts(), (2, 2));
    }

    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    fn listener(dir: &std::path::Path, port: u32) -> UnixListener {
        UnixListener::bind(dir.join(format!("agent.sock_{port}"))).expect("bind")
    }

    #[test]
    fn pipes_copy_both_ways_and_drain_after_exit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dialer = Dialer::Unix { base: dir.path().join("agent.sock") };
        let (lin, lout, lerr) = (listener(dir.path(), 10), listener(dir.path(), 11), listener(dir.path(), 12));
        let ports = StdioPorts { stdin: 10, stdout: 11, stderr: 12 };
        let (pending, child) = prepare(&dialer, ports, false).expect("prepare");
        let child = child.expect("pipes");
        let io = pending.start("t", None).expect("start");
        let (mut host_in, _) = lin.accept().expect("accept stdin");
        let (mut host_out, _) = lout.accept().expect("accept stdout");
        let (mut host_err, _) = lerr.accept().expect("accept stderr");

        // "The process": writes 3 MiB to stdout, a line to stderr, reads stdin.
        let data: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let mut out = std::fs::File::from(child.stdout);
        let mut err = std::fs::File::from(child.stderr);
        let mut inp = std::fs::File::from(child.stdin);
        let writer = {
            let data = data.clone();
            std::thread::spawn(move || {
                out.write_all(&data).expect("write stdout");
                err.write_all(b"oops\n").expect("write stderr");
                // Keeps the pipes open, like a grandchild would.
                (out, err)
            })
        };
        let mut got = vec![0u8; data.len()];
        host_out.read_exact(&mut got).expect("read stdout");
        assert_eq!(got, data);
        let mut line = [0u8; 5];
        host_err.read_exact(&mut line).expect("read stderr");
        assert_eq!(&line, b"oops\n");
        let kept = writer.join().expect("writer");

        host_in.write_all(b"hello").expect("write stdin");
        let mut five = [0u8; 5];
        inp.read_exact(&mut five).expect("read stdin");
        assert_eq!(&five, b"hello");
        io.close_stdin();
        let mut rest = Vec::new();
        inp.read_to_end(&mut rest).expect("EOF on stdin");
        assert!(rest.is_empty());

        // Exit while the write ends are still open: drained all the same.
        io.notify_exit();
        io.wait_drained();
        drop(kept);
        let mut tail = Vec::new();
        host_out.read_to_end(&mut tail).expect("EOF on stdout");
        assert!(tail.is_empty());
    }

    #[test]
    fn unconnected_ports_get_dev_null() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dialer = Dialer::Unix { base: dir.path().join("agent.sock") };
        let (pending, child) = prepare(&dialer, StdioPorts::default(), false).expect("prepare");
        let child = child.expect("fds");
        let mut out = std::fs::File::from(child.stdout);
        out.write_all(b"into the void").expect("write /dev/null");
        let io = pending.start("t", None).expect("start");
        io.notify_exit();
        io.wait_drained();
        io.close_stdin();
        assert!(!io.resize(1, 1).expect("no tty"));
    }

    #[test]
    fn a_missing_listener_names_the_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dialer = Dialer::Unix { base: dir.path().join("agent.sock") };
        let ports = StdioPorts { stdin: 0, stdout: 7, stderr: 0 };
        let err = prepare(&dialer, ports, false).expect_err("nobody listens");
        assert!(err.to_string().contains("stdout"), "{err}");
        assert!(err.to_string().contains('7'), "{err}");
    }
}
