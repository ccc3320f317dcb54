//! The Carapace guest agent as a library: what `carapace-agent` (PID 1 of
//! each guest, see `main.rs`) is made of, so that its parts can be tested
//! and reused on the host.
//!
//! - [`init`]: guest setup as PID 1 (mounts, cgroup v2, console), through
//!   the [`sys::Syscall`] seam;
//! - [`signals`] and [`reaper`]: SIGCHLD via a signalfd, exit statuses
//!   routed by PID;
//! - [`server`] and [`service`]: the ttrpc server and the Health and Agent
//!   services;
//! - [`container`]: OCI containers with libcontainer, their stdio streams
//!   and exit statuses; [`sandbox`]: guest-wide setup (entropy and clock
//!   first), with [`network`] for the interfaces and routes;
//! - [`sys`]: the system calls of setup, signals and unmounts behind a
//!   trait, recorded in unit tests;
//! - [`shutdown`]: answering Shutdown, then rebooting the guest (or exiting
//!   on the host);
//! - [`usage`]: what a call cost in the guest (faults, CPU, switches).

pub mod args;
pub mod container;
pub mod error;
pub mod init;
pub mod logging;
pub mod network;
pub mod reaper;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod signals;
pub mod sys;
pub mod usage;
pub mod xstate;

/// Held by every test that makes or waits for child processes: the
/// reaper's tests `waitpid(-1)`, which would take another test's child.
#[cfg(test)]
pub(crate) fn test_children() -> std::sync::MutexGuard<'static, ()> {
    static CHILDREN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    CHILDREN.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
