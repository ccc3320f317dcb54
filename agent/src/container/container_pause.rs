//! PauseContainer: freezes a container's cgroup.

use super::*;

impl ContainerManager {
    /// PauseContainer.
    pub fn pause(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let mut inner = lock(&c.inner);
        inner.lc.pause().map_err(|e| ContainerError::libcontainer("pausing", &e))
    }
}
