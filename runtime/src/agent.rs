//! Calls the runtime makes on a sandbox's agent.

use std::time::Duration;

use carapace_protocol::agent::ShutdownRequest;
use carapace_protocol::AgentClient;

/// How long an agent call may take. Creating a container or a process runs
/// thousands of guest system calls, each costly where the guest kernel is
/// emulated (kvm_pvm hosts: a minute under load has been seen). A VM that
/// dies fails the call at once; this bounds only a guest that hangs.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// A ttrpc context with [`CALL_TIMEOUT`].
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(CALL_TIMEOUT.as_nanos()).unwrap_or(i64::MAX))
}

/// Asks the agent to sync and reboot the guest; the VMM then exits 0.
///
/// The agent answers before it goes, but the reply races the reboot (the
/// VMM may end before it forwards the last vsock packet), so a connection
/// that closes instead of answering counts as done: the guest went down,
/// which is what was asked. Callers confirm it by the VMM's exit.
pub fn shutdown(client: &ttrpc::Client) -> Result<(), ttrpc::Error> {
    shutdown_within(&AgentClient::new(client.clone()), CALL_TIMEOUT)
}

/// [`shutdown`] with its own timeout, on an existing client.
pub fn shutdown_within(agent: &AgentClient, timeout: Duration) -> Result<(), ttrpc::Error> {
    let mut ctx = ctx();
    ctx.timeout_nano = i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX);
    match agent.shutdown(ctx, &ShutdownRequest::new()) {
        Ok(_) => Ok(()),
        Err(e) if connection_lost(&e) => {
            tracing::debug!(error = %e, "the guest went down before the Shutdown reply arrived");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Whether an agent call failed because the connection closed.
pub fn connection_lost(e: &ttrpc::Error) -> bool {
    matches!(e, ttrpc::Error::Socket(_) | ttrpc::Error::LocalClosed | ttrpc::Error::RemoteClosed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_connection_is_lost_but_a_refusal_is_not() {
        assert!(connection_lost(&ttrpc::Error::Socket("socket disconnected".into())));
        assert!(connection_lost(&ttrpc::Error::RemoteClosed));
        assert!(!connection_lost(&ttrpc::error::get_rpc_status(ttrpc::Code::INTERNAL, "reboot failed")));
    }
}
