//! Ending the agent: the Shutdown call's trigger and, in the guest, the
//! reboot that makes the VMM exit.
//!
//! The Shutdown call must be answered before the agent goes. Its handler
//! marks the [`ShutdownTrigger`] and sends SIGTERM to the agent itself (no
//! thread: spawning one costs tens of ms in the guest), then returns its
//! reply to ttrpc. The main thread reads the SIGTERM from the signalfd like
//! any other, and, because the trigger was marked, gives ttrpc's writer
//! thread [`REPLY_GRACE`] to send the reply (and, in the guest, the vsock
//! path and the VMM to forward it; as PID 1 the `sync` runs first, during
//! that time). Then on the host it stops the server and exits 0; as PID 1 it
//! reboots, which with the guest's `reboot=k` resets through the i8042, and
//! the VMM exits 0.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long the agent lets the Shutdown reply travel before it goes down.
/// An RPC round trip through a PVM guest's vsock takes ~0.1 s.
pub const REPLY_GRACE: Duration = Duration::from_millis(250);

/// Records that Shutdown was called and signals the main thread; clones
/// share the state.
#[derive(Debug, Clone, Default)]
pub struct ShutdownTrigger {
    requested: Arc<AtomicBool>,
}

impl ShutdownTrigger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the shutdown as requested and sends SIGTERM to this process
    /// (process-directed: the main thread's signalfd gets it, as every
    /// thread blocks SIGTERM). Calling it again does nothing more.
    pub fn request(&self) -> nix::Result<()> {
        if self.requested.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        kill(Pid::this(), Signal::SIGTERM).inspect_err(|_| {
            self.requested.store(false, Ordering::SeqCst);
        })
    }

    /// Whether Shutdown was called (rather than a plain SIGTERM/SIGINT).
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// If Shutdown was called, waits until `since + REPLY_GRACE`.
    pub fn wait_for_reply(&self, since: Instant) {
        if self.requested() {
            std::thread::sleep(REPLY_GRACE.saturating_sub(since.elapsed()));
        }
    }
}

/// Reboots the guest; as PID 1 this is how the VM ends. Call `sync` first.
/// Never returns: if the reboot fails, PID 1 must not exit (the kernel
/// would panic), so it idles.
pub fn reboot_guest() -> ! {
    let err = match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    tracing::error!(error = %err, "reboot failed; idling");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_only_after_a_request() {
        let trigger = ShutdownTrigger::new();
        assert!(!trigger.requested());
        let t = Instant::now();
        trigger.wait_for_reply(t);
        assert!(t.elapsed() < REPLY_GRACE);
        // Marked without signalling (the signal would end the test run).
        trigger.requested.store(true, Ordering::SeqCst);
        assert!(trigger.clone().requested());
        trigger.wait_for_reply(Instant::now() - REPLY_GRACE);
        // And a second request is a no-op.
        assert_eq!(trigger.request(), Ok(()));
    }
}
