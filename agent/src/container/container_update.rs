//! UpdateContainer: new `linux.resources` for a container's cgroup.

use carapace_protocol::agent;
use libcgroups::common::CgroupManager;

use super::*;

impl ContainerManager {
    /// UpdateContainer.
    pub fn update(&self, req: &agent::UpdateContainerRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        let resources = spec::parse_resources(&req.resources_json)?;
        self.check_controllers(&resources, "resources_json")?;
        self.cgroup_manager(&c.id, c.cgroup.dir())?
            .apply(&libcgroups::common::ControllerOpt {
                resources: &spec::resources_for_libcgroups(&resources),
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| ContainerError::Libcontainer { step: "updating resources", message: e.to_string(), invalid: false })?;
        c.cgroup.fix_libcgroups(&resources).map_err(|e| ContainerError::io("resources_json", e))
    }
}
