//! Ending the agent: the Shutdown call's trigger and, in the guest, the
//! reboot that makes the VMM exit.
//!
//! The Shutdown call must be answered before the agent goes: its handler
//! only arms a [`ShutdownTrigger`], which after a grace period (time for
//! ttrpc's writer thread to send the reply and, in the guest, for the VMM
//! to forward it) sends SIGTERM to the agent itself. The main thread reads
//! that from the signalfd like any SIGTERM and ends the agent: on the host
//! it stops the server and exits 0; as PID 1 it syncs and reboots, which
//! with the guest's `reboot=k` resets through the i8042, and the VMM exits 0.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long after the Shutdown reply the agent goes down.
pub const REPLY_GRACE: Duration = Duration::from_millis(100);

/// Arms the agent's shutdown once; clones share the state.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger {
    requested: Arc<AtomicBool>,
    grace: Duration,
}

impl ShutdownTrigger {
    pub fn new(grace: Duration) -> Self {
        Self {
            requested: Arc::new(AtomicBool::new(false)),
            grace,
        }
    }

    /// Sends SIGTERM to this process after the grace period, from a new
    /// thread. Calling it again while one is under way does nothing.
    pub fn request(&self) -> std::io::Result<()> {
        if self.requested.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let grace = self.grace;
        let spawned = std::thread::Builder::new()
            .name("shutdown".into())
            .spawn(move || {
                std::thread::sleep(grace);
                // Process-directed: the main thread's signalfd gets it (all
                // threads block SIGTERM).
                if let Err(e) = kill(Pid::this(), Signal::SIGTERM) {
                    tracing::error!(error = %e, "cannot signal the agent to shut down");
                }
            });
        match spawned {
            Ok(_) => Ok(()),
            Err(e) => {
                self.requested.store(false, Ordering::SeqCst);
                Err(e)
            }
        }
    }
}

/// Syncs the file systems and reboots the guest; as PID 1 this is how the
/// VM ends. Never returns: if the reboot fails, PID 1 must not exit (the
/// kernel would panic), so it idles.
pub fn reboot_guest() -> ! {
    nix::unistd::sync();
    let err = match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    tracing::error!(error = %err, "reboot failed; idling");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
