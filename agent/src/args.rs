//! The command line (hand-parsed: the agent is kept small, no clap).

use std::ffi::OsString;

pub const USAGE: &str = "\
usage: carapace-agent [--listen ADDRESS] [--log-level LEVEL] [--state-dir DIR]
       carapace-agent --version | --help

As the guest's PID 1 it sets the guest up and serves on vsock://-1:1024.
Otherwise it only serves, on ADDRESS (unix:///path/to.sock or
vsock://CID:PORT, CID -1 = any), and Shutdown makes it exit.

DIR: where container state lives (default /run/carapace-agent).

LEVEL: error, warn, info (default), debug, trace, off; the environment
variable CARAPACE_AGENT_LOG (e.g. from the kernel command line) also sets it.";

/// What the command line asks for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Args {
    pub listen: Option<String>,
    pub log_level: Option<String>,
    pub state_dir: Option<String>,
    pub version: bool,
    pub help: bool,
    /// Arguments not understood (only tolerated as PID 1, whose arguments
    /// come from the kernel command line).
    pub unknown: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("unknown argument {0:?}")]
    Unknown(String),
}

impl Args {
    /// Parses the arguments after the program name.
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Self {
        let mut out = Self::default();
        let mut args = args.into_iter().map(|a| a.to_string_lossy().into_owned());
        while let Some(arg) = args.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            match name.as_str() {
                "--listen" => out.listen = inline.or_else(|| args.next()),
                "--log-level" => out.log_level = inline.or_else(|| args.next()),
                "--state-dir" => out.state_dir = inline.or_else(|| args.next()),
                "--version" | "-V" => out.version = true,
                "--help" | "-h" => out.help = true,
                _ => out.unknown.push(arg),
            }
        }
        out
    }

    /// Checks what a normal (not PID 1) run needs.
    pub fn check_strict(&self) -> Result<(), ArgsError> {
        if let Some(first) = self.unknown.first() {
            return Err(ArgsError::Unknown(first.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::parse(args.iter().map(OsString::from))
    }

    #[test]
    fn listen_forms() {
        assert_eq!(parse(&["--listen", "unix:///a.sock"]).listen.as_deref(), Some("unix:///a.sock"));
        assert_eq!(parse(&["--listen=vsock://-1:1024"]).listen.as_deref(), Some("vsock://-1:1024"));
        // A missing value leaves it unset (the caller then complains).
        assert_eq!(parse(&["--listen"]).listen, None);
    }

    #[test]
    fn flags_and_unknowns() {
        let args = parse(&["--version", "--log-level", "debug", "console=ttyS0", "-x", "--state-dir=/s"]);
        assert!(args.version);
        assert_eq!(args.state_dir.as_deref(), Some("/s"));
        assert_eq!(args.log_level.as_deref(), Some("debug"));
        assert_eq!(args.unknown, ["console=ttyS0", "-x"]);
        assert_eq!(args.check_strict(), Err(ArgsError::Unknown("console=ttyS0".into())));
        assert!(parse(&["-h"]).help);
        assert_eq!(parse(&[]).check_strict(), Ok(()));
    }
}
