//! The net worker thread: one epoll loop over the rx/tx queue notifiers,
//! the backend's descriptor and a kill eventfd.
//!
//! The backend is polled only for what the worker can act on: readable
//! while the guest has rx buffers (otherwise frames stay queued in the tap
//! until an rx kick), writable while a tx frame waits for room. A backend
//! that reports an error or hang-up (its interface was deleted) is dropped
//! from the set, so it cannot make the loop spin.

use std::io;
use std::os::unix::io::AsRawFd;

use tracing::{debug, error, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::defs::{RXQ_INDEX, TXQ_INDEX};
use super::device::{NetWorker, RxState, TxState};
use super::{NetBackend, Offloads};
use crate::devices::virtio::ActiveQueue;

const TOKEN_RXQ: u64 = 0;
const TOKEN_TXQ: u64 = 1;
const TOKEN_BACKEND: u64 = 2;
const TOKEN_KILL: u64 = 3;

impl<B: NetBackend> NetWorker<B> {
    /// Runs until `kill` is signalled; gives the backend back.
    pub(crate) fn run(mut self, kill: EventFd) -> (B, Vec<ActiveQueue>) {
        let offloads = self.rx_offloads;
        // Here rather than on the vCPU thread that activates the device:
        // only this thread kind may make the ioctl.
        if offloads != Offloads::default() {
            if let Err(e) = self.backend.set_rx_offloads(offloads) {
                // The tap then hands over whole frames only, which the guest takes too.
                warn!("net: cannot turn the tap's offloads on: {e}");
            }
        }
        if let Err(e) = self.event_loop(&kill) {
            error!("net: worker stopped: {e}");
        }
        self.log_metrics();
        if self.broken {
            crate::devices::virtio::wait_for_kill(&kill);
        }
        // The next driver may negotiate less.
        if offloads != Offloads::default() {
            if let Err(e) = self.backend.set_rx_offloads(Offloads::default()) {
                warn!("net: cannot turn the tap's offloads off: {e}");
            }
        }
        (self.backend, self.queues)
    }

    fn event_loop(&mut self, kill: &EventFd) -> io::Result<()> {
        let epoll = Epoll::new()?;
        let add = |fd, events, token| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token));
        add(self.queues[RXQ_INDEX].notify.as_raw_fd(), EventSet::IN, TOKEN_RXQ)?;
        add(self.queues[TXQ_INDEX].notify.as_raw_fd(), EventSet::IN, TOKEN_TXQ)?;
        add(kill.as_raw_fd(), EventSet::IN, TOKEN_KILL)?;
        let backend_fd = self.backend.poll_fd();
        let mut interest = EventSet::empty();
        add(backend_fd, interest, TOKEN_BACKEND)?;
        let mut backend_alive = true;

        // The guest may have queued frames and buffers before we started.
        let (mut run_tx, mut run_rx) = (true, true);
        let (mut tx, mut rx) = (TxState::Done, RxState::WaitGuest);
        let mut events = [EpollEvent::default(); 8];
        loop {
            if run_tx {
                tx = self.process_tx();
            }
            if run_rx {
                rx = self.process_rx();
            }
            if self.broken {
                return Ok(());
            }
            let mut want = EventSet::empty();
            if rx == RxState::WaitBackend {
                want |= EventSet::IN;
            }
            if tx == TxState::Blocked {
                want |= EventSet::OUT;
            }
            if backend_alive && want != interest {
                epoll.ctl(ControlOperation::Modify, backend_fd, EpollEvent::new(want, TOKEN_BACKEND))?;
                interest = want;
            }

            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            (run_tx, run_rx) = (false, false);
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KILL => {
                        // What the guest queued last still goes out.
                        if tx == TxState::Done {
                            self.process_tx();
                        }
                        debug!("net: worker stopping");
                        return Ok(());
                    }
                    TOKEN_RXQ => {
                        drain(&self.queues[RXQ_INDEX].notify);
                        run_rx = true;
                    }
                    TOKEN_TXQ => {
                        drain(&self.queues[TXQ_INDEX].notify);
                        run_tx = true;
                    }
                    TOKEN_BACKEND => {
                        let set = ev.event_set();
                        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                            error!("net: the tap reports an error or hang-up; it is no longer polled");
                            epoll.ctl(ControlOperation::Delete, backend_fd, EpollEvent::default())?;
                            backend_alive = false;
                        }
                        run_rx |= set.contains(EventSet::IN);
                        run_tx |= set.contains(EventSet::OUT);
                    }
                    _ => {}
                }
            }
        }
    }
}

fn drain(evt: &EventFd) {
    // Non-blocking eventfds: EAGAIN just means another wake-up got it.
    let _ = evt.read();
}
