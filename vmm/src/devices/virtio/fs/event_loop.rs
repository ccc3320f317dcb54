//! The virtio-fs worker thread: one epoll loop over the queue notifiers
//! (hiprio and request queues) and a kill eventfd. Requests are served one
//! at a time, in the order the queues are found ready.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use tracing::{debug, error, warn};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::backend::FsServer;
use super::request::process_queue;
use super::stats::RequestStats;
use crate::devices::virtio::{ActiveQueue, Interrupt, VIRTIO_MMIO_INT_VRING};

/// The epoll token of the kill eventfd (queue notifiers use their index).
const TOKEN_KILL: u64 = u64::MAX;

/// What the worker thread owns.
pub(crate) struct FsWorker {
    server: Arc<FsServer>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<ActiveQueue>,
    /// A queue was found corrupt: the device stopped (DEVICE_NEEDS_RESET).
    broken: bool,
    /// The requests served.
    stats: RequestStats,
}

impl FsWorker {
    pub(crate) fn new(server: Arc<FsServer>, mem: GuestMemoryMmap, interrupt: Arc<Interrupt>, queues: Vec<ActiveQueue>) -> Self {
        Self { server, mem, interrupt, queues, broken: false, stats: RequestStats::default() }
    }

    /// Runs until `kill` is signalled; returns what it served.
    pub(crate) fn run(mut self, kill: EventFd) -> (RequestStats, Vec<ActiveQueue>) {
        isolate_umask();
        if let Err(e) = self.event_loop(&kill) {
            error!("virtio-fs: worker stopped: {e}");
        }
        if self.broken {
            crate::devices::virtio::wait_for_kill(&kill);
        }
        (self.stats, self.queues)
    }

    fn event_loop(&mut self, kill: &EventFd) -> io::Result<()> {
        let epoll = Epoll::new()?;
        for (index, q) in self.queues.iter().enumerate() {
            let token = u64::try_from(index).unwrap_or(TOKEN_KILL - 1);
            epoll.ctl(ControlOperation::Add, q.notify.as_raw_fd(), EpollEvent::new(EventSet::IN, token))?;
        }
        epoll.ctl(ControlOperation::Add, kill.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_KILL))?;

        // The driver may have queued requests before we started polling.
        for index in 0..self.queues.len() {
            self.process(index);
        }
        if self.broken {
            return Ok(());
        }

        let mut events = vec![EpollEvent::default(); self.queues.len() + 1];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == TOKEN_KILL {
                    debug!("virtio-fs: worker stopping");
                    return Ok(());
                }
                let Some(index) = usize::try_from(token).ok().filter(|&i| i < self.queues.len()) else {
                    continue;
                };
                // Non-blocking eventfds: EAGAIN only means someone drained it.
                let _ = self.queues[index].notify.read();
                self.process(index);
                if self.broken {
                    return Ok(());
                }
            }
        }
    }

    fn process(&mut self, index: usize) {
        let queue = &mut self.queues[index].queue;
        let notify = match process_queue(&self.server, &self.mem, queue, &mut self.stats) {
            Ok(notify) => notify,
            Err(e) => {
                // The driver corrupted the queue (or its rings cannot be
                // read): stop serving and ask for a reset rather than
                // re-reading a corrupt available index on every kick.
                error!("virtio-fs: queue {index} unusable ({e}); the device needs a reset");
                self.broken = true;
                self.interrupt.set_needs_reset();
                // Some chains may have been used before the error.
                true
            }
        };
        if notify {
            if let Err(e) = self.interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
                error!("virtio-fs: cannot raise the interrupt: {e}");
            }
        }
    }
}

/// Gives the calling thread its own umask (and cwd/root) and sets the umask
/// to 0: the backend applies the guest's umask itself and clears the
/// process umask when it opens the share (FUSE INIT). Done on the worker
/// thread, that change stays off the rest of the VMM, whose files keep the
/// process umask.
pub(crate) fn isolate_umask() {
    // SAFETY: unshare(CLONE_FS) only detaches this thread's file-system
    // attributes (root, cwd, umask); it touches no memory.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        warn!("virtio-fs: cannot unshare the worker's umask: {}", io::Error::last_os_error());
        return;
    }
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe { libc::umask(0) };
}
