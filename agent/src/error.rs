//! Errors of the agent's calls, and how they map to ttrpc status codes.

use ttrpc::Code;

/// Why an Agent call failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The call exists in the API but this agent does not do it yet.
    #[error("{0} is not implemented by this agent")]
    Unimplemented(&'static str),
    /// The shutdown could not be set in motion.
    #[error("starting the shutdown: {0}")]
    Shutdown(nix::Error),
}

impl AgentError {
    /// The ttrpc status code the peer sees.
    pub fn code(&self) -> Code {
        match self {
            Self::Unimplemented(_) => Code::UNIMPLEMENTED,
            Self::Shutdown(_) => Code::INTERNAL,
        }
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        carapace_protocol::rpc_error(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_status_codes() {
        let e: ttrpc::Error = AgentError::Unimplemented("StartContainer").into();
        assert_eq!(carapace_protocol::rpc_code(&e), Some(Code::UNIMPLEMENTED));
        let e: ttrpc::Error = AgentError::Shutdown(nix::Error::EPERM).into();
        assert_eq!(carapace_protocol::rpc_code(&e), Some(Code::INTERNAL));
    }
}
