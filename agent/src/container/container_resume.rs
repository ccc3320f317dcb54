//! ResumeContainer: thaws a container's cgroup.

use super::*;

impl ContainerManager {
    /// ResumeContainer.
    pub fn resume(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let mut inner = lock(&c.inner);
        if c.direct_init {
            return self.freeze(&c, libcgroups::common::FreezerState::Thawed);
        }
        inner.lc.resume().map_err(|e| ContainerError::libcontainer("resuming", &e))
    }
}
