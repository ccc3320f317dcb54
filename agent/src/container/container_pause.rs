//! PauseContainer: freezes a container's cgroup.

use super::*;

impl ContainerManager {
    /// PauseContainer.
    pub fn pause(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let mut inner = lock(&c.inner);
        if c.direct_init {
            return self.freeze(&c, libcgroups::common::FreezerState::Frozen);
        }
        inner.lc.pause().map_err(|e| ContainerError::libcontainer("pausing", &e))
    }
}
