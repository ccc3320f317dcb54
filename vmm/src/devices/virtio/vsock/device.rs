//! The virtio-vsock device: config space, features, and moving packets
//! between the rx/tx queues and the backend.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{error, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::defs::*;
use super::packet::{read_tx_chain, RxBuffers, TxError, VsockPacket};
use super::unix::VsockUnixBackend;
use super::{VsockBackend, VsockError};
use crate::devices::virtio::{ActivateError, ActiveQueue, Interrupt, VirtioDevice, VIRTIO_MMIO_INT_VRING};

/// The virtio-vsock device, generic over its host backend.
#[derive(Debug)]
pub struct Vsock<B: VsockBackend + 'static = VsockUnixBackend> {
    guest_cid: u64,
    avail_features: u64,
    acked_features: u64,
    /// The backend while the device is not running (the worker owns it otherwise).
    backend: Option<B>,
    worker: Option<Worker<B>>,
}

#[derive(Debug)]
struct Worker<B> {
    kill: EventFd,
    handle: JoinHandle<B>,
}

const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

impl Vsock<VsockUnixBackend> {
    /// A vsock device for a guest with CID `guest_cid`, whose host side is the
    /// hybrid-vsock Unix socket `uds_path` (bound here).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        let backend = VsockUnixBackend::new(guest_cid, uds_path)?;
        Ok(Self::with_backend(guest_cid, backend))
    }
}

impl<B: VsockBackend + 'static> Vsock<B> {
    /// A vsock device over any backend.
    pub fn with_backend(guest_cid: u64, backend: B) -> Self {
        Vsock {
            guest_cid,
            avail_features: (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_RING_F_EVENT_IDX),
            acked_features: 0,
            backend: Some(backend),
            worker: None,
        }
    }

    /// The guest CID in the config space.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The backend, while the device is not running.
    pub fn backend(&self) -> Option<&B> {
        self.backend.as_ref()
    }

    /// Whether the worker thread is running.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// Stops the worker and takes the backend back.
    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            if let Err(e) = w.kill.write(1) {
                error!("vsock: cannot signal the worker to stop: {e}");
            }
            match w.handle.join() {
                Ok(b) => self.backend = Some(b),
                Err(_) => error!("vsock: worker thread panicked"),
            }
        }
    }
}

impl<B: VsockBackend + 'static> VirtioDevice for Vsock<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.guest_cid.to_le_bytes();
        let Some(start) = usize::try_from(offset).ok().filter(|o| *o < cfg.len()) else {
            warn!(offset, "vsock: config read out of range");
            data.fill(0);
            return;
        };
        let n = data.len().min(cfg.len() - start);
        data[..n].copy_from_slice(&cfg[start..start + n]);
        data[n..].fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        warn!(offset, "vsock: guest wrote the read-only config space");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount { expected: QUEUE_SIZES.len(), got: queues.len() });
        }
        if self.worker.is_some() {
            return Err(ActivateError::BadConfig("vsock device already active".into()));
        }
        let Some(backend) = self.backend.take() else {
            return Err(ActivateError::BadConfig("vsock backend lost".into()));
        };
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let worker_kill = match kill.try_clone() {
            Ok(k) => k,
            Err(e) => {
                self.backend = Some(backend);
                return Err(e.into());
            }
        };
        let worker = VsockWorker::new(mem, interrupt, queues, backend);
        let handle = std::thread::Builder::new()
            .name("vsock".into())
            .spawn(move || worker.run(worker_kill))?;
        self.worker = Some(Worker { kill, handle });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop_worker();
        match self.backend.as_mut() {
            Some(b) => {
                b.reset();
                self.acked_features = 0;
                true
            }
            None => false,
        }
    }
}

impl<B: VsockBackend + 'static> Drop for Vsock<B> {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// What the worker thread owns: memory, queues, interrupt and backend.
#[derive(Debug)]
pub(crate) struct VsockWorker<B> {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) interrupt: Arc<Interrupt>,
    pub(crate) queues: Vec<ActiveQueue>,
    pub(crate) backend: B,
    pkt: VsockPacket,
    rx_bufs: RxBuffers,
}

impl<B: VsockBackend> VsockWorker<B> {
    pub(crate) fn new(
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
        backend: B,
    ) -> Self {
        VsockWorker {
            mem,
            interrupt,
            queues,
            backend,
            pkt: VsockPacket { hdr: Default::default(), data: Vec::with_capacity(MAX_PKT_BUF_SIZE) },
            rx_bufs: RxBuffers::default(),
        }
    }

    fn signal_used(&mut self, index: usize) {
        let q = &mut self.queues[index].queue;
        match q.needs_notification(&self.mem) {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                if let Err(e) = self.interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
                    error!("vsock: cannot raise the interrupt: {e}");
                }
            }
        }
    }

    /// Handles every packet the guest queued on tx. Returns whether any was.
    pub(crate) fn process_tx(&mut self) -> bool {
        let mut used_any = false;
        loop {
            let q = &mut self.queues[TXQ_INDEX].queue;
            if let Err(e) = q.disable_notification(&self.mem) {
                warn!("vsock: tx queue: {e}");
                break;
            }
            loop {
                let q = &mut self.queues[TXQ_INDEX].queue;
                let chain = match q.iter(&self.mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        warn!("vsock: tx queue: {e}");
                        None
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                match read_tx_chain(&self.mem, chain, &mut self.pkt) {
                    Ok(()) => self.backend.send_pkt(&self.pkt),
                    Err(TxError::NoHeader(e)) => warn!("vsock: dropping tx packet: {e}"),
                    Err(TxError::BadBody(hdr, e)) => {
                        warn!(op = hdr.op, len = hdr.len, "vsock: dropping malformed tx packet: {e}");
                        self.backend.bad_pkt(&hdr);
                    }
                }
                if let Err(e) = self.queues[TXQ_INDEX].queue.add_used(&self.mem, head, 0) {
                    warn!("vsock: tx add_used: {e}");
                }
                used_any = true;
            }
            match self.queues[TXQ_INDEX].queue.enable_notification(&self.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!("vsock: tx queue: {e}");
                    break;
                }
            }
        }
        if used_any {
            self.signal_used(TXQ_INDEX);
        }
        used_any
    }

    /// Fills rx buffers with what the backend has for the guest. Returns
    /// whether any buffer was used.
    pub(crate) fn process_rx(&mut self) -> bool {
        let mut used_any = false;
        'outer: loop {
            let q = &mut self.queues[RXQ_INDEX].queue;
            if let Err(e) = q.disable_notification(&self.mem) {
                warn!("vsock: rx queue: {e}");
                break;
            }
            while self.backend.has_pending_rx() {
                let q = &mut self.queues[RXQ_INDEX].queue;
                let chain = match q.iter(&self.mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        warn!("vsock: rx queue: {e}");
                        break 'outer;
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let used_len = match self.rx_bufs.parse(chain) {
                    Ok(()) => {
                        if !self.backend.recv_pkt(&mut self.pkt, self.rx_bufs.max_data()) {
                            // Nothing after all: give the buffer back.
                            self.queues[RXQ_INDEX].queue.go_to_previous_position();
                            break 'outer;
                        }
                        match self.rx_bufs.write(&self.mem, &self.pkt) {
                            Ok(n) => n,
                            Err(e) => {
                                warn!("vsock: cannot write rx packet: {e}");
                                0
                            }
                        }
                    }
                    Err(e) => {
                        warn!("vsock: dropping bad rx buffer: {e}");
                        0
                    }
                };
                if let Err(e) = self.queues[RXQ_INDEX].queue.add_used(&self.mem, head, used_len) {
                    warn!("vsock: rx add_used: {e}");
                }
                used_any = true;
            }
            if !self.backend.has_pending_rx() {
                break;
            }
            // Out of buffers: ask for a kick when the guest adds some.
            match self.queues[RXQ_INDEX].queue.enable_notification(&self.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!("vsock: rx queue: {e}");
                    break;
                }
            }
        }
        // Leave notifications on whatever stopped us.
        let _ = self.queues[RXQ_INDEX].queue.enable_notification(&self.mem);
        if used_any {
            self.signal_used(RXQ_INDEX);
        }
        used_any
    }
}
