//! The monitor's control socket (`monitor.sock` in a container's state
//! directory): one JSON line in, one out, so that a CLI command reuses the
//! monitor's agent connection instead of opening its own. The monitor
//! serves it ([`serve`]); `carapace start` asks ([`ask`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use carapace_protocol::agent;
use serde::{Deserialize, Serialize};

use crate::guest::Guest;
use crate::sandbox::SandboxError;

/// Why the monitor could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("monitor control socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("monitor control socket {path}: cannot encode the request")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("monitor control socket {path}: the monitor closed the connection without an answer")]
    NoAnswer { path: PathBuf },
    #[error("monitor control socket {path}: bad answer")]
    BadAnswer {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The monitor's control socket in a container's state directory.
pub fn path(dir: &Path) -> PathBuf {
    dir.join("monitor.sock")
}

/// A request on the control socket.
#[derive(Debug, Serialize, Deserialize)]
pub enum ControlRequest {
    /// StartContainer.
    Start,
}

/// The answer: the guest pid, or why not.
#[derive(Debug, Serialize, Deserialize)]
pub struct ControlReply {
    pub pid: u32,
    pub error: Option<String>,
}

/// Binds the control socket and answers on it in a thread until we exit.
/// Failing to bind only costs `start` its own agent connection.
pub fn serve(path: &Path, guest: &Arc<dyn Guest>, id: &str) {
    let _ = std::fs::remove_file(path);
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no control socket; start connects to the agent itself");
            return;
        }
    };
    let guest = guest.clone();
    let id = id.to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(conn) => answer(conn, guest.as_ref(), &id),
                Err(e) => tracing::debug!(error = %e, "control socket accept"),
            }
        }
    });
}

fn answer(conn: UnixStream, guest: &dyn Guest, id: &str) {
    let mut line = String::new();
    if BufReader::new(&conn).read_line(&mut line).is_err() {
        return;
    }
    let reply = match serde_json::from_str::<ControlRequest>(line.trim()) {
        Ok(ControlRequest::Start) => {
            let mut req = agent::StartContainerRequest::new();
            req.container_id = id.into();
            match guest.start_container(&req) {
                Ok(r) => ControlReply { pid: r.pid, error: None },
                Err(e) => ControlReply { pid: 0, error: Some(SandboxError::agent("StartContainer", e).to_string()) },
            }
        }
        Err(e) => ControlReply { pid: 0, error: Some(format!("bad control request {:?}: {e}", line.trim())) },
    };
    let mut text = serde_json::to_string(&reply).unwrap_or_default();
    text.push('\n');
    let _ = (&conn).write_all(text.as_bytes());
}

/// Asks the monitor of the container whose state directory is `dir`.
/// `Ok(None)`: no monitor answers there (the caller goes to the agent).
pub fn ask(dir: &Path, req: &ControlRequest, timeout: Duration) -> Result<Option<ControlReply>, ControlError> {
    let path = path(dir);
    let io = |source| ControlError::Io { path: path.clone(), source };
    let conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    conn.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut text = serde_json::to_string(req).map_err(|source| ControlError::Encode { path: path.clone(), source })?;
    text.push('\n');
    (&conn).write_all(text.as_bytes()).map_err(io)?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).map_err(io)?;
    if line.trim().is_empty() {
        return Err(ControlError::NoAnswer { path });
    }
    serde_json::from_str(line.trim()).map(Some).map_err(|source| ControlError::BadAnswer { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::FakeGuest;

    #[test]
    fn start_goes_over_the_control_socket_and_errors_come_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wait = Duration::from_secs(10);
        // Nobody serves: the caller is told to go to the agent itself.
        assert!(ask(dir.path(), &ControlRequest::Start, wait).expect("no socket").is_none());

        let fake = Arc::new(FakeGuest::new(dir.path().join("vsock.sock")));
        let pid = fake.add("c1", "", false);
        let guest: Arc<dyn Guest> = fake.clone();
        serve(&path(dir.path()), &guest, "c1");
        let reply = ask(dir.path(), &ControlRequest::Start, wait).expect("answer").expect("served");
        assert_eq!((reply.pid, reply.error), (pid, None));
        assert!(fake.procs.lock().expect("procs")[&("c1".to_string(), String::new())].started);

        let other = tempfile::tempdir().expect("tempdir");
        serve(&path(other.path()), &guest, "ghost");
        let reply = ask(other.path(), &ControlRequest::Start, wait).expect("answer").expect("served");
        assert_eq!(reply.error.as_deref(), Some("StartContainer: no such container"));
        assert_eq!(fake.calls.lock().expect("calls").as_slice(), ["StartContainer", "StartContainer"]);
    }
}
