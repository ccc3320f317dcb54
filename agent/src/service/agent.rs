//! `carapace.agent.v1.Agent`. For now only Shutdown does anything; every
//! other call answers UNIMPLEMENTED (and the agent keeps serving).

use std::sync::Arc;

use carapace_protocol::agent;
use carapace_protocol::Agent;
use ttrpc::TtrpcContext;

use crate::error::AgentError;
use crate::reaper::Reaper;
use crate::shutdown::ShutdownTrigger;

/// The Agent service.
#[derive(Debug)]
pub struct AgentService {
    shutdown: ShutdownTrigger,
    #[allow(
        dead_code,
        reason = "routes container exit statuses once containers exist"
    )]
    reaper: Arc<Reaper>,
}

impl AgentService {
    pub fn new(shutdown: ShutdownTrigger, reaper: Arc<Reaper>) -> Self {
        Self { shutdown, reaper }
    }
}

/// Methods that answer UNIMPLEMENTED: `method(Request) -> Response = "Name"`.
macro_rules! unimplemented_calls {
    ($($method:ident($req:ident) -> $resp:ident = $name:literal;)*) => {
        $(
            fn $method(
                &self,
                _ctx: &TtrpcContext,
                _req: agent::$req,
            ) -> ttrpc::Result<agent::$resp> {
                tracing::debug!(call = $name, "not implemented");
                Err(AgentError::Unimplemented($name).into())
            }
        )*
    };
}

impl Agent for AgentService {
    unimplemented_calls! {
        create_sandbox(CreateSandboxRequest) -> CreateSandboxResponse = "CreateSandbox";
        create_container(CreateContainerRequest) -> CreateContainerResponse = "CreateContainer";
        start_container(StartContainerRequest) -> StartContainerResponse = "StartContainer";
        exec_process(ExecProcessRequest) -> ExecProcessResponse = "ExecProcess";
        signal_process(SignalProcessRequest) -> SignalProcessResponse = "SignalProcess";
        wait_process(WaitProcessRequest) -> WaitProcessResponse = "WaitProcess";
        resize_tty(ResizeTtyRequest) -> ResizeTtyResponse = "ResizeTty";
        close_stdin(CloseStdinRequest) -> CloseStdinResponse = "CloseStdin";
        stats_container(StatsContainerRequest) -> StatsContainerResponse = "StatsContainer";
        list_processes(ListProcessesRequest) -> ListProcessesResponse = "ListProcesses";
        update_container(UpdateContainerRequest) -> UpdateContainerResponse = "UpdateContainer";
        pause_container(PauseContainerRequest) -> PauseContainerResponse = "PauseContainer";
        resume_container(ResumeContainerRequest) -> ResumeContainerResponse = "ResumeContainer";
        remove_container(RemoveContainerRequest) -> RemoveContainerResponse = "RemoveContainer";
        destroy_sandbox(DestroySandboxRequest) -> DestroySandboxResponse = "DestroySandbox";
    }

    fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::ShutdownRequest,
    ) -> ttrpc::Result<agent::ShutdownResponse> {
        tracing::info!("shutdown requested");
        self.shutdown.request().map_err(AgentError::Shutdown)?;
        Ok(agent::ShutdownResponse::new())
    }
}
