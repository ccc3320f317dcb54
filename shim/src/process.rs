//! One process of a container as containerd sees it: the init process
//! (exec id "") or an exec'd one; its status, exit and stdio relay.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use crate::io::{Relay, StdioPaths};

/// Exit status reported when the VM died under a process.
pub const LOST: u32 = 255;
/// Exit status of a process that never started (its Start failed), or
/// that the shim gave up on when it shut down: containerd's runc shim
/// reports 255 for a process whose runtime call failed.
pub const NOT_RUN: u32 = 255;

/// containerd's process states (PAUSED is the container's, see
/// [`crate::container::Container::paused`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Exec'd: added by Exec, not yet started. Init: created, not started.
    Created,
    Running,
    Stopped,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Shell-style: the exit code, or 128 + the signal that killed it.
    pub status: u32,
    pub at: SystemTime,
}

#[derive(Debug)]
struct State {
    status: Status,
    guest_pid: u32,
    exit: Option<Exit>,
    relay: Option<Relay>,
}

/// A process and what its waiters wait on.
#[derive(Debug)]
pub struct Process {
    pub container_id: String,
    /// "" for the container's init process.
    pub exec_id: String,
    pub stdio: StdioPaths,
    /// The OCI `process` of an exec'd process, JSON (as containerd sent it).
    pub spec_json: Vec<u8>,
    state: Mutex<State>,
    exited: Condvar,
}

impl Process {
    pub fn new(container_id: &str, exec_id: &str, stdio: StdioPaths, spec_json: Vec<u8>) -> Self {
        Self {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            stdio,
            spec_json,
            state: Mutex::new(State { status: Status::Created, guest_pid: 0, exit: None, relay: None }),
            exited: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The id containerd's events use: the exec id, or the container's.
    pub fn event_id(&self) -> &str {
        if self.exec_id.is_empty() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }

    pub fn status(&self) -> Status {
        self.state().status
    }

    pub fn guest_pid(&self) -> u32 {
        self.state().guest_pid
    }

    pub fn exit(&self) -> Option<Exit> {
        self.state().exit
    }

    /// The process exists in the guest (created, or started for an exec).
    pub fn set_guest(&self, guest_pid: u32, relay: Relay, status: Status) {
        let mut s = self.state();
        s.guest_pid = guest_pid;
        s.relay = Some(relay);
        if s.status != Status::Stopped {
            s.status = status;
        }
    }

    /// Created → Running (a process that already exited stays Stopped).
    pub fn set_running(&self) {
        let mut s = self.state();
        if s.status == Status::Created {
            s.status = Status::Running;
        }
    }

    /// Records the exit and wakes the waiters; false if it was recorded before.
    pub fn set_exited(&self, exit: Exit) -> bool {
        let mut s = self.state();
        if s.exit.is_some() {
            return false;
        }
        s.exit = Some(exit);
        s.status = Status::Stopped;
        self.exited.notify_all();
        true
    }

    /// Records an exit of `status` now unless one was recorded: the process
    /// did not start, or the shim stops waiting for it. Waiters return.
    /// True if this call recorded it.
    pub fn abandon(&self, status: u32) -> bool {
        self.set_exited(Exit { status, at: SystemTime::now() })
    }

    /// Blocks until the process has exited.
    pub fn wait(&self) -> Exit {
        let mut s = self.state();
        loop {
            if let Some(e) = s.exit {
                return e;
            }
            s = self.exited.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Like [`Process::wait`], for at most `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Exit> {
        let s = self.state();
        let (s, _) = self.exited.wait_timeout_while(s, timeout, |s| s.exit.is_none()).unwrap_or_else(PoisonError::into_inner);
        s.exit
    }

    /// Runs `f` on the relay without holding the state lock (relay
    /// operations wait for threads).
    fn with_relay(&self, f: impl FnOnce(&mut Relay)) {
        let taken = self.state().relay.take();
        if let Some(mut relay) = taken {
            f(&mut relay);
            let mut s = self.state();
            if s.relay.is_none() {
                s.relay = Some(relay);
            }
        }
    }

    /// Waits up to `timeout` for the output copies to end.
    pub fn finish_output(&self, timeout: Duration) {
        self.with_relay(|r| {
            if !r.finish_output(timeout) {
                tracing::warn!(exec_id = %self.exec_id, "output still open {timeout:?} after the exit (a background child holds it?)");
            }
        });
    }

    /// CloseIO: ends the stdin copy once what was written is delivered.
    pub fn close_stdin(&self, grace: Duration) {
        self.with_relay(|r| r.close_stdin(grace));
    }

    /// Ends every relay thread (the process is gone or was never created).
    pub fn cancel_io(&self) {
        self.with_relay(Relay::cancel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn exit_is_recorded_once_and_wakes_waiters() {
        let p = Arc::new(Process::new("c1", "", StdioPaths::default(), Vec::new()));
        assert_eq!(p.event_id(), "c1");
        assert_eq!(p.status(), Status::Created);
        assert_eq!(p.wait_timeout(Duration::from_millis(10)), None);
        let waiter = {
            let p = p.clone();
            std::thread::spawn(move || p.wait())
        };
        p.set_running();
        assert_eq!(p.status(), Status::Running);
        let exit = Exit { status: 3, at: SystemTime::now() };
        assert!(p.set_exited(exit));
        assert!(!p.set_exited(Exit { status: 9, at: SystemTime::now() }));
        assert_eq!(waiter.join().expect("waiter"), exit);
        assert_eq!(p.status(), Status::Stopped);
        p.set_running();
        assert_eq!(p.status(), Status::Stopped);
        let e = Process::new("c1", "e1", StdioPaths::default(), Vec::new());
        assert_eq!(e.event_id(), "e1");
    }
}
