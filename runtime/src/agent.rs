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
pub fn shutdown(client: &ttrpc::Client) -> Result<(), ttrpc::Error> {
    AgentClient::new(client.clone()).shutdown(ctx(), &ShutdownRequest::new()).map(|_| ())
}
