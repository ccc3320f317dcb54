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
        resp.usage = process.usage_since_exit().into();
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{add_container, exit, manager};
    use super::*;

    #[test]
    fn answers_the_recorded_exit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (m, _sys) = manager(dir.path());
        let c = add_container(&m, "c1", 77, true, &[]);
        exit(&c.init, 3);
        let mut req = agent::WaitProcessRequest::new();
        req.container_id = "c1".into();
        let resp = m.wait(&req).expect("wait");
        assert_eq!((resp.exit_code, resp.signal, resp.pid, resp.oom_killed), (3, 0, 77, false));
        assert!(resp.exited_at_unix_nano > 0);
        req.exec_id = "e9".into();
        assert_eq!(m.wait(&req).expect_err("no exec").code(), ttrpc::Code::NOT_FOUND);
    }
}
