//! `carapace.agent.v1.Agent`: the sandbox and container calls, answered by
//! [`Sandbox`] and [`ContainerManager`]; Shutdown.
//!
//! Errors reach the host as ttrpc statuses: INVALID_ARGUMENT (a bad spec,
//! the message names the field), NOT_FOUND (unknown container or process,
//! or a process that has exited for SignalProcess), ALREADY_EXISTS,
//! FAILED_PRECONDITION (wrong state, a missing cgroup controller),
//! INTERNAL (anything else).

use std::sync::Arc;

use carapace_protocol::agent;
use carapace_protocol::Agent;
use ttrpc::TtrpcContext;

use crate::container::ContainerManager;
use crate::error::AgentError;
use crate::sandbox::Sandbox;
use crate::shutdown::ShutdownTrigger;
use crate::usage::Meter;

/// The Agent service.
#[derive(Debug)]
pub struct AgentService {
    shutdown: ShutdownTrigger,
    containers: Arc<ContainerManager>,
    sandbox: Sandbox,
}

impl AgentService {
    pub fn new(shutdown: ShutdownTrigger, containers: Arc<ContainerManager>, sandbox: Sandbox) -> Self {
        Self { shutdown, containers, sandbox }
    }
}

/// Logs a failed call (the host gets the status) and converts it.
fn answer<T, E: std::fmt::Display + Into<ttrpc::Error>>(call: &'static str, r: Result<T, E>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        tracing::warn!(call, "{e}");
        e.into()
    })
}

impl Agent for AgentService {
    fn create_sandbox(&self, _ctx: &TtrpcContext, req: agent::CreateSandboxRequest) -> ttrpc::Result<agent::CreateSandboxResponse> {
        let resp = answer("CreateSandbox", self.sandbox.create(&req))?;
        if req.settings.as_ref().is_some_and(|s| s.shared_pid_namespace) {
            self.containers.share_pid_namespace();
        }
        Ok(resp)
    }

    fn destroy_sandbox(&self, _ctx: &TtrpcContext, _req: agent::DestroySandboxRequest) -> ttrpc::Result<agent::DestroySandboxResponse> {
        answer("DestroySandbox", self.sandbox.destroy(self.containers.count()))?;
        Ok(agent::DestroySandboxResponse::new())
    }

    fn create_container(&self, _ctx: &TtrpcContext, req: agent::CreateContainerRequest) -> ttrpc::Result<agent::CreateContainerResponse> {
        let meter = Meter::start(None);
        let pid = answer("CreateContainer", self.containers.create(&req))?;
        let mut resp = agent::CreateContainerResponse::new();
        resp.pid = pid;
        resp.usage = Some(meter.finish(i32::try_from(pid).ok())).into();
        Ok(resp)
    }

    fn start_container(&self, _ctx: &TtrpcContext, req: agent::StartContainerRequest) -> ttrpc::Result<agent::StartContainerResponse> {
        let init = self.containers.init_pid(&req.container_id);
        let meter = Meter::start(init);
        let pid = answer("StartContainer", self.containers.start(&req.container_id))?;
        let mut resp = agent::StartContainerResponse::new();
        resp.pid = pid;
        resp.usage = Some(meter.finish(init)).into();
        Ok(resp)
    }

    fn exec_process(&self, _ctx: &TtrpcContext, req: agent::ExecProcessRequest) -> ttrpc::Result<agent::ExecProcessResponse> {
        let meter = Meter::start(None);
        let pid = answer("ExecProcess", self.containers.exec(&req))?;
        let mut resp = agent::ExecProcessResponse::new();
        resp.pid = pid;
        resp.usage = Some(meter.finish(i32::try_from(pid).ok())).into();
        Ok(resp)
    }

    fn signal_process(&self, _ctx: &TtrpcContext, req: agent::SignalProcessRequest) -> ttrpc::Result<agent::SignalProcessResponse> {
        answer("SignalProcess", self.containers.signal(&req))?;
        Ok(agent::SignalProcessResponse::new())
    }

    fn wait_process(&self, _ctx: &TtrpcContext, req: agent::WaitProcessRequest) -> ttrpc::Result<agent::WaitProcessResponse> {
        answer("WaitProcess", self.containers.wait(&req))
    }

    fn resize_tty(&self, _ctx: &TtrpcContext, req: agent::ResizeTtyRequest) -> ttrpc::Result<agent::ResizeTtyResponse> {
        answer("ResizeTty", self.containers.resize(&req))?;
        Ok(agent::ResizeTtyResponse::new())
    }

    fn close_stdin(&self, _ctx: &TtrpcContext, req: agent::CloseStdinRequest) -> ttrpc::Result<agent::CloseStdinResponse> {
        answer("CloseStdin", self.containers.close_stdin(&req))?;
        Ok(agent::CloseStdinResponse::new())
    }

    fn stats_container(&self, _ctx: &TtrpcContext, req: agent::StatsContainerRequest) -> ttrpc::Result<agent::StatsContainerResponse> {
        answer("StatsContainer", self.containers.stats(&req.container_id))
    }

    fn list_processes(&self, _ctx: &TtrpcContext, req: agent::ListProcessesRequest) -> ttrpc::Result<agent::ListProcessesResponse> {
        let pids = answer("ListProcesses", self.containers.pids(&req.container_id))?;
        let mut resp = agent::ListProcessesResponse::new();
        resp.pids = pids;
        Ok(resp)
    }

    fn update_container(&self, _ctx: &TtrpcContext, req: agent::UpdateContainerRequest) -> ttrpc::Result<agent::UpdateContainerResponse> {
        answer("UpdateContainer", self.containers.update(&req))?;
        Ok(agent::UpdateContainerResponse::new())
    }

    fn pause_container(&self, _ctx: &TtrpcContext, req: agent::PauseContainerRequest) -> ttrpc::Result<agent::PauseContainerResponse> {
        answer("PauseContainer", self.containers.pause(&req.container_id))?;
        Ok(agent::PauseContainerResponse::new())
    }

    fn resume_container(&self, _ctx: &TtrpcContext, req: agent::ResumeContainerRequest) -> ttrpc::Result<agent::ResumeContainerResponse> {
        answer("ResumeContainer", self.containers.resume(&req.container_id))?;
        Ok(agent::ResumeContainerResponse::new())
    }

    fn remove_container(&self, _ctx: &TtrpcContext, req: agent::RemoveContainerRequest) -> ttrpc::Result<agent::RemoveContainerResponse> {
        let meter = Meter::start(None);
        answer("RemoveContainer", self.containers.remove(&req.container_id, req.force))?;
        let mut resp = agent::RemoveContainerResponse::new();
        resp.usage = Some(meter.finish(None)).into();
        Ok(resp)
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: agent::ShutdownRequest) -> ttrpc::Result<agent::ShutdownResponse> {
        tracing::info!("shutdown requested");
        self.shutdown.request().map_err(AgentError::Shutdown)?;
        Ok(agent::ShutdownResponse::new())
    }
}
