//! WaitProcess: a process's exit status once its output is drained.

use carapace_protocol::agent;

use super::*;

impl ContainerManager {
    /// WaitProcess: blocks until the process has exited and its output has
    /// been drained to the host.
    pub fn wait(&self, req: &agent::WaitProcessRequest) -> Result<agent::WaitProcessResponse> {
        let c = self.get(&req.container_id)?;
        let process = c.process(&req.exec_id)?;
        let record = process.wait();
        let oom = process.oom_killed(|| c.cgroup.oom_kills());
        let mut resp = agent::WaitProcessResponse::new();
        resp.exit_code = record.exit.exit_code();
        resp.signal = record.exit.signal();
        resp.oom_killed = oom;
        resp.exited_at_unix_nano = record.at_unix_nano;
        resp.pid = u32::try_from(record.exit.pid).unwrap_or(0);
        Ok(resp)
    }
}
