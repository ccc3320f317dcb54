//! The virtio-vsock device: config space, features, and moving packets
//! between the rx/tx queues and the backend.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::error;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::defs::*;
use super::metrics::VsockMetrics;
use super::packet::{read_tx_chain, RxBuffers, TxError, VsockPacket};
use super::unix::VsockUnixBackend;
use super::{VsockBackend, VsockError};
use crate::devices::virtio::{ActivateError, ActiveQueue, Interrupt, VirtioDevice};

/// The virtio-vsock device, generic over its host backend.
#[derive(Debug)]
pub struct Vsock<B: VsockBackend + 'static = VsockUnixBackend> {
    guest_cid: u64,
    avail_features: u64,
    acked_features: u64,
    /// The backend while the device is not running (the worker owns it otherwise).
    backend: Option<B>,
    worker: Option<Worker<B>>,
    metrics: Arc<VsockMetrics>,
    /// The next activation restores a snapshot: the worker starts by
    /// sending VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
    restoring: bool,
}

#[derive(Debug)]
struct Worker<B> {
    kill: EventFd,
    handle: JoinHandle<(B, Vec<ActiveQueue>)>,
}

const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

impl Vsock<VsockUnixBackend> {
    /// A vsock device for a guest with CID `guest_cid`, whose host side is the
    /// hybrid-vsock Unix socket `uds_path` (bound here).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        let backend = VsockUnixBackend::new(guest_cid, uds_path)?;
        let metrics = backend.metrics().clone();
        let mut dev = Self::with_backend(guest_cid, backend);
        dev.metrics = metrics;
        Ok(dev)
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
            metrics: Arc::default(),
            restoring: false,
        }
    }

    /// The device's counters.
    pub fn metrics(&self) -> &Arc<VsockMetrics> {
        &self.metrics
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

    /// Stops the worker and takes the backend back; returns its queues.
    fn stop_worker(&mut self) -> Option<Vec<Queue>> {
        if let Some(w) = self.worker.take() {
            if let Err(e) = w.kill.write(1) {
                error!("vsock: cannot signal the worker to stop: {e}");
            }
            match w.handle.join() {
                Ok((b, queues)) => {
                    self.backend = Some(b);
                    return Some(queues.into_iter().map(|q| q.queue).collect());
                }
                Err(_) => error!("vsock: worker thread panicked"),
            }
        }
        None
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
        crate::devices::virtio::read_config_space("vsock", &self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::guest_warn!(offset, "vsock: guest wrote the read-only config space");
    }

    fn activate(&mut self, mem: GuestMemoryMmap, interrupt: Arc<Interrupt>, queues: Vec<ActiveQueue>) -> Result<(), ActivateError> {
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
        let mut worker = VsockWorker::new(mem, interrupt, queues, backend, self.metrics.clone());
        worker.send_transport_reset = std::mem::take(&mut self.restoring);
        let handle = crate::seccomp::spawn(crate::seccomp::ThreadKind::Vsock, "vsock".into(), move || worker.run(worker_kill))?;
        self.worker = Some(Worker { kill, handle });
        Ok(())
    }

    fn quiesce(&mut self) -> Result<Option<Vec<Queue>>, String> {
        let queues = self.stop_worker();
        // Host connections do not survive a snapshot: the restored VM's
        // guest is told so by a transport reset event.
        if let Some(b) = self.backend.as_mut() {
            b.reset();
        }
        Ok(queues)
    }

    fn prepare_restore(&mut self) {
        self.restoring = true;
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
        let _ = self.stop_worker();
    }
}

/// What the worker thread owns: memory, queues, interrupt and backend.
#[derive(Debug)]
pub(crate) struct VsockWorker<B> {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) interrupt: Arc<Interrupt>,
    pub(crate) queues: Vec<ActiveQueue>,
    pub(crate) backend: B,
    pub(crate) metrics: Arc<VsockMetrics>,
    pkt: VsockPacket,
    rx_bufs: RxBuffers,
    /// A queue was found corrupt: the device stopped (DEVICE_NEEDS_RESET).
    pub(crate) broken: bool,
    /// A transport reset event is still to be sent (after a restore).
    pub(crate) send_transport_reset: bool,
}

impl<B: VsockBackend> VsockWorker<B> {
    pub(crate) fn new(
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
        backend: B,
        metrics: Arc<VsockMetrics>,
    ) -> Self {
        VsockWorker {
            mem,
            interrupt,
            queues,
            backend,
            metrics,
            pkt: VsockPacket { hdr: Default::default(), data: Vec::with_capacity(MAX_PKT_BUF_SIZE) },
            rx_bufs: RxBuffers::default(),
            broken: false,
            send_transport_reset: false,
        }
    }

    /// Puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET in the next event-queue
    /// buffer: the guest drops every connection it had (they belonged to
    /// the VM the snapshot was taken of), keeps its listening sockets, and
    /// re-reads its CID. Returns whether it was sent (false: no buffer yet;
    /// retried when the driver adds one).
    pub(crate) fn process_evq(&mut self) -> bool {
        use vm_memory::Bytes;
        let q = &mut self.queues[EVQ_INDEX].queue;
        let chain = match q.iter(&self.mem) {
            Ok(mut it) => it.next(),
            Err(e) => {
                self.queue_broken(EVQ_INDEX, &e);
                return true;
            }
        };
        let Some(mut chain) = chain else { return false };
        let head = chain.head_index();
        let mut used = 0;
        if let Some(desc) = chain.find(|d| d.is_write_only() && d.len() >= 4) {
            // struct virtio_vsock_event { le32 id; }, id 0 = TRANSPORT_RESET.
            if self.mem.write_obj(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le(), desc.addr()).is_ok() {
                used = 4;
            }
        }
        if used == 0 {
            crate::guest_warn!("vsock: event buffer unusable for the transport reset");
        }
        if let Err(e) = self.queues[EVQ_INDEX].queue.add_used(&self.mem, head, used) {
            crate::guest_warn!("vsock: evq add_used: {e}");
        }
        self.signal_used(EVQ_INDEX);
        tracing::debug!("vsock: transport reset event sent");
        true
    }

    /// A queue is unusable (the driver corrupted its available index, or
    /// its rings cannot be read): a driver bug or a hostile guest. Nothing
    /// on it can be trusted any more, so the device stops and asks for a
    /// reset instead of retrying (an available index that stays corrupt
    /// would otherwise be re-read forever).
    fn queue_broken(&mut self, index: usize, e: &virtio_queue::Error) {
        VsockMetrics::inc(&self.metrics.queue_errors);
        if !self.broken {
            error!(queue = index, "vsock: virtqueue unusable ({e}); the device needs a reset");
            self.broken = true;
            self.interrupt.set_needs_reset();
        }
    }

    fn signal_used(&mut self, index: usize) {
        self.interrupt.signal_used("vsock", &mut self.queues[index].queue, &self.mem);
    }

    /// Handles every packet the guest queued on tx. Returns whether any was.
    pub(crate) fn process_tx(&mut self) -> bool {
        let mut used_any = false;
        'outer: loop {
            if self.broken {
                break;
            }
            let q = &mut self.queues[TXQ_INDEX].queue;
            if let Err(e) = q.disable_notification(&self.mem) {
                self.queue_broken(TXQ_INDEX, &e);
                break;
            }
            loop {
                let q = &mut self.queues[TXQ_INDEX].queue;
                let chain = match q.iter(&self.mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        self.queue_broken(TXQ_INDEX, &e);
                        break 'outer;
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                match read_tx_chain(&self.mem, chain, &mut self.pkt) {
                    Ok(()) => {
                        VsockMetrics::inc(&self.metrics.tx_packets);
                        self.backend.send_pkt(&self.pkt);
                    }
                    Err(TxError::NoHeader(e)) => {
                        VsockMetrics::inc(&self.metrics.tx_malformed);
                        crate::guest_warn!("vsock: dropping tx packet: {e}");
                    }
                    Err(TxError::BadBody(hdr, e)) => {
                        VsockMetrics::inc(&self.metrics.tx_malformed);
                        crate::guest_warn!(op = hdr.op, len = hdr.len, "vsock: dropping malformed tx packet: {e}");
                        self.backend.bad_pkt(&hdr);
                    }
                }
                if let Err(e) = self.queues[TXQ_INDEX].queue.add_used(&self.mem, head, 0) {
                    VsockMetrics::inc(&self.metrics.queue_errors);
                    crate::guest_warn!("vsock: tx add_used: {e}");
                }
                used_any = true;
            }
            match self.queues[TXQ_INDEX].queue.enable_notification(&self.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.queue_broken(TXQ_INDEX, &e);
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
            if self.broken {
                break;
            }
            let q = &mut self.queues[RXQ_INDEX].queue;
            if let Err(e) = q.disable_notification(&self.mem) {
                self.queue_broken(RXQ_INDEX, &e);
                break;
            }
            while self.backend.has_pending_rx() {
                let q = &mut self.queues[RXQ_INDEX].queue;
                let chain = match q.iter(&self.mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        self.queue_broken(RXQ_INDEX, &e);
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
                            Ok(n) => {
                                VsockMetrics::inc(&self.metrics.rx_packets);
                                n
                            }
                            Err(e) => {
                                VsockMetrics::inc(&self.metrics.rx_bad_buffers);
                                crate::guest_warn!("vsock: cannot write rx packet: {e}");
                                0
                            }
                        }
                    }
                    Err(e) => {
                        VsockMetrics::inc(&self.metrics.rx_bad_buffers);
                        crate::guest_warn!("vsock: dropping bad rx buffer: {e}");
                        0
                    }
                };
                if let Err(e) = self.queues[RXQ_INDEX].queue.add_used(&self.mem, head, used_len) {
                    VsockMetrics::inc(&self.metrics.queue_errors);
                    crate::guest_warn!("vsock: rx add_used: {e}");
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
                    self.queue_broken(RXQ_INDEX, &e);
                    break;
                }
            }
        }
        // Kicks for new rx buffers only matter while we are starved of them
        // (host events re-run this anyway): spare the guest the exits.
        if !self.broken && !self.backend.has_pending_rx() {
            let _ = self.queues[RXQ_INDEX].queue.disable_notification(&self.mem);
        }
        if used_any {
            self.signal_used(RXQ_INDEX);
        }
        used_any
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::packet::VsockHeader;
    use crate::devices::virtio::vsock::test_utils::*;
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress};

    fn irq() -> Arc<Interrupt> {
        Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")))
    }

    fn worker() -> (TestGuest, VsockWorker<TestBackend>, Arc<Interrupt>) {
        let (g, queues) = TestGuest::new();
        let irq = irq();
        let w = VsockWorker::new(g.mem.clone(), irq.clone(), queues, TestBackend::default(), Arc::default());
        (g, w, irq)
    }

    fn pkt_bytes(hdr: VsockHeader, data: &[u8]) -> Vec<u8> {
        let mut b = hdr.to_bytes().to_vec();
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn device_basics() {
        let d = Vsock::with_backend(0x1_2345_6789, TestBackend::default());
        assert_eq!(d.device_type(), 19);
        assert_eq!(d.queue_max_sizes(), &[256, 256, 256]);
        assert_ne!(d.avail_features() & (1 << VIRTIO_F_VERSION_1), 0);
        let mut b = [0u8; 8];
        d.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0x1_2345_6789);
        let mut b = [0u8; 4];
        d.read_config(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        // Partly and wholly out of range.
        let mut b = [0xffu8; 4];
        d.read_config(6, &mut b);
        assert_eq!(b, [0, 0, 0, 0]);
        d.read_config(100, &mut b);
        assert_eq!(b, [0; 4]);
        let mut d = d;
        d.write_config(0, &[1, 2, 3]);
        assert_eq!(d.guest_cid(), 0x1_2345_6789);
        d.set_acked_features(u64::MAX);
        assert_eq!(d.acked_features, d.avail_features);
    }

    #[test]
    fn tx_packets_reach_backend() {
        let (mut g, mut w, irq) = worker();
        let hdr = guest_hdr(OP_RW, 1000, 2000);
        g.send(hdr, b"single");
        g.send_split(hdr, b"split");
        // Header cut in three, data in two.
        let mut h = hdr;
        h.len = 9;
        g.queue_tx_raw(&pkt_bytes(h, b"piecewise"), &[5, 30, 48], None);
        // Extra readable bytes past `len` are ignored.
        h.len = 2;
        g.queue_tx_raw(&pkt_bytes(h, b"abcdef"), &[], None);
        assert!(w.process_tx());
        let data: Vec<&[u8]> = w.backend.tx_pkts.iter().map(|p| &p.data[..]).collect();
        assert_eq!(data, vec![&b"single"[..], b"split", b"piecewise", b"ab"]);
        assert_eq!(w.backend.tx_pkts[0].hdr.src_port, 1000);
        let used = g.take_used(TXQ_INDEX);
        assert_eq!(used.len(), 4);
        assert!(used.iter().all(|&(_, len)| len == 0));
        assert_eq!(irq.irqfd().read().expect("interrupt raised"), 1);
        assert_eq!(irq.status(), 1);
        // Nothing new: nothing used, no interrupt.
        assert!(!w.process_tx());
        assert!(irq.irqfd().read().is_err());
    }

    #[test]
    fn malformed_tx_packets_are_dropped() {
        let (mut g, mut w, _irq) = worker();
        let hdr = guest_hdr(OP_RW, 1000, 2000);
        // Too short for a header.
        g.queue_tx_raw(&hdr.to_bytes()[..20], &[], None);
        // Header in a write-only descriptor.
        g.queue_tx_raw(&pkt_bytes(hdr, b""), &[], Some(0));
        // len says 100, 10 bytes follow.
        let mut h = hdr;
        h.len = 100;
        g.queue_tx_raw(&pkt_bytes(h, &[1; 10]), &[], None);
        // len above the maximum packet size.
        h.len = (MAX_PKT_BUF_SIZE + 1) as u32;
        g.queue_tx_raw(&pkt_bytes(h, &vec![0; MAX_PKT_BUF_SIZE + 1]), &[], None);
        // Data in a write-only descriptor.
        h.len = 4;
        g.queue_tx_raw(&pkt_bytes(h, b"data"), &[PKT_HDR_SIZE], Some(1));
        // A descriptor outside guest memory.
        g.add_chain(TXQ_INDEX, &[(GuestAddress(0xff_0000_0000), 64, false)]);
        // Data descriptor outside guest memory.
        let a = GuestAddress(0x30_0000);
        g.mem.write_slice(&h.to_bytes(), a).expect("write");
        g.add_chain(TXQ_INDEX, &[(a, 44, false), (GuestAddress(0xff_0000_0000), 4, false)]);
        // A zero-length chain element and an empty header descriptor.
        g.add_chain(TXQ_INDEX, &[(a, 0, false)]);
        // Then a good one.
        g.send(guest_hdr(OP_REQUEST, 1, 2), b"");
        w.process_tx();
        assert_eq!(g.take_used(TXQ_INDEX).len(), 9);
        assert_eq!(w.backend.tx_pkts.len(), 1);
        assert_eq!(w.backend.tx_pkts[0].hdr.op, OP_REQUEST);
        // Malformed with a readable header: reported so the connection is reset.
        assert_eq!(w.backend.bad_hdrs.len(), 4);
        assert_eq!(w.metrics.tx_malformed.load(Ordering::Relaxed), 8);
        assert_eq!(w.metrics.tx_packets.load(Ordering::Relaxed), 1);
        assert!(w.backend.bad_hdrs.iter().all(|h| h.src_port == 1000 && h.dst_port == 2000));
    }

    #[test]
    fn rx_packets_reach_guest() {
        let (mut g, mut w, irq) = worker();
        let mk = |n: u8, len: usize| VsockPacket {
            hdr: VsockHeader { op: OP_RW, src_port: u32::from(n), ..Default::default() },
            data: vec![n; len],
        };
        w.backend.rx_pkts.extend([mk(1, 10), mk(2, 5000), mk(3, 0)]);
        // No buffers yet: nothing happens, nothing is lost.
        assert!(!w.process_rx());
        assert_eq!(w.backend.rx_pkts.len(), 3);
        // A single 4 KiB buffer, then a header/data split chain.
        g.post_rx(1, 4096);
        g.post_rx_chain(&[(PKT_HDR_SIZE as u32, true), (8192, true)]);
        g.post_rx_chain(&[(10, true), (100, true)]);
        assert!(w.process_rx());
        let got = g.recv(false);
        assert_eq!(got.len(), 3);
        assert_eq!((got[0].hdr.src_port, got[0].data.len()), (1, 10));
        assert_eq!((got[1].hdr.src_port, got[1].data.len()), (2, 5000));
        assert_eq!((got[2].hdr.src_port, got[2].data.len()), (3, 0));
        assert_eq!(w.backend.max_data_seen, vec![4096 - 44, 8192, 110 - 44]);
        assert_eq!(irq.irqfd().read().expect("interrupt"), 1);
    }

    #[test]
    fn bad_rx_buffers_are_returned_empty() {
        let (mut g, mut w, _irq) = worker();
        w.backend.rx_pkts.push_back(VsockPacket { hdr: VsockHeader { op: OP_RST, ..Default::default() }, data: vec![] });
        let ro = g.post_rx_chain(&[(4096, false)]);
        let short = g.post_rx_chain(&[(20, true), (20, true)]);
        let mixed = g.post_rx_chain(&[(44, true), (100, false)]);
        g.post_rx(1, 4096);
        w.process_rx();
        let used = g.take_used(RXQ_INDEX);
        assert_eq!(used.len(), 4);
        assert_eq!(&used[..3], &[(ro, 0), (short, 0), (mixed, 0)]);
        assert_eq!(w.metrics.rx_bad_buffers.load(Ordering::Relaxed), 3);
        assert_eq!(w.metrics.rx_packets.load(Ordering::Relaxed), 1);
        assert_eq!(used[3].1, 44);
        assert!(w.backend.rx_pkts.is_empty());

        // A buffer outside guest memory loses that packet, not the device.
        w.backend.rx_pkts.push_back(VsockPacket::default());
        let head = g.add_chain(RXQ_INDEX, &[(GuestAddress(0xff_0000_0000), 4096, true)]);
        w.process_rx();
        assert_eq!(g.take_used(RXQ_INDEX), vec![(head, 0)]);
    }

    #[test]
    fn event_idx_suppression() {
        let (mut g, queues) = TestGuest::new();
        let queues = queues
            .into_iter()
            .map(|mut q| {
                q.queue.set_event_idx(true);
                q
            })
            .collect();
        let irq = irq();
        let mut w = VsockWorker::new(g.mem.clone(), irq.clone(), queues, TestBackend::default(), Arc::default());
        // The driver wants an interrupt only after the 3rd used tx buffer.
        g.set_used_event(TXQ_INDEX, 2);
        g.send(guest_hdr(OP_RW, 1, 2), b"a");
        g.send(guest_hdr(OP_RW, 1, 2), b"b");
        w.process_tx();
        assert!(irq.irqfd().read().is_err(), "no interrupt yet");
        // The device asks for a kick on the next buffer.
        assert_eq!(g.avail_event(TXQ_INDEX), 2);
        g.send(guest_hdr(OP_RW, 1, 2), b"c");
        w.process_tx();
        assert_eq!(irq.irqfd().read().expect("interrupt"), 1);
        assert_eq!(w.backend.tx_pkts.len(), 3);

        // rx: out of buffers, the device asks for a kick on the next one.
        w.backend.rx_pkts.extend((0..3).map(|_| VsockPacket::default()));
        g.post_rx(1, 4096);
        w.process_rx();
        assert_eq!(g.take_used(RXQ_INDEX).len(), 1);
        assert_eq!(g.avail_event(RXQ_INDEX), 1);
        assert_eq!(w.backend.rx_pkts.len(), 2);
    }

    /// Writes raw descriptors into queue `qi`'s table and publishes `head`.
    fn raw_chain(g: &mut TestGuest, qi: usize, descs: &[(u16, u64, u32, u16, u16)], head: u16) {
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        for &(idx, addr, len, flags, next) in descs {
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
            g.mem.write_obj(d, g.desc_addr(qi, idx)).expect("desc");
        }
        g.publish_head(qi, head);
    }

    /// Chains that loop, run longer than the queue, go through bad
    /// indirect tables or start beyond the table: each ends (the walk is
    /// bounded by the queue size and by 4 GiB of buffers) and the device
    /// goes on with the next packet.
    #[test]
    fn hostile_tx_chains_terminate() {
        use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        const NEXT: u16 = VRING_DESC_F_NEXT as u16;
        const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
        const WRITE: u16 = VRING_DESC_F_WRITE as u16;
        let (mut g, mut w, _irq) = worker();
        let hdr_at = 0x30_0000u64;
        let mut h = guest_hdr(OP_RW, 7, 8);
        h.len = 16;
        g.mem.write_slice(&h.to_bytes(), GuestAddress(hdr_at)).expect("write");
        let table = 0x31_0000u64;
        let base = 200u16;
        // 1. A descriptor whose `next` is itself.
        raw_chain(&mut g, TXQ_INDEX, &[(base, hdr_at, 60, NEXT, base)], base);
        // 2. Two descriptors pointing at each other.
        raw_chain(&mut g, TXQ_INDEX, &[(base + 1, hdr_at, 44, NEXT, base + 2), (base + 2, hdr_at, 8, NEXT, base + 1)], base + 1);
        // 3. A head index beyond the table.
        g.publish_head(TXQ_INDEX, QUEUE_SIZE + 5);
        // 4. Indirect tables: nested, of a length that is not a multiple of
        //    16, outside guest memory, empty, and one of 4096 one-byte
        //    descriptors that loops back on itself.
        for i in 0..4096u16 {
            let d = virtio_queue::desc::RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(hdr_at, 1, NEXT, (i + 1) % 4096));
            g.mem.write_obj(d, GuestAddress(table + 16 * u64::from(i))).expect("indirect");
        }
        let nested = 0x32_0000u64;
        let d = virtio_queue::desc::RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(table, 64, INDIRECT, 0));
        g.mem.write_obj(d, GuestAddress(nested)).expect("nested");
        for (i, (addr, len)) in [(nested, 16u32), (table, 20), (0xff_0000_0000, 64), (table, 0), (table, 16 * 4096)].into_iter().enumerate()
        {
            let idx = base + 10 + i as u16;
            raw_chain(&mut g, TXQ_INDEX, &[(idx, addr, len, INDIRECT, 0)], idx);
        }
        // 5. Header in a descriptor marked both writable and indirect.
        raw_chain(&mut g, TXQ_INDEX, &[(base + 20, hdr_at, 44, WRITE | INDIRECT, 0)], base + 20);
        // Then a good packet.
        g.send(guest_hdr(OP_REQUEST, 1, 2), b"");
        let before = std::time::Instant::now();
        w.process_tx();
        assert!(!w.broken);
        assert_eq!(w.backend.tx_pkts.last().map(|p| p.hdr.op), Some(OP_REQUEST));
        // Every chain but the out-of-range head went back to the guest.
        assert_eq!(g.take_used(TXQ_INDEX).len(), 9);
        assert!(before.elapsed() < std::time::Duration::from_secs(30), "bounded work");

        // A cycle through every descriptor of the table: longer than the
        // queue, so the walk stops after a queue size of descriptors.
        let (mut g, mut w, _irq) = worker();
        for i in 0..QUEUE_SIZE {
            raw_chain_desc(&mut g, TXQ_INDEX, i, hdr_at, 1, NEXT, (i + 1) % QUEUE_SIZE);
        }
        g.publish_head(TXQ_INDEX, 0);
        w.process_tx();
        assert_eq!(g.take_used(TXQ_INDEX).len(), 1);
        assert!(!w.broken);
        g.send(guest_hdr(OP_REQUEST, 1, 2), b"");
        w.process_tx();
        assert_eq!(w.backend.tx_pkts.last().map(|p| p.hdr.op), Some(OP_REQUEST));
    }

    fn raw_chain_desc(g: &mut TestGuest, qi: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        g.mem.write_obj(d, g.desc_addr(qi, idx)).expect("desc");
    }

    /// An available index more than a queue size ahead is a corrupt queue:
    /// the worker stops touching it (no endless re-reading) and marks the
    /// device DEVICE_NEEDS_RESET; the same for rx.
    #[test]
    fn corrupt_avail_index_breaks_the_device() {
        let (mut g, mut w, irq) = worker();
        g.send(guest_hdr(OP_RW, 1, 2), b"ok");
        g.corrupt_avail_idx(TXQ_INDEX, QUEUE_SIZE + 1);
        let start = std::time::Instant::now();
        assert!(!w.process_tx());
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "no spinning");
        assert!(w.broken);
        assert!(irq.needs_reset());
        assert_eq!(irq.status() & crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG, crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG);
        assert!(w.backend.tx_pkts.is_empty());
        // Nothing is processed any more, on any queue.
        w.backend.rx_pkts.push_back(VsockPacket::default());
        g.post_rx(1, 4096);
        assert!(!w.process_rx());
        assert_eq!(w.backend.rx_pkts.len(), 1);

        let (mut g, mut w, irq) = worker();
        w.backend.rx_pkts.push_back(VsockPacket::default());
        g.post_rx(1, 4096);
        g.corrupt_avail_idx(RXQ_INDEX, QUEUE_SIZE + 1);
        assert!(!w.process_rx());
        assert!(w.broken && irq.needs_reset());
    }

    /// The worker thread of a broken device parks until the reset, which
    /// gives the backend back (reset) and lets the driver start over.
    #[test]
    fn broken_device_waits_for_reset() {
        let mut d = Vsock::with_backend(3, TestBackend::default());
        let (mut g, queues) = TestGuest::new();
        let irq = irq();
        d.activate(g.mem.clone(), irq.clone(), queues).expect("activate");
        g.corrupt_avail_idx(TXQ_INDEX, QUEUE_SIZE + 7);
        g.kick(TXQ_INDEX);
        wait_for("needs reset", || irq.needs_reset().then_some(()));
        assert!(d.is_active());
        assert!(d.reset());
        assert_eq!(d.backend().expect("backend").resets, 2, "reset by the worker, then by the device");
        irq.clear_needs_reset();
        let (mut g, queues) = TestGuest::new();
        d.activate(g.mem.clone(), irq.clone(), queues).expect("re-activate");
        g.send(guest_hdr(OP_REQUEST, 5, 6), b"");
        wait_for("tx used", || (g.tx_in_flight() == 0).then_some(()));
        assert!(!irq.needs_reset());
    }

    /// Packets the guest queued but the worker had not seen yet (no kick,
    /// or a kick in the same wake-up as the stop) reach the backend before
    /// the worker stops: a reply sent just before the guest shuts down is
    /// not lost.
    #[test]
    fn stopping_worker_drains_tx() {
        let mut d = Vsock::with_backend(3, TestBackend::default());
        let (mut g, queues) = TestGuest::new();
        d.activate(g.mem.clone(), irq(), queues).expect("activate");
        // The worker is in its loop once this one is used.
        g.send(guest_hdr(OP_REQUEST, 5, 6), b"");
        wait_for("tx used", || (g.tx_in_flight() == 0).then_some(()));
        let mut h = guest_hdr(OP_RW, 5, 6);
        h.len = 4;
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(b"last");
        g.queue_tx_raw(&bytes, &[], None);
        assert!(d.reset());
        let b = d.backend().expect("backend back");
        assert_eq!(b.tx_pkts.iter().map(|p| &p.data[..]).collect::<Vec<_>>(), vec![&b""[..], b"last"]);
    }

    #[test]
    fn worker_thread_activation_and_reset() {
        let mut d = Vsock::with_backend(3, TestBackend::default());
        let (mut g, queues) = TestGuest::new();
        let irq = irq();
        // Wrong queue count.
        let (_, mut two) = TestGuest::new();
        two.truncate(2);
        assert!(matches!(d.activate(g.mem.clone(), irq.clone(), two), Err(ActivateError::QueueCount { expected: 3, got: 2 })));
        assert!(!d.is_active());

        d.activate(g.mem.clone(), irq.clone(), queues).expect("activate");
        assert!(d.is_active());
        assert!(d.backend().is_none());
        g.send(guest_hdr(OP_REQUEST, 5, 6), b"");
        wait_for("tx used", || (g.tx_in_flight() == 0).then_some(()));
        assert!(d.reset());
        assert!(!d.is_active());
        let b = d.backend().expect("backend back");
        assert_eq!(b.tx_pkts.len(), 1);
        assert_eq!(b.resets, 1);

        // Activate again on fresh queues; host events reach the backend.
        let (mut g, queues) = TestGuest::new();
        d.activate(g.mem.clone(), irq, queues).expect("re-activate");
        g.post_rx(4, 4096);
        g.send(guest_hdr(OP_RW, 5, 6), b"x");
        wait_for("tx used", || (g.tx_in_flight() == 0).then_some(()));
        drop(d);
    }

    #[test]
    fn unix_device_binds_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vsock.sock");
        let d = Vsock::new(3, path.clone()).expect("vsock");
        assert!(path.exists());
        assert!(matches!(Vsock::new(4, path.clone()), Err(VsockError::AddrInUse(_))));
        let (g, queues) = TestGuest::new();
        let mut d = d;
        d.activate(g.mem.clone(), irq(), queues).expect("activate");
        drop(d);
        assert!(!path.exists());
        assert!(std::os::unix::net::UnixStream::connect(&path).is_err());
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn transport_reset_event_waits_for_an_event_buffer() {
        let (mut g, mut w, irq) = worker();
        // No event buffer yet: not sent, retried later.
        assert!(!w.process_evq());
        let buf = GuestAddress(0x300_0000);
        g.mem.write_obj(0xffff_ffffu32, buf).unwrap();
        let head = g.add_chain(EVQ_INDEX, &[(buf, 8, true)]);
        assert!(w.process_evq());
        assert_eq!(g.take_used(EVQ_INDEX), [(head, 4)]);
        assert_eq!(g.mem.read_obj::<u32>(buf).unwrap(), VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
        assert_ne!(irq.status() & crate::devices::virtio::VIRTIO_MMIO_INT_VRING, 0);
    }
}
