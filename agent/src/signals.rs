//! The signals the agent handles, read synchronously from a signalfd.
//!
//! [`Signals::block_and_open`] must run before the first thread is spawned:
//! threads inherit the blocked mask, so the signals can then only be
//! received through the signalfd (read by the main thread), never by an
//! asynchronous handler on a random thread. Children must get the mask
//! reset with [`unblock_in_child`] before they exec.

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// A child exited (reap it) / someone asks the agent to stop.
const HANDLED: [Signal; 3] = [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT];

/// What a received signal means to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGCHLD: one or more children changed state.
    ChildExited,
    /// SIGTERM or SIGINT: shut down (the Shutdown call sends SIGTERM to the
    /// agent itself once its reply is on its way).
    Terminate(Signal),
}

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("blocking signals: {0}")]
    Block(nix::Error),
    #[error("creating the signalfd: {0}")]
    SignalFd(nix::Error),
    #[error("reading the signalfd: {0}")]
    Read(nix::Error),
}

fn handled_set() -> SigSet {
    let mut set = SigSet::empty();
    for signal in HANDLED {
        set.add(signal);
    }
    set
}

/// The agent's signalfd.
#[derive(Debug)]
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks the handled signals in the calling thread (and so in every
    /// thread spawned after) and opens a signalfd for them.
    pub fn block_and_open() -> Result<Self, SignalError> {
        let set = handled_set();
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).map_err(SignalError::Block)?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC).map_err(SignalError::SignalFd)?;
        Ok(Self { fd })
    }

    /// Blocks until a handled signal arrives (one `read`).
    pub fn wait(&self) -> Result<Event, SignalError> {
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => {
                    let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
                    match Signal::try_from(signo) {
                        Ok(Signal::SIGCHLD) => return Ok(Event::ChildExited),
                        Ok(signal @ (Signal::SIGTERM | Signal::SIGINT)) => return Ok(Event::Terminate(signal)),
                        _ => continue,
                    }
                }
                Ok(None) | Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(SignalError::Read(e)),
            }
        }
    }
}

/// Resets the signal mask to empty: for a child between fork and exec.
pub fn unblock_in_child() -> Result<(), SignalError> {
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None).map_err(SignalError::Block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handled_set_has_the_three() {
        let set = handled_set();
        assert!(set.contains(Signal::SIGCHLD));
        assert!(set.contains(Signal::SIGTERM));
        assert!(set.contains(Signal::SIGINT));
        assert!(!set.contains(Signal::SIGKILL));
    }
}
