//! The vsock worker thread: one epoll loop over the rx/tx/event queue
//! notifiers, the backend's descriptor (its listener and every connection
//! stream sit behind it) and a kill eventfd.

use std::io;
use std::os::unix::io::AsRawFd;
use std::time::Instant;

use tracing::{debug, error};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::defs::{EVQ_INDEX, RXQ_INDEX, TXQ_INDEX};
use super::device::VsockWorker;
use super::VsockBackend;
use crate::devices::virtio::ActiveQueue;

const TOKEN_RXQ: u64 = 0;
const TOKEN_TXQ: u64 = 1;
const TOKEN_EVQ: u64 = 2;
const TOKEN_BACKEND: u64 = 3;
const TOKEN_KILL: u64 = 4;

impl<B: VsockBackend> VsockWorker<B> {
    /// Runs until `kill` is signalled; gives the backend and the queues
    /// (where the device stands in them, for a snapshot) back.
    pub(crate) fn run(mut self, kill: EventFd) -> (B, Vec<ActiveQueue>) {
        if let Err(e) = self.event_loop(&kill) {
            error!("vsock: worker stopped: {e}");
        }
        if self.broken {
            // Host clients see their connections end now rather than hang
            // until the guest resets the device.
            self.backend.reset();
            crate::devices::virtio::wait_for_kill(&kill);
        }
        (self.backend, self.queues)
    }

    fn event_loop(&mut self, kill: &EventFd) -> io::Result<()> {
        let epoll = Epoll::new()?;
        let add = |fd, token| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token));
        add(self.queues[RXQ_INDEX].notify.as_raw_fd(), TOKEN_RXQ)?;
        add(self.queues[TXQ_INDEX].notify.as_raw_fd(), TOKEN_TXQ)?;
        add(self.queues[EVQ_INDEX].notify.as_raw_fd(), TOKEN_EVQ)?;
        add(kill.as_raw_fd(), TOKEN_KILL)?;
        if let Some(fd) = self.backend.poll_fd() {
            add(fd, TOKEN_BACKEND)?;
        }

        if self.send_transport_reset {
            self.send_transport_reset = !self.process_evq();
        }
        // The guest may have queued packets before we started polling.
        self.process_tx();
        self.process_rx();
        if self.broken {
            return Ok(());
        }

        let mut events = [EpollEvent::default(); 8];
        loop {
            let timeout = match self.backend.next_timeout() {
                None => -1,
                Some(t) => {
                    let ms = t.saturating_duration_since(Instant::now()).as_millis() + 1;
                    i32::try_from(ms).unwrap_or(i32::MAX)
                }
            };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KILL => {
                        // What the guest queued last (an answer sent just
                        // before it shut down, a kick in this same batch)
                        // still reaches the host sockets before they close.
                        self.process_tx();
                        debug!("vsock: worker stopping");
                        return Ok(());
                    }
                    TOKEN_RXQ => drain(&self.queues[RXQ_INDEX].notify),
                    TOKEN_TXQ => drain(&self.queues[TXQ_INDEX].notify),
                    // Event-queue buffers are used only for the transport
                    // reset after a restore (a snapshot's connections are gone).
                    TOKEN_EVQ => {
                        drain(&self.queues[EVQ_INDEX].notify);
                        if self.send_transport_reset {
                            self.send_transport_reset = !self.process_evq();
                        }
                    }
                    TOKEN_BACKEND => self.backend.process_host_events(),
                    _ => {}
                }
            }
            self.backend.process_timeouts(Instant::now());
            // Guest packets first: they may produce replies and grant credit.
            self.process_tx();
            self.process_rx();
            if self.broken {
                return Ok(());
            }
        }
    }
}

fn drain(evt: &EventFd) {
    // Non-blocking eventfds: EAGAIN just means another wake-up got it.
    let _ = evt.read();
}
