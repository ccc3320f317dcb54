//! ListProcesses: the PIDs in a container's cgroup.

use super::*;

impl ContainerManager {
    /// ListProcesses.
    pub fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let c = self.get(id)?;
        c.cgroup.pids().map_err(|e| ContainerError::io(format!("reading {}", c.cgroup.dir().display()), e))
    }
}
