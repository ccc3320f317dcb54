//! The one stdio relay between a guest process and the host, for both front
//! ends: the CLI's own stdio or a console-socket pty, the shim's containerd
//! FIFOs and `file://` logs.
//!
//! The agent connects to host vsock ports; the VMM turns a guest connection
//! to port P into a connection to the Unix socket `<vsock uds>_P`, where we
//! listen. [`StdioPorts::bind`] binds one port per stream before the agent is
//! asked to connect (their numbers go in the request,
//! [`StdioPorts::streams`]); [`StdioPorts::start`] starts one thread per
//! stream, which accepts the agent's connection, opens the host end and
//! copies:
//! - output until the agent closes the stream (it does once the process's
//!   output ended), then the host end is closed: a FIFO's reader sees EOF
//!   after the last byte;
//! - input until the host end ends, then the stream's write half is shut
//!   (the process sees EOF).
//!
//! Port policy: a process walks the port range from a start derived from its
//! pid and the clock, one port after the other, skipping ports in use. Every
//! process on the host may bind stdio ports of one VM (the shim, `carapace
//! exec` from several shells), so starts are spread; within a process, ports
//! are not reused until the range wraps.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use carapace_protocol::agent::StdioStreams;

/// The first stdio port (above the agent's own, 1024).
const FIRST_PORT: u32 = 10_000;
/// How many ports stdio uses.
const PORT_SPAN: u32 = 50_000;
/// How many ports one bind tries before giving up.
const BIND_TRIES: u32 = 1024;

/// Errors setting up a relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot listen on {path}: {err}")]
    Listen { path: PathBuf, err: std::io::Error },
    #[error("no free vsock port for stdio next to {0}")]
    NoPort(PathBuf),
}

/// The host end of one stream.
#[derive(Debug)]
pub enum HostEnd {
    /// An open file: the caller's own stdio, a pty.
    File(File),
    /// A path opened once the agent connected, for writing (output) or
    /// reading (input): a FIFO's open waits for its other end.
    Fifo(PathBuf),
    /// Output appended to a regular file, created (mode 0600) if missing;
    /// input read from it.
    Append(PathBuf),
}

impl HostEnd {
    fn open_output(self) -> std::io::Result<File> {
        match self {
            Self::File(f) => Ok(f),
            Self::Fifo(p) => OpenOptions::new().write(true).open(p),
            Self::Append(p) => OpenOptions::new().append(true).create(true).mode(0o600).open(p),
        }
    }

    fn open_input(self) -> std::io::Result<File> {
        match self {
            Self::File(f) => Ok(f),
            Self::Fifo(p) | Self::Append(p) => OpenOptions::new().read(true).open(p),
        }
    }
}

/// Where a process's streams go on the host; a stream without an end is
/// not connected (port 0: the agent gives the process nothing there).
#[derive(Debug, Default)]
pub struct HostStdio {
    pub stdin: Option<HostEnd>,
    pub stdout: Option<HostEnd>,
    pub stderr: Option<HostEnd>,
    /// What an output does when its host end stops taking bytes (the reader
    /// went away): `true` keeps reading the process's output and discards
    /// it, so that the process never blocks on a full stream (containerd
    /// restarting must not stall a container); `false` drops the stream, so
    /// that the process's next write fails as it would on a closed pipe (a
    /// CLI whose output was closed, as under runc).
    pub drain_closed_output: bool,
}

/// A listening host port; its socket file goes when the agent connected
/// or the relay ended.
#[derive(Debug)]
struct Listener {
    port: u32,
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Listener {
    /// Waits for the agent's connection; `None` if the relay was cancelled
    /// meanwhile (the connection was our own wake-up).
    fn accept(self, cancelled: &AtomicBool) -> Option<UnixStream> {
        let stream = self.listener.accept().ok().map(|(s, _)| s)?;
        (!cancelled.load(Ordering::SeqCst)).then_some(stream)
    }
}

/// The socket path of `port` on the VM whose vsock socket is `uds`.
fn port_path(uds: &Path, port: u32) -> PathBuf {
    PathBuf::from(format!("{}_{port}", uds.display()))
}

/// The ports this process tries next (see the module docs).
fn candidates() -> impl Iterator<Item = u32> {
    static START: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        std::process::id().wrapping_mul(7).wrapping_add(nanos) % PORT_SPAN
    });
    (0..BIND_TRIES).map(move |_| FIRST_PORT + start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % PORT_SPAN)
}

/// Binds the first of `ports` that is free.
fn bind_first(uds: &Path, ports: impl IntoIterator<Item = u32>) -> Result<Listener, RelayError> {
    for port in ports {
        let path = port_path(uds, port);
        match UnixListener::bind(&path) {
            Ok(listener) => return Ok(Listener { port, listener, path }),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(err) => return Err(RelayError::Listen { path, err }),
        }
    }
    Err(RelayError::NoPort(uds.to_path_buf()))
}

/// The bound ports of one process's streams, before the agent is asked to
/// connect.
#[derive(Debug)]
pub struct StdioPorts {
    stdin: Option<(Listener, HostEnd)>,
    stdout: Option<(Listener, HostEnd)>,
    stderr: Option<(Listener, HostEnd)>,
    drain_closed_output: bool,
}

impl StdioPorts {
    /// Binds a port for each stream `host` has an end for, on the VM whose
    /// vsock socket is `uds`.
    pub fn bind(uds: &Path, host: HostStdio) -> Result<Self, RelayError> {
        let one = |end: Option<HostEnd>| -> Result<Option<(Listener, HostEnd)>, RelayError> {
            end.map(|end| Ok((bind_first(uds, candidates())?, end))).transpose()
        };
        Ok(Self {
            stdin: one(host.stdin)?,
            stdout: one(host.stdout)?,
            stderr: one(host.stderr)?,
            drain_closed_output: host.drain_closed_output,
        })
    }

    /// The ports to give the agent (0: not connected).
    pub fn streams(&self) -> StdioStreams {
        let port = |p: &Option<(Listener, HostEnd)>| p.as_ref().map_or(0, |(l, _)| l.port);
        let mut s = StdioStreams::new();
        s.stdin_port = port(&self.stdin);
        s.stdout_port = port(&self.stdout);
        s.stderr_port = port(&self.stderr);
        s
    }

    /// Starts one thread per stream; each waits for the agent's connection.
    pub fn start(self) -> Relay {
        let mut relay = Relay {
            outputs: Vec::new(),
            stdin: None,
            stdin_stream: Arc::new(Mutex::new(None)),
            stdin_fifo: None,
            stdin_listener: None,
            stdin_cancelled: Arc::new(AtomicBool::new(false)),
            listeners: Vec::new(),
            cancelled: Arc::new(AtomicBool::new(false)),
        };
        if let Some((listener, end)) = self.stdin {
            relay.stdin_listener = Some(listener.path.clone());
            if let HostEnd::Fifo(p) = &end {
                relay.stdin_fifo = Some(p.clone());
            }
            let slot = relay.stdin_stream.clone();
            let cancelled = relay.stdin_cancelled.clone();
            relay.stdin = Some(std::thread::spawn(move || copy_input(listener, end, &slot, &cancelled)));
        }
        let drain = self.drain_closed_output;
        for (listener, end) in [self.stdout, self.stderr].into_iter().flatten() {
            relay.listeners.push(listener.path.clone());
            let cancelled = relay.cancelled.clone();
            relay.outputs.push(std::thread::spawn(move || copy_output(listener, end, drain, &cancelled)));
        }
        relay
    }
}

fn copy_output(listener: Listener, end: HostEnd, drain: bool, cancelled: &AtomicBool) {
    let Some(mut stream) = listener.accept(cancelled) else { return };
    let what = format!("{end:?}");
    let mut sink = match end.open_output() {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, end = %what, "cannot open the output; discarding it");
            if drain {
                let _ = std::io::copy(&mut stream, &mut std::io::sink());
            }
            return;
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if sink.write_all(&buf[..n]).is_err() {
                    if drain {
                        let _ = std::io::copy(&mut stream, &mut std::io::sink());
                    }
                    return;
                }
            }
        }
    }
    let _ = sink.flush();
}

fn copy_input(listener: Listener, end: HostEnd, slot: &Mutex<Option<UnixStream>>, cancelled: &AtomicBool) {
    let Some(mut stream) = listener.accept(cancelled) else { return };
    if let (Ok(clone), Ok(mut s)) = (stream.try_clone(), slot.lock()) {
        *s = Some(clone);
    }
    let what = format!("{end:?}");
    match end.open_input() {
        Ok(mut input) if !cancelled.load(Ordering::SeqCst) => {
            let _ = std::io::copy(&mut input, &mut stream);
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, end = %what, "cannot open stdin"),
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// The running copies of one process's streams.
#[derive(Debug)]
pub struct Relay {
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<JoinHandle<()>>,
    stdin_stream: Arc<Mutex<Option<UnixStream>>>,
    stdin_fifo: Option<PathBuf>,
    stdin_listener: Option<PathBuf>,
    stdin_cancelled: Arc<AtomicBool>,
    listeners: Vec<PathBuf>,
    cancelled: Arc<AtomicBool>,
}

fn join_within(handle: &JoinHandle<()>, end: Instant) -> bool {
    while !handle.is_finished() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.is_finished()
}

impl Relay {
    /// Waits up to `timeout` for every output to reach EOF (background
    /// children holding the process's stdout must not hold its exit).
    /// True if all did.
    pub fn finish_output(&mut self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let mut all = true;
        for h in self.outputs.drain(..) {
            if join_within(&h, end) {
                let _ = h.join();
            } else {
                all = false;
            }
        }
        all
    }

    /// Closes the process's stdin: what the host end already holds is
    /// delivered first (up to `grace`), then the stream is shut.
    pub fn close_stdin(&mut self, grace: Duration) {
        let Some(h) = self.stdin.take() else { return };
        if join_within(&h, Instant::now() + grace) {
            let _ = h.join();
            return;
        }
        self.stdin_cancelled.store(true, Ordering::SeqCst);
        match self.stdin_stream.lock().ok().and_then(|mut s| s.take()) {
            Some(s) => {
                let _ = s.shutdown(Shutdown::Write);
            }
            // Still waiting for the agent: wake the accept.
            None => {
                if let Some(path) = &self.stdin_listener {
                    let _ = UnixStream::connect(path);
                }
            }
        }
        // A relay still waiting for a writer to open the FIFO: be that
        // writer for a moment, so that it sees EOF and ends.
        if let Some(p) = &self.stdin_fifo {
            let _ = OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(p);
        }
    }

    /// Ends threads still waiting for the agent to connect (the process was
    /// never created) and the stdin copy.
    pub fn cancel(&mut self) {
        self.cancelled.store(true, Ordering::SeqCst);
        for path in &self.listeners {
            let _ = UnixStream::connect(path);
        }
        self.close_stdin(Duration::ZERO);
    }
}

#[cfg(test)]
mod tests;
