//! StatsContainer: cgroup v2 statistics.

use carapace_protocol::agent;

use super::*;

impl ContainerManager {
    /// StatsContainer.
    pub fn stats(&self, id: &str) -> Result<agent::StatsContainerResponse> {
        let c = self.get(id)?;
        let mut resp = agent::StatsContainerResponse::new();
        resp.cgroup = Some(c.cgroup.stats()).into();
        resp.timestamp_unix_nano = process::now_unix_nano();
        Ok(resp)
    }
}
