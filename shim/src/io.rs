//! stdio of a guest process as containerd gives it: FIFO paths or `file://`
//! URIs, handed to the runtime's relay ([`carapace_runtime::relay`]), which
//! the CLI uses too.
//!
//! Outputs are drained when containerd's reader goes away (a restarted
//! containerd must not stall the container); with a terminal, stderr is part
//! of the terminal's output and not connected.

use std::path::{Path, PathBuf};

use carapace_runtime::relay::{HostEnd, HostStdio, RelayError, StdioPorts};

pub use carapace_runtime::relay::Relay;

/// Errors setting up stdio.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error(transparent)]
    Relay(#[from] RelayError),
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

/// The host end one URI names: a FIFO (or any path) opened as is, or
/// `file://PATH`, a regular file output is appended to.
fn target(uri: &str) -> Result<Option<HostEnd>, IoError> {
    if uri.is_empty() {
        return Ok(None);
    }
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(Some(HostEnd::Append(PathBuf::from(path))));
    }
    if uri.contains("://") {
        return Err(IoError::Unsupported(uri.to_string()));
    }
    Ok(Some(HostEnd::Fifo(PathBuf::from(uri))))
}

/// Binds a port for each stream `paths` names on the VM whose vsock socket
/// is `uds`, before the agent is asked to connect.
pub fn bind(uds: &Path, paths: &StdioPaths) -> Result<StdioPorts, IoError> {
    let host = HostStdio {
        stdin: target(&paths.stdin)?,
        stdout: target(&paths.stdout)?,
        stderr: if paths.terminal { None } else { target(&paths.stderr)? },
        drain_closed_output: true,
    };
    Ok(StdioPorts::bind(uds, host)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert!(target("").expect("empty").is_none());
        assert!(matches!(target("/run/x/stdout"), Ok(Some(HostEnd::Fifo(p))) if p == Path::new("/run/x/stdout")));
        assert!(matches!(target("file:///var/log/c.log"), Ok(Some(HostEnd::Append(p))) if p == Path::new("/var/log/c.log")));
        assert!(matches!(target("binary:///usr/bin/logger?x=1"), Err(IoError::Unsupported(_))));
    }

    #[test]
    fn a_terminal_has_no_stderr_and_bad_uris_bind_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("vsock.sock");
        let paths = StdioPaths {
            stdin: dir.path().join("in").display().to_string(),
            stdout: dir.path().join("out").display().to_string(),
            stderr: dir.path().join("err").display().to_string(),
            terminal: true,
        };
        let s = bind(&uds, &paths).expect("bind").streams();
        assert!(s.stdin_port != 0 && s.stdout_port != 0);
        assert_eq!(s.stderr_port, 0);
        let bad = StdioPaths { stdout: "binary:///usr/bin/logger".into(), ..paths };
        assert!(matches!(bind(&uds, &bad), Err(IoError::Unsupported(_))));
        let left = std::fs::read_dir(dir.path()).expect("ls").count();
        assert_eq!(left, 0, "no port sockets left behind");
    }
}
