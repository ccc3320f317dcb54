//! The agent's ttrpc server: one listener (vsock in the guest, a Unix
//! socket on the host), the Health and Agent services.

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::service::{method_tables, AgentService};

/// Worker threads per connection: ttrpc keeps `DEFAULT` idle ones, spawns
/// more when fewer than `MIN` are idle (a call blocks one, e.g.
/// WaitProcess), and lets idle ones above `MAX` go. Each thread is a clone
/// plus stack faults in the guest, so keep the pool small.
const THREADS_MIN: usize = 1;
const THREADS_DEFAULT: usize = 2;
const THREADS_MAX: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("unsupported listen address {0:?} (want vsock://<cid>:<port> or unix://<path>)")]
    Address(String),
    #[error("removing the stale socket {}: {cause}", path.display())]
    StaleSocket { path: PathBuf, cause: std::io::Error },
    #[error("binding {address}: {cause}")]
    Bind { address: String, cause: ttrpc::Error },
    #[error("starting the ttrpc server: {0}")]
    Start(ttrpc::Error),
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    Vsock { cid: String, port: u32 },
    Unix(String),
}

impl ListenAddress {
    pub fn parse(address: &str) -> Result<Self, ServerError> {
        let bad = || ServerError::Address(address.to_string());
        if let Some(rest) = address.strip_prefix("vsock://") {
            let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
            let cid_ok = cid == "-1" || cid.parse::<u32>().is_ok();
            let port = port.parse::<u32>().map_err(|_| bad())?;
            if !cid_ok {
                return Err(bad());
            }
            return Ok(Self::Vsock { cid: cid.to_string(), port });
        }
        match address.strip_prefix("unix://") {
            Some(path) if !path.is_empty() => Ok(Self::Unix(path.to_string())),
            _ => Err(bad()),
        }
    }

    /// The address as ttrpc takes it.
    pub fn to_ttrpc(&self) -> String {
        match self {
            Self::Vsock { cid, port } => format!("vsock://{cid}:{port}"),
            Self::Unix(path) => format!("unix://{path}"),
        }
    }

    /// The address as the "serving on" line shows it.
    pub fn display(&self) -> String {
        match self {
            Self::Vsock { port, .. } => format!("vsock:{port}"),
            Self::Unix(path) => format!("unix://{path}"),
        }
    }

    /// The socket file to remove when done (not for abstract sockets).
    fn socket_file(&self) -> Option<PathBuf> {
        match self {
            Self::Unix(path) if !path.starts_with('@') => Some(PathBuf::from(path)),
            _ => None,
        }
    }
}

/// A started server.
pub struct AgentServer {
    server: ttrpc::Server,
    socket_file: Option<PathBuf>,
}

impl std::fmt::Debug for AgentServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentServer").field("socket_file", &self.socket_file).finish_non_exhaustive()
    }
}

/// Binds `address` and starts serving the services in background threads.
/// A socket file left at a Unix address by an earlier run is replaced.
pub fn start(address: &ListenAddress, agent: Arc<AgentService>) -> Result<AgentServer, ServerError> {
    let socket_file = address.socket_file();
    if let Some(path) = &socket_file {
        remove_stale_socket(path)?;
    }
    let mut server = ttrpc::Server::new()
        .bind(&address.to_ttrpc())
        .map_err(|source| ServerError::Bind { address: address.to_ttrpc(), cause: source })?
        .set_thread_count_min(THREADS_MIN)
        .set_thread_count_default(THREADS_DEFAULT)
        .set_thread_count_max(THREADS_MAX);
    for methods in method_tables(agent) {
        server = server.register_service(methods);
    }
    server.start().map_err(ServerError::Start)?;
    Ok(AgentServer { server, socket_file })
}

fn remove_stale_socket(path: &PathBuf) -> Result<(), ServerError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| ServerError::StaleSocket { path: path.clone(), cause: source })
        }
        // Not a socket: leave it, bind will say EADDRINUSE.
        _ => Ok(()),
    }
}

impl AgentServer {
    /// Stops listening, closes the connections (waiting at most `timeout`
    /// for ttrpc's threads) and removes the socket file.
    pub fn stop(self, timeout: Duration) {
        let Self { server, socket_file } = self;
        if let Some(path) = &socket_file {
            // First, so that nobody connects while we go.
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "removing the socket");
            }
        }
        let (done_tx, done_rx) = mpsc::channel();
        let stopper = std::thread::Builder::new().name("server-stop".into()).spawn(move || {
            server.shutdown();
            let _ = done_tx.send(());
        });
        match stopper {
            Ok(_) => {
                if done_rx.recv_timeout(timeout).is_err() {
                    tracing::warn!("the ttrpc server did not stop in {timeout:?}; leaving anyway");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot stop the ttrpc server cleanly"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(ListenAddress::parse("vsock://-1:1024").expect("vsock"), ListenAddress::Vsock { cid: "-1".into(), port: 1024 });
        let unix = ListenAddress::parse("unix:///run/a.sock").expect("unix");
        assert_eq!(unix.to_ttrpc(), "unix:///run/a.sock");
        assert_eq!(unix.display(), "unix:///run/a.sock");
        assert_eq!(unix.socket_file(), Some(PathBuf::from("/run/a.sock")));
        assert_eq!(ListenAddress::parse("vsock://-1:1024").expect("vsock").display(), "vsock:1024");
        assert_eq!(ListenAddress::parse("unix://@abstract").expect("abstract").socket_file(), None);
        for bad in ["", "tcp://1.2.3.4:5", "vsock://1024", "vsock://x:1", "vsock://3:y", "unix://"] {
            assert!(ListenAddress::parse(bad).is_err(), "{bad}");
        }
    }
}
