//! UpdateContainer: new `linux.resources` for a container's cgroup.

use carapace_protocol::agent;

use super::*;

impl ContainerManager {
    /// UpdateContainer.
    pub fn update(&self, req: &agent::UpdateContainerRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        let resources = spec::parse_resources(&req.resources_json)?;
        self.check_controllers(&resources, "resources_json")?;
        let manager = self.cgroup_manager(&c.id, c.cgroup.dir())?;
        self.apply_resources(&manager, &c.cgroup, &resources, "updating resources", "resources_json")
    }
}
