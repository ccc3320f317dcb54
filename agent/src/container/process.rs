//! One process of a container (its init or an exec'd one): its PID, its
//! stdio, and its exit status once the reaper has it.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::reaper::ChildExit;
use crate::usage::Meter;

use super::stdio::ProcessIo;

/// What WaitProcess answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitRecord {
    pub exit: ChildExit,
    /// Nanoseconds since the Unix epoch when the agent reaped it.
    pub at_unix_nano: i64,
}

/// A process the agent started in a container.
#[derive(Debug)]
pub struct Process {
    pid: i32,
    io: ProcessIo,
    exit: Mutex<Option<ExitRecord>>,
    exited: Condvar,
    /// memory.events oom_kill of the container's cgroup when it started.
    oom_kills_at_start: Mutex<u64>,
    /// Whether it saw an OOM kill (decided once, at the first wait).
    oom_killed: Mutex<Option<bool>>,
    /// Measures the agent's work from the reaping on (WaitProcess's usage).
    since_exit: Mutex<Option<Meter>>,
}

pub fn now_unix_nano() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)).unwrap_or(0)
}

impl Process {
    pub fn new(pid: i32, io: ProcessIo, oom_kills_at_start: u64) -> Self {
        Self {
            pid,
            io,
            exit: Mutex::new(None),
            exited: Condvar::new(),
            oom_kills_at_start: Mutex::new(oom_kills_at_start),
            oom_killed: Mutex::new(None),
            since_exit: Mutex::new(None),
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn io(&self) -> &ProcessIo {
        &self.io
    }

    /// Called by the reaper (keep it short).
    pub fn record_exit(&self, exit: ChildExit) {
        let record = ExitRecord { exit, at_unix_nano: now_unix_nano() };
        *self.since_exit.lock().unwrap_or_else(PoisonError::into_inner) = Some(Meter::start(None));
        *self.exit.lock().unwrap_or_else(PoisonError::into_inner) = Some(record);
        self.exited.notify_all();
        self.io.notify_exit();
    }

    /// The exit status, if it has exited.
    pub fn exit(&self) -> Option<ExitRecord> {
        *self.exit.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn has_exited(&self) -> bool {
        self.exit().is_some()
    }

    /// Blocks until the process has exited and its output is drained.
    pub fn wait(&self) -> ExitRecord {
        let record = {
            let mut exit = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(record) = *exit {
                    break record;
                }
                exit = self.exited.wait(exit).unwrap_or_else(PoisonError::into_inner);
            }
        };
        self.io.wait_drained();
        record
    }

    /// What the agent spent from the reaping of the process until now.
    pub fn usage_since_exit(&self) -> Option<carapace_protocol::agent::GuestUsage> {
        self.since_exit.lock().unwrap_or_else(PoisonError::into_inner).map(|m| m.finish(None))
    }

    /// Resets the OOM baseline (the init process "starts" at StartContainer).
    pub fn set_oom_baseline(&self, oom_kills: u64) {
        *self.oom_kills_at_start.lock().unwrap_or_else(PoisonError::into_inner) = oom_kills;
    }

    /// Decides once whether the cgroup's OOM-kill count grew while the
    /// process ran, from `now` (the count read after its exit).
    pub fn oom_killed(&self, now: impl FnOnce() -> u64) -> bool {
        let mut decided = self.oom_killed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = *decided {
            return v;
        }
        let start = *self.oom_kills_at_start.lock().unwrap_or_else(PoisonError::into_inner);
        let v = now() > start;
        *decided = Some(v);
        v
    }
}
