//! Why a container call failed, and the ttrpc status code the host sees.

use std::io;

use ttrpc::Code;

use super::spec::SpecError;
use super::stdio::StdioError;

/// Why a container call failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("invalid argument: {0}")]
    InvalidSpec(SpecError),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("container {0:?} not found")]
    NotFound(String),
    #[error("process {exec_id:?} of container {id:?} not found")]
    ProcessNotFound { id: String, exec_id: String },
    #[error("process {exec_id:?} of container {id:?} has already exited")]
    ProcessExited { id: String, exec_id: String },
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("stdio: {0}")]
    Stdio(StdioError),
    /// libcontainer failed; `invalid` when it judged the input.
    #[error("{step}: {message}")]
    Libcontainer { step: &'static str, message: String, invalid: bool },
    #[error("{what}: {cause}")]
    Io { what: String, cause: io::Error },
    /// The launcher failed ([`super::launch`]) at `step`.
    #[error("{step}: {error}")]
    Launch { step: &'static str, error: super::launch::LaunchError },
}

impl ContainerError {
    /// The ttrpc status code the host sees.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidSpec(_) | Self::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Self::NotFound(_) | Self::ProcessNotFound { .. } | Self::ProcessExited { .. } => Code::NOT_FOUND,
            Self::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Self::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Self::Libcontainer { invalid: true, .. } => Code::INVALID_ARGUMENT,
            Self::Launch { error, .. } if error.is_invalid() => Code::INVALID_ARGUMENT,
            Self::Stdio(_) | Self::Libcontainer { .. } | Self::Io { .. } | Self::Launch { .. } => Code::INTERNAL,
        }
    }

    /// A launcher error at `step` ("executing the process"...).
    pub(crate) fn launch(step: &'static str) -> impl Fn(super::launch::LaunchError) -> Self {
        move |error| Self::Launch { step, error }
    }

    /// A libcgroups error at `step` (reported as libcontainer's are).
    pub(crate) fn libcgroups<E: std::fmt::Display>(step: &'static str) -> impl Fn(E) -> Self {
        move |e| Self::Libcontainer { step, message: e.to_string(), invalid: false }
    }

    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io { what: what.into(), cause: source }
    }

    pub(crate) fn libcontainer(step: &'static str, err: &libcontainer::error::LibcontainerError) -> Self {
        use libcontainer::error::{ErrInvalidID, ErrInvalidSpec, LibcontainerError, MissingSpecError};
        let mut message = err.to_string();
        let mut invalid = false;
        let mut wrong_state = matches!(err, LibcontainerError::IncorrectStatus(_));
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
        let mut first = true;
        while let Some(e) = source {
            if e.is::<ErrInvalidSpec>() || e.is::<MissingSpecError>() || e.is::<ErrInvalidID>() {
                invalid = true;
            }
            // `#[error(transparent)]` variants hide their inner error from
            // the source chain: look at the variant itself.
            match e.downcast_ref::<LibcontainerError>() {
                Some(
                    LibcontainerError::InvalidSpec(_)
                    | LibcontainerError::MissingSpec(_)
                    | LibcontainerError::InvalidID(_)
                    | LibcontainerError::InvalidInput(_),
                ) => invalid = true,
                Some(LibcontainerError::IncorrectStatus(_)) => wrong_state = true,
                _ => {}
            }
            if !first {
                let text = e.to_string();
                if !message.contains(&text) {
                    message.push_str(": ");
                    message.push_str(&text);
                }
            }
            first = false;
            source = e.source();
        }
        if wrong_state {
            return Self::FailedPrecondition(format!("{step}: {message}"));
        }
        Self::Libcontainer { step, message, invalid }
    }
}

// By hand, not `#[from]` (which would also make the inner error the
// source): the message already prints it, and a cause is printed once.
impl From<SpecError> for ContainerError {
    fn from(e: SpecError) -> Self {
        Self::InvalidSpec(e)
    }
}

impl From<StdioError> for ContainerError {
    fn from(e: StdioError) -> Self {
        Self::Stdio(e)
    }
}

impl From<ContainerError> for ttrpc::Error {
    fn from(e: ContainerError) -> Self {
        carapace_protocol::rpc_error(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_status_codes() {
        let cases: Vec<(ContainerError, Code)> = vec![
            (SpecError::new("process.cwd", "relative").into(), Code::INVALID_ARGUMENT),
            (ContainerError::NotFound("c".into()), Code::NOT_FOUND),
            (ContainerError::ProcessExited { id: "c".into(), exec_id: "e".into() }, Code::NOT_FOUND),
            (ContainerError::AlreadyExists("c".into()), Code::ALREADY_EXISTS),
            (ContainerError::FailedPrecondition("x".into()), Code::FAILED_PRECONDITION),
            (ContainerError::Libcontainer { step: "s", message: "m".into(), invalid: true }, Code::INVALID_ARGUMENT),
            (ContainerError::Libcontainer { step: "s", message: "m".into(), invalid: false }, Code::INTERNAL),
        ];
        for (err, code) in cases {
            let message = err.to_string();
            let status: ttrpc::Error = err.into();
            assert_eq!(carapace_protocol::rpc_code(&status), Some(code), "{message}");
        }
        let invalid = ContainerError::from(SpecError::new("linux.namespaces[1].type", "unknown"));
        assert!(invalid.to_string().contains("linux.namespaces[1].type"));
    }

    /// The whole chain as `{:#}`-style printers show it.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut out = e.to_string();
        let mut next = e.source();
        while let Some(cause) = next {
            out.push_str(": ");
            out.push_str(&cause.to_string());
            next = cause.source();
        }
        out
    }

    #[test]
    fn a_cause_is_printed_once() {
        let cases = [
            ContainerError::io("binding x", io::Error::other("boom")),
            ContainerError::from(StdioError::DevNull(io::Error::other("boom"))),
            ContainerError::from(SpecError::new("process.args", "boom")),
        ];
        for e in cases {
            assert_eq!(chain(&e).matches("boom").count(), 1, "{}", chain(&e));
        }
    }

    #[test]
    fn libcontainer_errors_are_classified() {
        use libcontainer::error::{ErrInvalidSpec, LibcontainerError};
        let e = ContainerError::libcontainer("creating", &LibcontainerError::InvalidSpec(ErrInvalidSpec::UnsupportedVersion));
        assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{e}");
        let e =
            ContainerError::libcontainer("pausing", &LibcontainerError::IncorrectStatus(libcontainer::container::ContainerStatus::Stopped));
        assert_eq!(e.code(), Code::FAILED_PRECONDITION, "{e}");
        let e = ContainerError::libcontainer("creating", &LibcontainerError::Other("boom".into()));
        assert_eq!(e.code(), Code::INTERNAL, "{e}");
    }
}
