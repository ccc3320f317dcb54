//! The last step in the container's init process before the user's
//! program: libcontainer's default `execvp`, after undoing what the agent's
//! own process state would otherwise leak into the container.
//!
//! The agent blocks SIGCHLD, SIGTERM and SIGINT in every thread (they are
//! read from a signalfd) and the Rust runtime ignores SIGPIPE; a cloned
//! process inherits both and `execve` keeps them. Without this reset a
//! container's process could not be stopped with SIGTERM.

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};

/// libcontainer's default executor, with signals reset first.
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentExecutor;

/// Empties the signal mask and restores SIGPIPE's default action.
pub fn reset_signals_for_exec() {
    // SAFETY: sigemptyset initialises the set we own; sigprocmask and
    // signal only change this (single-threaded, about to exec) process's
    // signal state.
    unsafe {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

impl Executor for AgentExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        reset_signals_for_exec();
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}
