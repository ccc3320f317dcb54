//! Reaping children and routing their exit statuses by PID.
//!
//! The agent is PID 1 in the guest (and a child subreaper on the host), so
//! every orphan in the VM ends up as its child. SIGCHLD is blocked in every
//! thread (the mask is set in `main` before any thread exists, and threads
//! inherit it) and read from a signalfd by the main thread, which then
//! calls [`Reaper::reap`]: `waitpid(-1, WNOHANG)` until nothing is left,
//! i.e. two `wait4` calls for one exited child.
//!
//! Whoever starts a process and wants its status registers a waiter for its
//! PID. To close the race with a child that exits before it is registered,
//! hold the registry across the spawn:
//!
//! ```text
//! let mut registry = reaper.registry();   // the reaper cannot dispatch now
//! let pid = spawn_somehow()?;             // fork/clone + exec
//! let exit = registry.watch(pid);         // registered before any dispatch
//! drop(registry);
//! // ... later: exit.recv() -> ChildExit
//! ```
//!
//! A status that arrives with no waiter (an orphan) is logged and dropped.
//! Processes the agent spawns must get the signal mask reset (SIGCHLD and
//! the other [`crate::signals`] unblocked) before they exec, and must not be
//! waited for by anything else (no `std::process::Child::wait`).

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// It called exit with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled { signal: i32, core_dumped: bool },
}

/// A reaped child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildExit {
    pub pid: i32,
    pub kind: ExitKind,
}

impl ChildExit {
    /// The status as a shell reports it: the exit code, or 128 + signal.
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            ExitKind::Exited(code) => code,
            ExitKind::Signaled { signal, .. } => 128 + signal,
        }
    }

    /// The signal that killed it, 0 if it exited.
    pub fn signal(&self) -> i32 {
        match self.kind {
            ExitKind::Exited(_) => 0,
            ExitKind::Signaled { signal, .. } => signal,
        }
    }

    fn from_wait_status(status: WaitStatus) -> Option<Self> {
        match status {
            WaitStatus::Exited(pid, code) => Some(Self { pid: pid.as_raw(), kind: ExitKind::Exited(code) }),
            WaitStatus::Signaled(pid, signal, core_dumped) => {
                Some(Self { pid: pid.as_raw(), kind: ExitKind::Signaled { signal: signal as i32, core_dumped } })
            }
            // Stopped/continued/ptrace events are not asked for (no
            // WUNTRACED/WCONTINUED); StillAlive ends the loop elsewhere.
            _ => None,
        }
    }
}

/// What is called with a child's exit status, on the reaping thread: keep
/// it short (store the status, notify a condvar or a channel).
pub type ExitHandler = Box<dyn FnOnce(ChildExit) + Send>;

/// The PIDs someone waits for.
#[derive(Default)]
pub struct Registry {
    waiters: HashMap<i32, ExitHandler>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("pids", &self.waiters.keys().collect::<Vec<_>>()).finish()
    }
}

impl Registry {
    /// Calls `handler` with `pid`'s exit status once it is reaped. A second
    /// registration for the same PID replaces the first.
    pub fn on_exit(&mut self, pid: i32, handler: ExitHandler) {
        self.waiters.insert(pid, handler);
    }

    /// A channel that receives `pid`'s exit status once it is reaped.
    pub fn watch(&mut self, pid: i32) -> mpsc::Receiver<ChildExit> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.on_exit(
            pid,
            Box::new(move |exit| {
                // The receiver may be gone: nobody wants it any more.
                let _ = tx.try_send(exit);
            }),
        );
        rx
    }

    /// Stops waiting for `pid` (e.g. its spawn failed after registering).
    pub fn forget(&mut self, pid: i32) -> bool {
        self.waiters.remove(&pid).is_some()
    }

    fn take(&mut self, pid: i32) -> Option<ExitHandler> {
        self.waiters.remove(&pid)
    }
}

/// Reaps children and hands each status to the waiter registered for it.
#[derive(Debug, Default)]
pub struct Reaper {
    registry: Mutex<Registry>,
}

impl Reaper {
    pub fn new() -> Self {
        Self::default()
    }

    /// The registry, locked: while it is held no status is dispatched (the
    /// reaping thread reaps, then waits for the lock).
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        // A waiter that panicked does not make the map unusable.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reaps every child that has exited, without blocking, and dispatches
    /// the statuses; returns how many were reaped.
    ///
    /// The registry is held while reaping (not while dispatching): whoever
    /// holds it (a container being created, whose library `waitpid`s its
    /// own helper processes) keeps the reaper from reaping meanwhile.
    pub fn reap(&self) -> usize {
        let mut ready = Vec::new();
        {
            let mut registry = self.registry();
            loop {
                match waitpid(Option::<Pid>::None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(nix::Error::ECHILD) => break,
                    Ok(status) => {
                        if let Some(exit) = ChildExit::from_wait_status(status) {
                            ready.push((exit, registry.take(exit.pid)));
                        }
                    }
                    Err(nix::Error::EINTR) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "waitpid failed");
                        break;
                    }
                }
            }
        }
        let reaped = ready.len();
        for (exit, handler) in ready {
            match handler {
                Some(handler) => handler(exit),
                None => tracing::debug!(pid = exit.pid, status = ?exit.kind, "reaped unwatched child"),
            }
        }
        reaped
    }

    /// Hands `exit` to its waiter, if any (outside the lock, so a handler
    /// may register other PIDs).
    pub fn dispatch(&self, exit: ChildExit) {
        let handler = self.registry().take(exit.pid);
        match handler {
            Some(handler) => handler(exit),
            None => tracing::debug!(pid = exit.pid, status = ?exit.kind, "reaped unwatched child"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    fn exited(pid: i32, code: i32) -> ChildExit {
        ChildExit { pid, kind: ExitKind::Exited(code) }
    }

    #[test]
    fn dispatch_goes_to_the_pid_waiter_only() {
        let reaper = Reaper::new();
        let (rx7, rx8) = {
            let mut reg = reaper.registry();
            (reg.watch(7), reg.watch(8))
        };
        reaper.dispatch(exited(8, 3));
        reaper.dispatch(exited(9, 1)); // nobody waits: dropped
        assert_eq!(rx8.try_recv(), Ok(exited(8, 3)));
        assert!(rx7.try_recv().is_err());
        // A handler is called once, then forgotten.
        reaper.dispatch(exited(8, 4));
        assert!(rx8.try_recv().is_err());
        assert!(reaper.registry().forget(7));
        assert!(!reaper.registry().forget(7));
    }

    #[test]
    fn exit_codes_like_a_shell() {
        assert_eq!(exited(1, 3).exit_code(), 3);
        let killed = ChildExit { pid: 1, kind: ExitKind::Signaled { signal: 9, core_dumped: false } };
        assert_eq!((killed.exit_code(), killed.signal()), (137, 9));
    }

    fn reap_until(reaper: &Reaper, rx: &mpsc::Receiver<ChildExit>) -> ChildExit {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            reaper.reap();
            if let Ok(exit) = rx.try_recv() {
                return exit;
            }
            assert!(Instant::now() < deadline, "child not reaped");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Real children (under [`crate::test_children`], since `reap` waits
    /// for any child of the test process).
    #[test]
    #[allow(clippy::zombie_processes, reason = "the reaper under test waits for them")]
    fn reaps_real_children_and_routes_by_pid() {
        let _children = crate::test_children();
        let reaper = Reaper::new();

        // Registered while the registry is held across the spawn, and the
        // child has long exited before the reaper runs.
        let (pid, rx) = {
            let mut reg = reaper.registry();
            let child = Command::new("/bin/sh").args(["-c", "exit 3"]).spawn().expect("spawn sh");
            let pid = i32::try_from(child.id()).expect("pid");
            (pid, reg.watch(pid))
        };
        let exit = reap_until(&reaper, &rx);
        assert_eq!(exit, exited(pid, 3));

        let child = Command::new("/bin/sh").args(["-c", "kill -9 $$"]).spawn().expect("spawn sh");
        let pid = i32::try_from(child.id()).expect("pid");
        let rx = reaper.registry().watch(pid);
        let exit = reap_until(&reaper, &rx);
        assert_eq!((exit.pid, exit.signal(), exit.exit_code()), (pid, 9, 137));

        // Nothing left: reap returns at once.
        assert_eq!(reaper.reap(), 0);
    }
}
