//! stdio of a guest process: containerd's FIFOs (or `file://` paths) on the
//! host, bridged to the agent's vsock streams. The agent connects to host
//! vsock ports; the VMM turns a guest connection to port P into one to the
//! Unix socket `<vsock uds>_P`, where we listen.
//!
//! Outputs are copied until the agent closes the stream (it does once the
//! process's output ended), then the FIFO is closed: containerd's reader sees
//! EOF after the last byte. Input is copied until the FIFO's writer closes
//! it, then the stream's write half is shut (the process sees EOF).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use carapace_protocol::agent::StdioStreams;

/// Errors setting up stdio.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot listen on {path}")]
    Listen { path: PathBuf, source: std::io::Error },
    #[error("no free vsock port for stdio next to {0}")]
    NoPort(PathBuf),
    #[error("unsupported stdio URI {0:?}: FIFO paths and file:// URIs are supported")]
    Unsupported(String),
}

/// Where containerd wants a process's stdio. Empty = none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// A host end of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A FIFO (or any path) opened as is; opening waits for the other end.
    Fifo(PathBuf),
    /// `file://PATH`: output appended to a regular file.
    File(PathBuf),
}

fn target(uri: &str) -> Result<Option<Target>, IoError> {
    if uri.is_empty() {
        return Ok(None);
    }
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(Some(Target::File(PathBuf::from(path))));
    }
    if uri.contains("://") {
        return Err(IoError::Unsupported(uri.to_string()));
    }
    Ok(Some(Target::Fifo(PathBuf::from(uri))))
}

impl Target {
    fn open_output(&self) -> std::io::Result<File> {
        match self {
            Self::Fifo(p) => OpenOptions::new().write(true).open(p),
            Self::File(p) => OpenOptions::new().append(true).create(true).mode(0o600).open(p),
        }
    }

    fn open_input(&self) -> std::io::Result<File> {
        match self {
            Self::Fifo(p) | Self::File(p) => OpenOptions::new().read(true).open(p),
        }
    }
}

/// A listening host port; its socket file is removed on drop.
#[derive(Debug)]
struct Port {
    port: u32,
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for Port {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Next port to try; ports are per VM, and one shim owns one VM.
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);
const FIRST_PORT: u32 = 20_000;
const PORT_SPAN: u32 = 40_000;

fn bind_port(uds: &Path) -> Result<Port, IoError> {
    for _ in 0..1024 {
        let port = FIRST_PORT + NEXT_PORT.fetch_add(1, Ordering::Relaxed) % PORT_SPAN;
        let path = PathBuf::from(format!("{}_{port}", uds.display()));
        match UnixListener::bind(&path) {
            Ok(listener) => return Ok(Port { port, listener, path }),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(source) => return Err(IoError::Listen { path, source }),
        }
    }
    Err(IoError::NoPort(uds.to_path_buf()))
}

/// Listeners bound for one process, before the agent is asked to connect.
#[derive(Debug)]
pub struct PendingIo {
    stdin: Option<(Port, Target)>,
    stdout: Option<(Port, Target)>,
    stderr: Option<(Port, Target)>,
}

impl PendingIo {
    /// Binds a port for each stream `paths` names (with a terminal, stderr
    /// is part of the terminal's output and not bound).
    pub fn bind(uds: &Path, paths: &StdioPaths) -> Result<Self, IoError> {
        let one = |uri: &str| -> Result<Option<(Port, Target)>, IoError> {
            match target(uri)? {
                Some(t) => Ok(Some((bind_port(uds)?, t))),
                None => Ok(None),
            }
        };
        let stderr = if paths.terminal { None } else { one(&paths.stderr)? };
        Ok(Self { stdin: one(&paths.stdin)?, stdout: one(&paths.stdout)?, stderr })
    }

    /// The ports to give the agent (0: not connected).
    pub fn streams(&self) -> StdioStreams {
        let port = |p: &Option<(Port, Target)>| p.as_ref().map_or(0, |(p, _)| p.port);
        let mut s = StdioStreams::new();
        s.stdin_port = port(&self.stdin);
        s.stdout_port = port(&self.stdout);
        s.stderr_port = port(&self.stderr);
        s
    }

    /// Starts one thread per stream; each waits for the agent's connection.
    pub fn start(self) -> Relay {
        let cancelled = Arc::new(AtomicBool::new(false));
        let mut relay = Relay {
            outputs: Vec::new(),
            stdin: None,
            stdin_stream: Arc::new(Mutex::new(None)),
            stdin_fifo: None,
            stdin_listener: None,
            stdin_cancelled: Arc::new(AtomicBool::new(false)),
            listeners: Vec::new(),
            cancelled: cancelled.clone(),
        };
        if let Some((port, target)) = self.stdin {
            relay.stdin_listener = Some(port.path.clone());
            if let Target::Fifo(p) = &target {
                relay.stdin_fifo = Some(p.clone());
            }
            let slot = relay.stdin_stream.clone();
            let cancelled = relay.stdin_cancelled.clone();
            relay.stdin = Some(std::thread::spawn(move || copy_input(&port, &target, &slot, &cancelled)));
        }
        for (port, target) in [self.stdout, self.stderr].into_iter().flatten() {
            relay.listeners.push(port.path.clone());
            let cancelled = cancelled.clone();
            relay.outputs.push(std::thread::spawn(move || copy_output(&port, &target, &cancelled)));
        }
        relay
    }
}

fn accept(port: &Port, cancelled: &AtomicBool) -> Option<UnixStream> {
    let stream = port.listener.accept().ok().map(|(s, _)| s)?;
    (!cancelled.load(Ordering::SeqCst)).then_some(stream)
}

fn copy_output(port: &Port, target: &Target, cancelled: &AtomicBool) {
    let Some(mut stream) = accept(port, cancelled) else { return };
    let mut sink = match target.open_output() {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, ?target, "cannot open the output; discarding it");
            let _ = std::io::copy(&mut stream, &mut std::io::sink());
            return;
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if sink.write_all(&buf[..n]).is_err() {
                    // The reader went away: keep draining, so that the
                    // process is not blocked by a full stream.
                    let _ = std::io::copy(&mut stream, &mut std::io::sink());
                    break;
                }
            }
        }
    }
}

fn copy_input(port: &Port, target: &Target, slot: &Mutex<Option<UnixStream>>, cancelled: &AtomicBool) {
    let Some(mut stream) = accept(port, cancelled) else { return };
    if let (Ok(clone), Ok(mut s)) = (stream.try_clone(), slot.lock()) {
        *s = Some(clone);
    }
    match target.open_input() {
        Ok(mut input) if !cancelled.load(Ordering::SeqCst) => {
            let _ = std::io::copy(&mut input, &mut stream);
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, ?target, "cannot open stdin"),
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

    /// Closes the process's stdin: what the FIFO's writer already wrote is
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
mod tests {
    use super::*;

    fn mkfifo(path: &Path) {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    }

    #[test]
    fn targets() {
        assert_eq!(target("").expect("empty"), None);
        assert_eq!(target("/run/x/stdout").expect("fifo"), Some(Target::Fifo("/run/x/stdout".into())));
        assert_eq!(target("file:///var/log/c.log").expect("file"), Some(Target::File("/var/log/c.log".into())));
        assert!(matches!(target("binary:///usr/bin/logger?x=1"), Err(IoError::Unsupported(_))));
    }

    #[test]
    fn relays_fifos_both_ways_and_removes_its_sockets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("vsock.sock");
        let (stdin, stdout) = (dir.path().join("in"), dir.path().join("out"));
        mkfifo(&stdin);
        mkfifo(&stdout);
        let err_file = dir.path().join("err.log");
        let paths = StdioPaths {
            stdin: stdin.display().to_string(),
            stdout: stdout.display().to_string(),
            stderr: format!("file://{}", err_file.display()),
            terminal: false,
        };
        let pending = PendingIo::bind(&uds, &paths).expect("bind");
        let s = pending.streams();
        assert!(s.stdin_port != 0 && s.stdout_port != 0 && s.stderr_port != 0);
        let mut relay = pending.start();

        // containerd's side: a reader on stdout, a writer on stdin.
        let reader = {
            let stdout = stdout.clone();
            std::thread::spawn(move || std::fs::read(stdout).expect("read stdout"))
        };
        let writer = {
            let stdin = stdin.clone();
            std::thread::spawn(move || {
                let mut f = OpenOptions::new().write(true).open(stdin).expect("open stdin");
                f.write_all(b"typed").expect("write stdin");
            })
        };
        // The agent's side.
        let connect = |p: u32| UnixStream::connect(format!("{}_{p}", uds.display())).expect("connect");
        let mut g_in = connect(s.stdin_port);
        let mut g_out = connect(s.stdout_port);
        let mut g_err = connect(s.stderr_port);
        let mut typed = Vec::new();
        g_in.read_to_end(&mut typed).expect("stdin EOF");
        assert_eq!(typed, b"typed");
        writer.join().expect("writer");
        let data: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
        g_out.write_all(&data).expect("stdout");
        g_err.write_all(b"oops\n").expect("stderr");
        drop((g_out, g_err));
        relay.finish_output(Duration::from_secs(10));
        assert_eq!(reader.join().expect("reader"), data);
        assert_eq!(std::fs::read(&err_file).expect("err"), b"oops\n");
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("vsock.sock_"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn close_stdin_without_a_writer_and_cancel_without_the_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("vsock.sock");
        let stdin = dir.path().join("in");
        mkfifo(&stdin);
        let paths = StdioPaths { stdin: stdin.display().to_string(), terminal: true, ..Default::default() };
        let pending = PendingIo::bind(&uds, &paths).expect("bind");
        let port = pending.streams().stdin_port;
        let mut relay = pending.start();
        let mut g_in = UnixStream::connect(format!("{}_{port}", uds.display())).expect("connect");
        // Nobody ever opens the FIFO for writing; CloseIO must still end it.
        relay.close_stdin(Duration::from_millis(100));
        let mut rest = Vec::new();
        g_in.read_to_end(&mut rest).expect("EOF");
        assert!(rest.is_empty());

        let paths = StdioPaths { stdout: dir.path().join("never").display().to_string(), ..Default::default() };
        let mut relay = PendingIo::bind(&uds, &paths).expect("bind").start();
        relay.cancel();
        assert!(relay.finish_output(Duration::from_secs(10)), "the output thread did not end");
    }
}
