//! UpdateContainer: new `linux.resources` for a container's cgroup.

use std::path::Path;

use carapace_protocol::agent;
use libcgroups::common::CgroupManager;

use super::*;

impl ContainerManager {
    /// UpdateContainer.
    pub fn update(&self, req: &agent::UpdateContainerRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        let resources = spec::parse_resources(&req.resources_json)?;
        self.check_controllers(&resources, "resources_json")?;
        let cgroup_path = Path::new("/").join(c.cgroup.dir().strip_prefix(&self.config.cgroup_root).unwrap_or(c.cgroup.dir()));
        let manager = libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
            cgroup_path,
            systemd_cgroup: false,
            container_name: c.id.clone(),
        })
        .map_err(|e| ContainerError::FailedPrecondition(format!("cgroup: {e}")))?;
        manager
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
