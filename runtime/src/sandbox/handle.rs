//! The container verbs against a sandbox's agent, once for both front ends:
//! the shim calls them on its sandbox's agent connection, the CLI on the
//! monitor's (relayed by its control socket, `control.rs`) or, when no monitor answers, on
//! its own. What each front end checks before a verb (its own record of the
//! container's state) and makes of the answer (runc's messages and exit
//! codes, or containerd's status codes and events) stays with it.

use carapace_protocol::agent;

use super::SandboxError;
use crate::guest::Guest;

/// Container `id` in the sandbox whose agent is `guest`. Process verbs take
/// an exec id: "" is the container's init.
#[derive(Clone, Copy)]
pub struct ContainerHandle<'a> {
    guest: &'a dyn Guest,
    id: &'a str,
}

impl std::fmt::Debug for ContainerHandle<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerHandle").field("id", &self.id).finish_non_exhaustive()
    }
}

type Result<T> = std::result::Result<T, SandboxError>;

impl<'a> ContainerHandle<'a> {
    pub fn new(guest: &'a dyn Guest, id: &'a str) -> Self {
        Self { guest, id }
    }

    pub fn id(&self) -> &str {
        self.id
    }

    /// StartContainer: runs the created container's process; its guest pid.
    #[tracing::instrument(name = "start_container", skip_all, fields(container = %self.id))]
    pub fn start(&self) -> Result<u32> {
        let mut req = agent::StartContainerRequest::new();
        req.container_id = self.id.into();
        let resp = self.guest.start_container(&req).map_err(|e| SandboxError::agent("StartContainer", e))?;
        Ok(resp.pid)
    }

    /// ExecProcess: runs `process_json` (an OCI `process`) as `exec_id`
    /// with `stdio` (ports the front end bound); its guest pid. An exec id
    /// the container already has is refused by the agent (ALREADY_EXISTS).
    #[tracing::instrument(name = "exec_process", skip_all, fields(container = %self.id, exec_id))]
    pub fn exec(&self, exec_id: &str, process_json: Vec<u8>, terminal: bool, stdio: agent::StdioStreams) -> Result<u32> {
        let mut req = agent::ExecProcessRequest::new();
        req.container_id = self.id.into();
        req.exec_id = exec_id.into();
        req.process_json = process_json;
        req.terminal = terminal;
        req.stdio = Some(stdio).into();
        let resp = self.guest.exec_process(&req).map_err(|e| SandboxError::agent("ExecProcess", e))?;
        Ok(resp.pid)
    }

    /// SignalProcess: `signal` to process `exec_id`, or with `all` to every
    /// process of the container.
    #[tracing::instrument(name = "signal_process", skip_all, fields(container = %self.id, exec_id, signal, all))]
    pub fn signal(&self, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let mut req = agent::SignalProcessRequest::new();
        req.container_id = self.id.into();
        req.exec_id = exec_id.into();
        req.signal = signal;
        req.all = all;
        self.guest.signal_process(&req).map_err(|e| SandboxError::agent("SignalProcess", e))?;
        Ok(())
    }

    /// WaitProcess: blocks until process `exec_id` exits, however long.
    pub fn wait(&self, exec_id: &str) -> Result<agent::WaitProcessResponse> {
        let mut req = agent::WaitProcessRequest::new();
        req.container_id = self.id.into();
        req.exec_id = exec_id.into();
        self.guest.wait_process(&req).map_err(|e| SandboxError::agent("WaitProcess", e))
    }

    /// PauseContainer (`pause`) or ResumeContainer: freezes or thaws the
    /// container's cgroup.
    #[tracing::instrument(name = "pause_container", skip_all, fields(container = %self.id, pause))]
    pub fn set_paused(&self, pause: bool) -> Result<()> {
        if pause {
            let mut req = agent::PauseContainerRequest::new();
            req.container_id = self.id.into();
            self.guest.pause_container(&req).map_err(|e| SandboxError::agent("PauseContainer", e))?;
        } else {
            let mut req = agent::ResumeContainerRequest::new();
            req.container_id = self.id.into();
            self.guest.resume_container(&req).map_err(|e| SandboxError::agent("ResumeContainer", e))?;
        }
        Ok(())
    }

    /// ListProcesses: the guest pids of the container's processes.
    pub fn ps(&self) -> Result<Vec<u32>> {
        let mut req = agent::ListProcessesRequest::new();
        req.container_id = self.id.into();
        let resp = self.guest.list_processes(&req).map_err(|e| SandboxError::agent("ListProcesses", e))?;
        Ok(resp.pids)
    }

    /// StatsContainer: the container's cgroup figures.
    pub fn stats(&self) -> Result<agent::StatsContainerResponse> {
        let mut req = agent::StatsContainerRequest::new();
        req.container_id = self.id.into();
        self.guest.stats_container(&req).map_err(|e| SandboxError::agent("StatsContainer", e))
    }

    /// UpdateContainer: new `linux.resources` (JSON) for the container.
    #[tracing::instrument(name = "update_container", skip_all, fields(container = %self.id))]
    pub fn update(&self, resources_json: Vec<u8>) -> Result<()> {
        let mut req = agent::UpdateContainerRequest::new();
        req.container_id = self.id.into();
        req.resources_json = resources_json;
        self.guest.update_container(&req).map_err(|e| SandboxError::agent("UpdateContainer", e))?;
        Ok(())
    }

    /// ResizeTty: the terminal of process `exec_id` is `rows` x `cols`.
    pub fn resize(&self, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let mut req = agent::ResizeTtyRequest::new();
        req.container_id = self.id.into();
        req.exec_id = exec_id.into();
        req.rows = rows;
        req.cols = cols;
        self.guest.resize_tty(&req).map_err(|e| SandboxError::agent("ResizeTty", e))?;
        Ok(())
    }

    /// CloseStdin: the terminal of process `exec_id` reads an EOF.
    pub fn close_stdin(&self, exec_id: &str) -> Result<()> {
        let mut req = agent::CloseStdinRequest::new();
        req.container_id = self.id.into();
        req.exec_id = exec_id.into();
        self.guest.close_stdin(&req).map_err(|e| SandboxError::agent("CloseStdin", e))?;
        Ok(())
    }

    /// RemoveContainer: the container leaves the guest; a running one only
    /// with `force` (else FAILED_PRECONDITION), which kills it first.
    #[tracing::instrument(name = "remove_container", skip_all, fields(container = %self.id, force))]
    pub fn remove(&self, force: bool) -> Result<()> {
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = self.id.into();
        req.force = force;
        self.guest.remove_container(&req).map_err(|e| SandboxError::agent("RemoveContainer", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::FakeGuest;

    fn fake() -> (tempfile::TempDir, FakeGuest) {
        let dir = tempfile::tempdir().expect("tempdir");
        let guest = FakeGuest::new(dir.path().join("vsock.sock"));
        (dir, guest)
    }

    fn code(e: &SandboxError) -> Option<ttrpc::Code> {
        match e {
            SandboxError::Agent { code, .. } => *code,
            _ => None,
        }
    }

    fn no_stdio() -> agent::StdioStreams {
        agent::StdioStreams::new()
    }

    #[test]
    fn start_then_kill_then_kill_of_the_stopped_container_is_not_found() {
        let (_d, g) = fake();
        let pid = g.add("c1", "", false);
        let c = ContainerHandle::new(&g, "c1");
        assert_eq!(c.start().expect("start"), pid);
        c.signal("", 15, false).expect("kill");
        assert_eq!(c.wait("").expect("wait").exit_code, 128 + 15);
        let e = c.signal("", 9, false).expect_err("stopped");
        assert_eq!(code(&e), Some(ttrpc::Code::NOT_FOUND));
        assert_eq!(e.to_string(), "SignalProcess: process exited");
    }

    #[test]
    fn an_exec_id_the_container_has_is_refused() {
        let (_d, g) = fake();
        g.add("c1", "", true);
        let c = ContainerHandle::new(&g, "c1");
        let p = serde_json::to_vec(&serde_json::json!({"args": ["sh"], "cwd": "/"})).expect("json");
        let pid = c.exec("e1", p.clone(), false, no_stdio()).expect("exec");
        assert!(c.ps().expect("ps").contains(&pid));
        let e = c.exec("e1", p, false, no_stdio()).expect_err("collision");
        assert_eq!(code(&e), Some(ttrpc::Code::ALREADY_EXISTS));
        assert!(e.to_string().starts_with("ExecProcess: "), "{e}");
    }

    #[test]
    fn remove_of_a_running_container_needs_force() {
        let (_d, g) = fake();
        g.add("c1", "", true);
        let c = ContainerHandle::new(&g, "c1");
        let e = c.remove(false).expect_err("running");
        assert_eq!(code(&e), Some(ttrpc::Code::FAILED_PRECONDITION));
        c.remove(true).expect("forced");
        assert_eq!(code(&c.wait("").expect_err("gone")), Some(ttrpc::Code::NOT_FOUND));
    }

    #[test]
    fn the_other_verbs_reach_the_agent_with_the_containers_id() {
        let (_d, g) = fake();
        g.add("c1", "", true);
        let c = ContainerHandle::new(&g, "c1");
        c.set_paused(true).expect("pause");
        c.set_paused(false).expect("resume");
        c.update(b"{\"pids\":{\"limit\":10}}".to_vec()).expect("update");
        c.resize("", 24, 80).expect("resize");
        c.close_stdin("").expect("close stdin");
        assert_eq!(c.stats().expect("stats").cgroup.pids.current, 2);
        let calls = g.calls.lock().expect("calls").clone();
        assert_eq!(calls, ["PauseContainer", "ResumeContainer", "UpdateContainer", "ResizeTty", "CloseStdin"]);
    }
}
