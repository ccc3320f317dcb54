//! Host-side helpers that connect to an agent and make a ttrpc client.
//!
//! Two ways in:
//! - a plain Unix socket the agent listens on (`carapace-agent --listen
//!   unix:///path`, agent tests on the host): [`connect_unix`];
//! - the VMM's hybrid vsock socket: connect to it, write `CONNECT <port>\n`,
//!   read `OK <host port>\n`, then the stream is a byte pipe to the guest's
//!   listener on `<port>`: [`connect_hybrid_vsock`], and [`wait_for_agent`]
//!   which retries that until the booting guest's agent answers
//!   `Health.Check`.
//!
//! The typed clients are built on the returned [`ttrpc::Client`] (it is
//! cheap to clone; clones share the connection):
//!
//! ```no_run
//! use carapace_protocol::{client, health, AgentClient, HealthClient};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let conn = client::connect_hybrid_vsock("/run/carapace/c1/vsock.sock", 1024,
//!     std::time::Duration::from_secs(5))?;
//! let health = HealthClient::new(conn.clone());
//! let agent = AgentClient::new(conn);
//! let ctx = ttrpc::context::with_timeout(5_000_000_000);
//! let status = health.check(ctx, &health::CheckRequest::new())?;
//! # let _ = (status, agent); Ok(()) }
//! ```

use std::io::{self, Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::health::check_response::ServingStatus;
use crate::health::CheckRequest;
use crate::HealthClient;

/// The longest handshake answer accepted (`OK 4294967295\n` is 14 bytes).
const MAX_HANDSHAKE_LINE: usize = 64;

/// Pause between attempts in [`wait_for_agent`].
const RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Longest single connection attempt or `Health.Check` in
/// [`wait_for_agent`]. Generous: an emulated guest on a loaded host may take
/// seconds to answer, and giving up early only piles up dead connections.
/// A VMM that dies fails the attempt at once anyway.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a connection to the agent could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The Unix socket could not be connected.
    #[error("connecting to {}: {cause}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What `connect(2)` said.
        cause: io::Error,
    },
    /// Writing the request or reading the answer of the handshake failed.
    #[error("hybrid vsock handshake for port {port}: {cause}")]
    HandshakeIo {
        /// The guest port asked for.
        port: u32,
        /// The I/O error (a timeout shows as `WouldBlock`/`TimedOut`).
        cause: io::Error,
    },
    /// The VMM closed the connection instead of answering: typically
    /// nothing listens on that guest port yet.
    #[error("hybrid vsock handshake for port {port}: closed by the VMM (nothing listening yet?)")]
    HandshakeClosed {
        /// The guest port asked for.
        port: u32,
    },
    /// The VMM answered something other than `OK <port>`.
    #[error("hybrid vsock handshake for port {port}: unexpected answer {answer:?}")]
    HandshakeRejected {
        /// The guest port asked for.
        port: u32,
        /// What came back (lossy UTF-8, at most [`MAX_HANDSHAKE_LINE`] bytes).
        answer: String,
    },
    /// The ttrpc client could not be set up on the connected stream.
    #[error("setting up the ttrpc client: {0}")]
    Ttrpc(ttrpc::Error),
    /// The agent answered `Health.Check` with something else than SERVING.
    #[error("the agent is not serving (status {0:?})")]
    NotServing(ServingStatus),
    /// [`wait_for_agent`] gave up.
    #[error("the agent did not answer within {waited:?}; last error: {last}")]
    Timeout {
        /// How long it tried.
        waited: Duration,
        /// The error of the last attempt.
        last: Box<ClientError>,
    },
}

/// Connects to an agent listening on the Unix socket `path` (`--listen
/// unix://<path>`).
pub fn connect_unix(path: impl AsRef<Path>) -> Result<ttrpc::Client, ClientError> {
    let path = path.as_ref();
    let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect { path: path.to_owned(), cause: source })?;
    client_from_stream(stream)
}

/// Makes a ttrpc client of a connected stream; the client owns it from now
/// on and closes it when its last clone is dropped.
pub fn client_from_stream(stream: UnixStream) -> Result<ttrpc::Client, ClientError> {
    ttrpc::Client::new(stream.into_raw_fd()).map_err(ClientError::Ttrpc)
}

/// Performs the host side of the hybrid vsock handshake on a stream already
/// connected to the VMM's socket: writes `CONNECT <port>\n` and reads the
/// answer `OK <host port>\n`, returning the host port.
///
/// The answer is read one byte at a time, so nothing that follows it (the
/// guest's first bytes) is consumed. Timeouts are the caller's, set on the
/// stream.
pub fn hybrid_vsock_handshake<S: Read + Write>(stream: &mut S, port: u32) -> Result<u32, ClientError> {
    let io_err = |source| ClientError::HandshakeIo { port, cause: source };
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(io_err)?;

    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) if line.is_empty() => return Err(ClientError::HandshakeClosed { port }),
            Ok(0) => return Err(rejected(port, &line)),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_HANDSHAKE_LINE => return Err(rejected(port, &line)),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }

    std::str::from_utf8(&line)
        .ok()
        .and_then(|s| s.strip_prefix("OK "))
        .and_then(|n| n.trim_end_matches('\r').parse::<u32>().ok())
        .ok_or_else(|| rejected(port, &line))
}

fn rejected(port: u32, line: &[u8]) -> ClientError {
    ClientError::HandshakeRejected { port, answer: String::from_utf8_lossy(line).into_owned() }
}

/// Connects to the VMM's hybrid vsock socket `uds` and opens a stream to the
/// guest's vsock `port` (`timeout` bounds the handshake). The returned
/// stream is blocking and has no timeouts set.
pub fn connect_hybrid_vsock_stream(uds: impl AsRef<Path>, port: u32, timeout: Duration) -> Result<UnixStream, ClientError> {
    let uds = uds.as_ref();
    let mut stream = UnixStream::connect(uds).map_err(|source| ClientError::Connect { path: uds.to_owned(), cause: source })?;
    let io_err = |source| ClientError::HandshakeIo { port, cause: source };
    // A zero Duration is refused by set_*_timeout: treat it as "tiny".
    let timeout = Some(timeout.max(Duration::from_millis(1)));
    stream.set_read_timeout(timeout).map_err(io_err)?;
    stream.set_write_timeout(timeout).map_err(io_err)?;
    hybrid_vsock_handshake(&mut stream, port)?;
    stream.set_read_timeout(None).map_err(io_err)?;
    stream.set_write_timeout(None).map_err(io_err)?;
    Ok(stream)
}

/// Like [`connect_hybrid_vsock_stream`], then makes a ttrpc client of the
/// stream.
pub fn connect_hybrid_vsock(uds: impl AsRef<Path>, port: u32, timeout: Duration) -> Result<ttrpc::Client, ClientError> {
    client_from_stream(connect_hybrid_vsock_stream(uds, port, timeout)?)
}

/// Waits for the agent of a booting VM: retries [`connect_hybrid_vsock`] to
/// [`AGENT_VSOCK_PORT`](crate::AGENT_VSOCK_PORT) and `Health.Check` until it
/// answers SERVING or `timeout` has passed (the VMM's socket may not even
/// exist yet when this starts).
pub fn wait_for_agent(uds: impl AsRef<Path>, timeout: Duration) -> Result<ttrpc::Client, ClientError> {
    let uds = uds.as_ref();
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let attempt = connect_hybrid_vsock(uds, crate::AGENT_VSOCK_PORT, left.min(CHECK_TIMEOUT))
            .and_then(|client| check_serving(&client, left.min(CHECK_TIMEOUT)).map(|()| client));
        match attempt {
            Ok(client) => return Ok(client),
            Err(last) if start.elapsed() + RETRY_INTERVAL >= timeout => {
                return Err(ClientError::Timeout { waited: start.elapsed(), last: Box::new(last) })
            }
            Err(_) => std::thread::sleep(RETRY_INTERVAL),
        }
    }
}

/// Asks `Health.Check` and fails unless the agent answers SERVING.
pub fn check_serving(client: &ttrpc::Client, timeout: Duration) -> Result<(), ClientError> {
    let health = HealthClient::new(client.clone());
    let nanos = i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX).max(1);
    let resp = health.check(ttrpc::context::with_timeout(nanos), &CheckRequest::new()).map_err(ClientError::Ttrpc)?;
    match resp.status.enum_value() {
        Ok(ServingStatus::SERVING) => Ok(()),
        Ok(other) => Err(ClientError::NotServing(other)),
        Err(_) => Err(ClientError::NotServing(ServingStatus::UNKNOWN)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    #[test]
    fn a_cause_is_printed_once() {
        let inner = ClientError::Connect { path: "/x.sock".into(), cause: io::Error::other("refused") };
        let e = ClientError::Timeout { waited: Duration::from_secs(1), last: Box::new(inner) };
        let mut text = e.to_string();
        let mut next = std::error::Error::source(&e);
        while let Some(cause) = next {
            text.push_str(&format!(": {cause}"));
            next = cause.source();
        }
        assert_eq!(text.matches("refused").count(), 1, "{text}");
    }

    /// A fake VMM socket: accepts one connection, checks the request line,
    /// answers `answer` and then `extra` in the same write, and returns
    /// what it read afterwards.
    fn fake_vmm(listener: UnixListener, want_port: u32, answer: &'static [u8], extra: &'static [u8]) -> thread::JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut req = Vec::new();
            let mut byte = [0u8; 1];
            while conn.read(&mut byte).expect("read") == 1 && byte[0] != b'\n' {
                req.push(byte[0]);
            }
            assert_eq!(req, format!("CONNECT {want_port}").into_bytes());
            let mut out = answer.to_vec();
            out.extend_from_slice(extra);
            conn.write_all(&out).expect("write");
            let mut rest = vec![0u8; 5];
            conn.read_exact(&mut rest).expect("read after handshake");
            rest
        })
    }

    #[test]
    fn handshake_leaves_following_bytes_unread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vm.sock");
        let vmm = fake_vmm(UnixListener::bind(&path).expect("bind"), 1024, b"OK 1073741824\n", b"guest");

        let mut stream = connect_hybrid_vsock_stream(&path, 1024, Duration::from_secs(5)).expect("handshake");
        let mut first = [0u8; 5];
        stream.read_exact(&mut first).expect("read guest bytes");
        assert_eq!(&first, b"guest");
        stream.write_all(b"hello").expect("write");
        assert_eq!(vmm.join().expect("fake vmm"), b"hello");
    }

    #[test]
    fn handshake_parses_port() {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        b.write_all(b"OK 42\n").expect("write");
        assert_eq!(hybrid_vsock_handshake(&mut a, 7).expect("handshake"), 42);
        let mut req = [0u8; 10];
        b.read_exact(&mut req).expect("read");
        assert_eq!(&req, b"CONNECT 7\n");
    }

    #[test]
    fn handshake_rejects_other_answers() {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        b.write_all(b"ERR no listener\n").expect("write");
        match hybrid_vsock_handshake(&mut a, 7) {
            Err(ClientError::HandshakeRejected { port: 7, answer }) => {
                assert_eq!(answer, "ERR no listener");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn handshake_reports_close() {
        let (mut a, b) = UnixStream::pair().expect("pair");
        drop(b);
        // Writing to a closed peer fails (EPIPE) or the read sees EOF.
        assert!(matches!(
            hybrid_vsock_handshake(&mut a, 7),
            Err(ClientError::HandshakeClosed { port: 7 } | ClientError::HandshakeIo { port: 7, .. })
        ));
    }

    #[test]
    fn handshake_bounds_the_answer() {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        b.write_all(&[b'x'; 200]).expect("write");
        assert!(matches!(hybrid_vsock_handshake(&mut a, 7), Err(ClientError::HandshakeRejected { .. })));
    }

    #[test]
    fn handshake_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vm.sock");
        let _listener = UnixListener::bind(&path).expect("bind");
        // Nobody accepts or answers: the read must time out.
        let err = connect_hybrid_vsock_stream(&path, 1024, Duration::from_millis(50)).expect_err("no answer");
        assert!(matches!(err, ClientError::HandshakeIo { .. }), "{err:?}");
    }

    #[test]
    fn wait_for_agent_gives_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        match wait_for_agent(dir.path().join("missing.sock"), Duration::from_millis(250)) {
            Err(ClientError::Timeout { last, .. }) => {
                assert!(matches!(*last, ClientError::Connect { .. }), "{last:?}");
            }
            Err(other) => panic!("unexpected {other:?}"),
            Ok(_) => panic!("connected to nothing"),
        }
    }
}
