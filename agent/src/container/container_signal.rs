//! SignalProcess: a signal to one process, or to all of a container's.

use carapace_protocol::agent;
use nix::sys::signal::Signal;

use super::*;

impl ContainerManager {
    /// SignalProcess.
    pub fn signal(&self, req: &agent::SignalProcessRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        let signal = i32::try_from(req.signal)
            .ok()
            .and_then(|n| Signal::try_from(n).ok())
            .ok_or_else(|| ContainerError::InvalidArgument(format!("signal: {} is not a signal", req.signal)))?;
        let _span = tracing::debug_span!("signal_process", id = %req.container_id, exec_id = %req.exec_id, %signal).entered();
        if req.all {
            return self.signal_all(&c, signal);
        }
        let process = c.process(&req.exec_id)?;
        if process.has_exited() {
            return Err(ContainerError::ProcessExited { id: c.id.clone(), exec_id: req.exec_id.clone() });
        }
        match self.sys.kill(process.pid(), signal) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(e) => Err(ContainerError::io("kill", e.into())),
        }
    }

    fn signal_all(&self, c: &Container, signal: Signal) -> Result<()> {
        let pids = c.cgroup.pids().map_err(|e| ContainerError::io(format!("reading {}", c.cgroup.dir().display()), e))?;
        for pid in pids {
            let Ok(pid) = i32::try_from(pid) else {
                continue;
            };
            match self.sys.kill(pid, signal) {
                Ok(()) | Err(nix::Error::ESRCH) => {}
                Err(e) => return Err(ContainerError::io(format!("kill {pid}"), e.into())),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{add_container, exit, manager, process};
    use super::*;

    fn request(id: &str, exec_id: &str, signal: u32, all: bool) -> agent::SignalProcessRequest {
        let mut req = agent::SignalProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.signal = signal;
        req.all = all;
        req
    }

    #[test]
    fn signals_the_init_an_exec_or_the_whole_cgroup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (m, sys) = manager(dir.path());
        let c = add_container(&m, "c1", 4242, true, &[4242, 4300, 4301]);
        lock(&c.inner).execs.insert("e1".into(), process(4300));
        m.signal(&request("c1", "", 15, false)).expect("init");
        m.signal(&request("c1", "e1", 9, false)).expect("exec");
        m.signal(&request("c1", "", 2, true)).expect("all");
        assert_eq!(*sys.calls(), ["kill 4242 SIGTERM", "kill 4300 SIGKILL", "kill 4242 SIGINT", "kill 4300 SIGINT", "kill 4301 SIGINT",]);
    }

    #[test]
    fn refuses_bad_signals_unknown_and_exited_processes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (m, sys) = manager(dir.path());
        let c = add_container(&m, "c1", 4242, true, &[]);
        let err = m.signal(&request("c1", "", 99, false)).expect_err("no such signal");
        assert_eq!(err.code(), ttrpc::Code::INVALID_ARGUMENT);
        assert!(err.to_string().contains("signal: 99"), "{err}");
        let err = m.signal(&request("ghost", "", 15, false)).expect_err("no container");
        assert_eq!(err.code(), ttrpc::Code::NOT_FOUND);
        let err = m.signal(&request("c1", "nope", 15, false)).expect_err("no exec");
        assert_eq!(err.code(), ttrpc::Code::NOT_FOUND);
        exit(&c.init, 0);
        let err = m.signal(&request("c1", "", 15, false)).expect_err("exited");
        assert!(matches!(err, ContainerError::ProcessExited { .. }), "{err}");
        assert!(sys.calls().is_empty(), "{:?}", sys.calls());
    }
}
