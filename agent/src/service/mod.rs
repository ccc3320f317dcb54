//! The ttrpc services the agent registers.

mod agent;
mod health;

use std::collections::HashMap;
use std::sync::Arc;

pub use agent::AgentService;
pub use health::{HealthService, AGENT_VERSION};

/// The method table of every service, for `ttrpc::Server::register_service`.
pub fn method_tables(agent: Arc<AgentService>) -> Vec<HashMap<String, Box<dyn ttrpc::MethodHandler + Send + Sync>>> {
    vec![carapace_protocol::create_health(Arc::new(HealthService)), carapace_protocol::create_agent(agent)]
}
