//! The shim's errors, and their ttrpc status codes (containerd turns the
//! codes into its errdefs: NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION...).

use carapace_runtime::bundle::BundleError;
use carapace_runtime::config::ConfigError;
use carapace_runtime::error::Chain;
use carapace_runtime::hooks::HookError;
use carapace_runtime::launcher::LaunchError;
use carapace_runtime::network::NetworkError;
use carapace_runtime::sandbox::SandboxError;
use carapace_runtime::share::ShareError;

use crate::io::IoError;
use crate::rootfs::RootfsError;

/// What a Task call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unimplemented(String),
    /// An agent call failed; `code` is the agent's status code when it
    /// answered with one (none: the VM or the connection is gone).
    #[error("{call}: {message}")]
    Agent { call: &'static str, code: Option<ttrpc::Code>, message: String },
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("sandbox share")]
    Share(#[from] ShareError),
    #[error("pod network")]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{0}")]
    Internal(String),
}

impl ShimError {
    /// An agent call's failure, with the agent's own message when it sent one.
    pub fn agent(call: &'static str, e: ttrpc::Error) -> Self {
        SandboxError::agent(call, e).into()
    }

    /// The ttrpc status code containerd gets.
    pub fn code(&self) -> ttrpc::Code {
        match self {
            Self::NotFound(_) => ttrpc::Code::NOT_FOUND,
            Self::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            Self::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Self::InvalidArgument(_) | Self::Bundle(_) | Self::Rootfs(RootfsError::Symlink { .. }) => ttrpc::Code::INVALID_ARGUMENT,
            Self::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            Self::Agent { code: Some(code), .. } => *code,
            Self::Agent { code: None, .. } => ttrpc::Code::UNAVAILABLE,
            Self::Launch(LaunchError::Assets(_)) | Self::Config(_) | Self::Hook(_) => ttrpc::Code::FAILED_PRECONDITION,
            Self::Network(NetworkError::Namespace { .. }) => ttrpc::Code::INVALID_ARGUMENT,
            Self::Network(_) => ttrpc::Code::INTERNAL,
            Self::Launch(_) | Self::Share(_) | Self::Rootfs(_) | Self::Io(_) | Self::Internal(_) => ttrpc::Code::INTERNAL,
        }
    }
}

/// The core's errors keep their kind (and an agent's status code).
impl From<SandboxError> for ShimError {
    fn from(e: SandboxError) -> Self {
        match e {
            SandboxError::Share(e) => Self::Share(e),
            SandboxError::Network(e) => Self::Network(e),
            SandboxError::Launch(e) => Self::Launch(e),
            SandboxError::Hook(e) => Self::Hook(e),
            SandboxError::Agent { call, code, message } => Self::Agent { call, code, message },
            other @ (SandboxError::Io { .. } | SandboxError::Encode(_)) => Self::Internal(Chain(&other).to_string()),
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        // containerd shows the status message alone: it carries the causes.
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), Chain(&e).to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_codes_pass_through_and_transport_errors_are_unavailable() {
        let status = ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::NOT_FOUND, "no such process"));
        let e = ShimError::agent("SignalProcess", status);
        assert_eq!(e.code(), ttrpc::Code::NOT_FOUND);
        assert_eq!(e.to_string(), "SignalProcess: no such process");
        let e = ShimError::agent("WaitProcess", ttrpc::Error::LocalClosed);
        assert_eq!(e.code(), ttrpc::Code::UNAVAILABLE);
    }

    #[test]
    fn converts_to_a_status() {
        let e: ttrpc::Error = ShimError::AlreadyExists("container c1 exists".into()).into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::ALREADY_EXISTS);
                assert_eq!(s.message, "container c1 exists");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_status_carries_each_cause_once() {
        let path = std::path::PathBuf::from("/var/run/netns/gone");
        let cause = std::io::Error::from_raw_os_error(libc::ENOENT);
        let want = format!("pod network: network namespace /var/run/netns/gone: {cause}");
        let e: ttrpc::Error = ShimError::from(NetworkError::Namespace { path, source: cause }).into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT);
                assert_eq!(s.message, want);
            }
            other => panic!("{other:?}"),
        }
    }
}
