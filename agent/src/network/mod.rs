//! The guest's network, set up at CreateSandbox: `lo` up, then each of the
//! VMM's devices (found by MAC) renamed, sized, addressed and up, then the
//! routes, in the order given.
//!
//! All of it goes over one rtnetlink socket in six system calls (each
//! costs ~0.6 ms in the guest): socket, the link dump (send, `recvmmsg`),
//! the changes in one send, their acknowledgements in one `recvmmsg`,
//! close; two more per further 32 changes. A request without interfaces or
//! routes makes none.
//!
//! The request is checked whole first ([`NetworkConfig::from_request`]),
//! and matched against the guest's devices before the first change: a bad
//! field, an unknown MAC or device name changes nothing. What the kernel
//! then refuses is reported by the request item that asked for it.
//!
//! - `config`: parsing and checking of the request;
//! - `plan`: the changes, as rtnetlink requests, for the devices found;
//! - `rtnetlink`: the socket, the dump and the batched requests.

mod config;
mod plan;
mod rtnetlink;

use nix::errno::Errno;
use ttrpc::Code;

use carapace_protocol::agent;

pub use config::NetworkConfig;

/// Why the network could not be set up as asked.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A field of the request is malformed; nothing was changed.
    #[error("{field} {value:?}: {reason}")]
    Invalid { field: String, value: String, reason: String },
    /// The request names a device the guest does not have; nothing was
    /// changed.
    #[error("{field} {value:?}: no such device")]
    NoSuchDevice { field: String, value: String },
    /// The kernel refused the change asked for by `item`.
    #[error("{item}: {}", errno.desc())]
    Refused { item: String, errno: Errno },
    /// The rtnetlink socket failed.
    #[error("rtnetlink {op}: {cause}")]
    Socket { op: &'static str, cause: std::io::Error },
    /// The kernel's answer made no sense to us.
    #[error("rtnetlink: {0}")]
    Reply(String),
}

impl NetworkError {
    /// INVALID_ARGUMENT for what the host got wrong, INTERNAL for what the
    /// guest kernel did.
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid { .. } | Self::NoSuchDevice { .. } => Code::INVALID_ARGUMENT,
            Self::Refused { .. } | Self::Socket { .. } | Self::Reply(_) => Code::INTERNAL,
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, value: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid { field: field.into(), value: value.into(), reason: reason.into() }
    }
}

impl NetworkConfig {
    /// Makes the guest's network (the calling thread's network namespace)
    /// what this asks for. Does nothing, and makes no system call, when it
    /// asks for nothing.
    pub fn apply(&self) -> Result<(), NetworkError> {
        if self.is_empty() {
            return Ok(());
        }
        let _span = tracing::info_span!("network", interfaces = self.interfaces.len(), routes = self.routes.len()).entered();
        let mut socket = rtnetlink::Rtnetlink::open()?;
        let links = socket.links()?;
        let requests = plan::plan(self, &links)?;
        tracing::debug!(links = links.len(), requests = requests.len(), "configuring");
        socket.execute(&requests)?;
        tracing::info!("network configured");
        Ok(())
    }
}

/// Checks and applies the network part of a CreateSandbox request: see
/// [`NetworkConfig::from_request`] and [`NetworkConfig::apply`].
pub fn configure(interfaces: &[agent::Interface], routes: &[agent::Route]) -> Result<(), NetworkError> {
    NetworkConfig::from_request(interfaces, routes)?.apply()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_codes() {
        let e = NetworkError::NoSuchDevice { field: "interfaces[0].mac".into(), value: "02:00:00:00:00:09".into() };
        assert_eq!(e.to_string(), "interfaces[0].mac \"02:00:00:00:00:09\": no such device");
        assert_eq!(e.code(), Code::INVALID_ARGUMENT);
        let e = NetworkError::Refused { item: "interfaces[0].addresses[1]".into(), errno: Errno::EEXIST };
        assert_eq!(e.to_string(), "interfaces[0].addresses[1]: File exists");
        assert_eq!(e.code(), Code::INTERNAL);
        let e = NetworkError::invalid("routes[1].gateway", "x", "not an IP address");
        assert_eq!(e.to_string(), "routes[1].gateway \"x\": not an IP address");
    }

    #[test]
    fn nothing_asked_nothing_done() {
        // No socket either: this passes without privileges or netlink.
        configure(&[], &[]).expect("empty");
    }
}
