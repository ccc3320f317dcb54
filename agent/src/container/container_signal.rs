//! SignalProcess: a signal to one process, or to all of a container's.

use carapace_protocol::agent;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::*;

impl ContainerManager {
    /// SignalProcess.
    pub fn signal(&self, req: &agent::SignalProcessRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        let signal = i32::try_from(req.signal)
            .ok()
            .and_then(|n| Signal::try_from(n).ok())
            .ok_or_else(|| {
                ContainerError::InvalidArgument(format!("signal: {} is not a signal", req.signal))
            })?;
        let _span = tracing::debug_span!("signal_process", id = %req.container_id, exec_id = %req.exec_id, %signal).entered();
        if req.all {
            return self.signal_all(&c, signal);
        }
        let process = c.process(&req.exec_id)?;
        if process.has_exited() {
            return Err(ContainerError::ProcessExited {
                id: c.id.clone(),
                exec_id: req.exec_id.clone(),
            });
        }
        match kill(Pid::from_raw(process.pid()), signal) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(e) => Err(ContainerError::io("kill", e.into())),
        }
    }

    fn signal_all(&self, c: &Container, signal: Signal) -> Result<()> {
        let pids = c
            .cgroup
            .pids()
            .map_err(|e| ContainerError::io(format!("reading {}", c.cgroup.dir().display()), e))?;
        for pid in pids {
            let Ok(pid) = i32::try_from(pid) else {
                continue;
            };
            match kill(Pid::from_raw(pid), signal) {
                Ok(()) | Err(nix::Error::ESRCH) => {}
                Err(e) => return Err(ContainerError::io(format!("kill {pid}"), e.into())),
            }
        }
        Ok(())
    }
}
