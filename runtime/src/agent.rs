//! Calls the runtime makes on a sandbox's agent.

use std::time::Duration;

use carapace_protocol::agent::ShutdownRequest;
use carapace_protocol::AgentClient;

/// How long a plain agent call may take. Calls are cheap for the agent, but
/// the guest kernel is emulated on kvm_pvm hosts.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A ttrpc context with [`CALL_TIMEOUT`].
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(CALL_TIMEOUT.as_nanos()).unwrap_or(i64::MAX))
}

/// Asks the agent to sync and reboot the guest; the VMM then exits 0.
pub fn shutdown(client: &ttrpc::Client) -> Result<(), ttrpc::Error> {
    AgentClient::new(client.clone()).shutdown(ctx(), &ShutdownRequest::new()).map(|_| ())
}
