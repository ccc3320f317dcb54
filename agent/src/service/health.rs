//! `carapace.health.v1.Health`.

use carapace_protocol::health::{check_response::ServingStatus, CheckRequest, CheckResponse, VersionRequest, VersionResponse};
use carapace_protocol::{Health, API_VERSION};
use ttrpc::TtrpcContext;

/// The agent's version (its crate version).
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Serving as soon as it is reachable: the agent registers its services
/// before it listens.
#[derive(Debug, Default, Clone, Copy)]
pub struct HealthService;

impl Health for HealthService {
    fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        let mut resp = CheckResponse::new();
        resp.status = ServingStatus::SERVING.into();
        Ok(resp)
    }

    fn version(&self, _ctx: &TtrpcContext, req: VersionRequest) -> ttrpc::Result<VersionResponse> {
        if req.client_api_version > API_VERSION {
            tracing::debug!(client = req.client_api_version, agent = API_VERSION, "client speaks a newer API");
        }
        let mut resp = VersionResponse::new();
        resp.agent_version = AGENT_VERSION.to_string();
        resp.api_version = API_VERSION;
        Ok(resp)
    }
}
