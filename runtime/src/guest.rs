//! The agent calls the shim makes, behind a trait so that the Task service
//! can be driven by a fake guest in tests.

use carapace_protocol::agent::*;
use carapace_protocol::AgentClient;

/// A sandbox's agent (see `protocol/protos/agent.proto`). Every call but
/// `wait_process` is bounded by [`crate::agent::CALL_TIMEOUT`].
pub trait Guest: Send + Sync + std::fmt::Debug {
    fn create_sandbox(&self, req: &CreateSandboxRequest) -> ttrpc::Result<CreateSandboxResponse>;
    fn create_container(&self, req: &CreateContainerRequest) -> ttrpc::Result<CreateContainerResponse>;
    fn start_container(&self, req: &StartContainerRequest) -> ttrpc::Result<StartContainerResponse>;
    fn exec_process(&self, req: &ExecProcessRequest) -> ttrpc::Result<ExecProcessResponse>;
    fn signal_process(&self, req: &SignalProcessRequest) -> ttrpc::Result<SignalProcessResponse>;
    /// Blocks until the process exits, however long that takes.
    fn wait_process(&self, req: &WaitProcessRequest) -> ttrpc::Result<WaitProcessResponse>;
    fn resize_tty(&self, req: &ResizeTtyRequest) -> ttrpc::Result<ResizeTtyResponse>;
    fn close_stdin(&self, req: &CloseStdinRequest) -> ttrpc::Result<CloseStdinResponse>;
    fn stats_container(&self, req: &StatsContainerRequest) -> ttrpc::Result<StatsContainerResponse>;
    fn list_processes(&self, req: &ListProcessesRequest) -> ttrpc::Result<ListProcessesResponse>;
    fn update_container(&self, req: &UpdateContainerRequest) -> ttrpc::Result<UpdateContainerResponse>;
    fn pause_container(&self, req: &PauseContainerRequest) -> ttrpc::Result<PauseContainerResponse>;
    fn resume_container(&self, req: &ResumeContainerRequest) -> ttrpc::Result<ResumeContainerResponse>;
    fn remove_container(&self, req: &RemoveContainerRequest) -> ttrpc::Result<RemoveContainerResponse>;
    /// Sync and reboot the guest; the VMM then exits.
    fn shutdown(&self, timeout_secs: u64) -> ttrpc::Result<ShutdownResponse>;
}

/// The real agent, over the VM's hybrid vsock.
#[derive(Clone)]
pub struct AgentGuest(pub AgentClient);

impl std::fmt::Debug for AgentGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentGuest")
    }
}

fn ctx() -> ttrpc::context::Context {
    crate::agent::ctx()
}

/// Logs (at debug level, which `--debug` shows) what a call cost in the
/// guest, as the agent measured it; `bench/lifecycle.py` reads these.
fn log_usage(call: &'static str, usage: Option<&GuestUsage>) {
    if let Some(u) = usage {
        tracing::debug!(
            call,
            wall_us = u.wall_us,
            user_us = u.user_us,
            system_us = u.system_us,
            minor_faults = u.minor_faults,
            major_faults = u.major_faults,
            voluntary_switches = u.voluntary_switches,
            involuntary_switches = u.involuntary_switches,
            syscalls = u.syscalls,
            "guest usage"
        );
    }
}

impl Guest for AgentGuest {
    fn create_sandbox(&self, req: &CreateSandboxRequest) -> ttrpc::Result<CreateSandboxResponse> {
        self.0.create_sandbox(ctx(), req)
    }
    fn create_container(&self, req: &CreateContainerRequest) -> ttrpc::Result<CreateContainerResponse> {
        let r = self.0.create_container(ctx(), req);
        log_usage("CreateContainer", r.as_ref().ok().and_then(|r| r.usage.as_ref()));
        r
    }
    fn start_container(&self, req: &StartContainerRequest) -> ttrpc::Result<StartContainerResponse> {
        let r = self.0.start_container(ctx(), req);
        log_usage("StartContainer", r.as_ref().ok().and_then(|r| r.usage.as_ref()));
        r
    }
    fn exec_process(&self, req: &ExecProcessRequest) -> ttrpc::Result<ExecProcessResponse> {
        let r = self.0.exec_process(ctx(), req);
        log_usage("ExecProcess", r.as_ref().ok().and_then(|r| r.usage.as_ref()));
        r
    }
    fn signal_process(&self, req: &SignalProcessRequest) -> ttrpc::Result<SignalProcessResponse> {
        self.0.signal_process(ctx(), req)
    }
    fn wait_process(&self, req: &WaitProcessRequest) -> ttrpc::Result<WaitProcessResponse> {
        // No timeout: a container may run for months.
        let r = self.0.wait_process(ttrpc::context::Context::default(), req);
        log_usage("WaitProcess", r.as_ref().ok().and_then(|r| r.usage.as_ref()));
        r
    }
    fn resize_tty(&self, req: &ResizeTtyRequest) -> ttrpc::Result<ResizeTtyResponse> {
        self.0.resize_tty(ctx(), req)
    }
    fn close_stdin(&self, req: &CloseStdinRequest) -> ttrpc::Result<CloseStdinResponse> {
        self.0.close_stdin(ctx(), req)
    }
    fn stats_container(&self, req: &StatsContainerRequest) -> ttrpc::Result<StatsContainerResponse> {
        self.0.stats_container(ctx(), req)
    }
    fn list_processes(&self, req: &ListProcessesRequest) -> ttrpc::Result<ListProcessesResponse> {
        self.0.list_processes(ctx(), req)
    }
    fn update_container(&self, req: &UpdateContainerRequest) -> ttrpc::Result<UpdateContainerResponse> {
        self.0.update_container(ctx(), req)
    }
    fn pause_container(&self, req: &PauseContainerRequest) -> ttrpc::Result<PauseContainerResponse> {
        self.0.pause_container(ctx(), req)
    }
    fn resume_container(&self, req: &ResumeContainerRequest) -> ttrpc::Result<ResumeContainerResponse> {
        self.0.resume_container(ctx(), req)
    }
    fn remove_container(&self, req: &RemoveContainerRequest) -> ttrpc::Result<RemoveContainerResponse> {
        let r = self.0.remove_container(ctx(), req);
        log_usage("RemoveContainer", r.as_ref().ok().and_then(|r| r.usage.as_ref()));
        r
    }
    fn shutdown(&self, timeout_secs: u64) -> ttrpc::Result<ShutdownResponse> {
        crate::agent::shutdown_within(&self.0, std::time::Duration::from_secs(timeout_secs)).map(|()| ShutdownResponse::new())
    }
}
