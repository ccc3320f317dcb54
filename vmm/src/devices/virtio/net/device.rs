//! The virtio-net device: config space, features, and moving frames between
//! the rx/tx queues and the backend.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{error, info};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::defs::*;
use super::metrics::NetMetrics;
use super::tap::Tap;
use super::{MacAddr, NetBackend, NetConfig, NetConfigError, NetError, Offloads, TxFrame};
use crate::devices::virtio::{ActivateError, ActiveQueue, Interrupt, VirtioDevice};

/// The most spans a frame may be gathered from (Linux `IOV_MAX`, the
/// header's own included): more and `writev` would refuse it.
const MAX_TX_IOVECS: usize = 1024;

const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];

/// `virtio_net_hdr.flags`: the frame's checksum is partial (csum_start/offset).
const HDR_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.flags`: the frame's checksum was verified.
const HDR_F_DATA_VALID: u8 = 2;
/// `virtio_net_hdr.gso_type` values.
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;

fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// What the guest may put in its tx headers, after the feature
/// dependencies of virtio 1.2 5.1.3.1 (segmentation needs checksum offload).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TxOffloads {
    csum: bool,
    tso4: bool,
    tso6: bool,
}

fn offloads(features: u64) -> (TxOffloads, Offloads) {
    let csum = has(features, VIRTIO_NET_F_CSUM);
    let guest_csum = has(features, VIRTIO_NET_F_GUEST_CSUM);
    (
        TxOffloads { csum, tso4: csum && has(features, VIRTIO_NET_F_HOST_TSO4), tso6: csum && has(features, VIRTIO_NET_F_HOST_TSO6) },
        Offloads {
            csum: guest_csum,
            tso4: guest_csum && has(features, VIRTIO_NET_F_GUEST_TSO4),
            tso6: guest_csum && has(features, VIRTIO_NET_F_GUEST_TSO6),
        },
    )
}

/// The virtio-net device, generic over its host backend.
#[derive(Debug)]
pub struct Net<B: NetBackend + 'static = Tap> {
    mac: MacAddr,
    mtu: u16,
    avail_features: u64,
    acked_features: u64,
    /// The backend while the device is not running (the worker owns it otherwise).
    backend: Option<B>,
    worker: Option<Worker<B>>,
    metrics: Arc<NetMetrics>,
}

#[derive(Debug)]
struct Worker<B> {
    kill: EventFd,
    handle: JoinHandle<(B, Vec<ActiveQueue>)>,
}

impl Net<Tap> {
    /// A net device for `config`: opens (or checks and duplicates) its tap.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        config.validate()?;
        let tap = Tap::open(&config.tap)?;
        Self::with_backend(config.mac, config.mtu, tap)
    }
}

impl<B: NetBackend + 'static> Net<B> {
    /// A net device over any backend.
    pub fn with_backend(mac: MacAddr, mtu: u32, backend: B) -> Result<Self, NetError> {
        if !mac.is_unicast() {
            return Err(NetConfigError::MacNotUnicast(mac).into());
        }
        let mtu = u16::try_from(mtu).ok().filter(|m| u32::from(*m) >= MIN_MTU).ok_or(NetConfigError::BadMtu(mtu))?;
        Ok(Net {
            mac,
            mtu,
            avail_features: (1u64 << VIRTIO_F_VERSION_1)
                | (1u64 << VIRTIO_RING_F_EVENT_IDX)
                | (1u64 << VIRTIO_NET_F_MAC)
                | (1u64 << VIRTIO_NET_F_MTU)
                | (1u64 << VIRTIO_NET_F_STATUS)
                | (1u64 << VIRTIO_NET_F_CSUM)
                | (1u64 << VIRTIO_NET_F_HOST_TSO4)
                | (1u64 << VIRTIO_NET_F_HOST_TSO6)
                | (1u64 << VIRTIO_NET_F_GUEST_CSUM)
                | (1u64 << VIRTIO_NET_F_GUEST_TSO4)
                | (1u64 << VIRTIO_NET_F_GUEST_TSO6),
            acked_features: 0,
            backend: Some(backend),
            worker: None,
            metrics: Arc::default(),
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> &Arc<NetMetrics> {
        &self.metrics
    }

    /// The backend, while the device is not running.
    pub fn backend(&self) -> Option<&B> {
        self.backend.as_ref()
    }

    /// Whether the worker thread is running.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// The feature bits the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        c[0..6].copy_from_slice(&self.mac.0);
        // The link is up as long as the device exists: the tap's carrier is
        // the host's business.
        #[allow(clippy::cast_possible_truncation)]
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        // max_virtqueue_pairs (meaningful only with MQ, which is not offered).
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    /// Stops the worker and takes the backend back.
    /// Stops the worker and takes the backend back; returns its queues.
    fn stop_worker(&mut self) -> Option<Vec<virtio_queue::Queue>> {
        if let Some(w) = self.worker.take() {
            if let Err(e) = w.kill.write(1) {
                error!("net: cannot signal the worker to stop: {e}");
            }
            match w.handle.join() {
                Ok((b, queues)) => {
                    self.backend = Some(b);
                    return Some(queues.into_iter().map(|q| q.queue).collect());
                }
                Err(_) => error!("net: worker thread panicked"),
            }
        }
        None
    }
}

impl<B: NetBackend + 'static> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
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
        crate::devices::virtio::read_config_space("net", &self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR-less legacy
        // drivers; a VERSION_1 device's config space is read-only.
        crate::guest_warn!(offset, "net: guest wrote the read-only config space");
    }

    fn activate(&mut self, mem: GuestMemoryMmap, interrupt: Arc<Interrupt>, queues: Vec<ActiveQueue>) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount { expected: QUEUE_SIZES.len(), got: queues.len() });
        }
        if self.worker.is_some() {
            return Err(ActivateError::BadConfig("net device already active".into()));
        }
        let Some(backend) = self.backend.take() else {
            return Err(ActivateError::BadConfig("net backend lost".into()));
        };
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let worker_kill = match kill.try_clone() {
            Ok(k) => k,
            Err(e) => {
                self.backend = Some(backend);
                return Err(e.into());
            }
        };
        let worker = NetWorker::new(mem, interrupt, queues, backend, self.metrics.clone(), self.acked_features);
        tracing::debug!(features = format_args!("{:#x}", self.acked_features), "net: activating");
        let handle = crate::seccomp::spawn(crate::seccomp::ThreadKind::Net, "net".into(), move || worker.run(worker_kill))?;
        self.worker = Some(Worker { kill, handle });
        Ok(())
    }

    fn quiesce(&mut self) -> Result<Option<Vec<virtio_queue::Queue>>, String> {
        Ok(self.stop_worker())
    }

    fn reset(&mut self) -> bool {
        let _ = self.stop_worker();
        if self.backend.is_some() {
            self.acked_features = 0;
            true
        } else {
            false
        }
    }
}

impl<B: NetBackend + 'static> Drop for Net<B> {
    fn drop(&mut self) {
        let _ = self.stop_worker();
    }
}

/// What [`NetWorker::process_rx`] stopped on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RxState {
    /// The backend has nothing more: wait for it to become readable.
    WaitBackend,
    /// The guest has no buffer (or the backend failed): stop reading the
    /// backend until the guest kicks the rx queue.
    WaitGuest,
}

/// What [`NetWorker::process_tx`] stopped on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxState {
    /// Every queued frame was handled: wait for a kick.
    Done,
    /// The backend could not take a frame: wait for it to become writable.
    Blocked,
}

/// Spans of one tx frame between the chain walk and the write.
///
/// The pointers are only ever dereferenced (by the kernel, in `writev`)
/// while the frame they were built for is being written; between frames
/// the vector is cleared.
#[derive(Debug, Default)]
struct IovecBuf(Vec<libc::iovec>);

// SAFETY: the iovecs are plain addresses into guest memory (kept alive by
// the worker's `mem`) or into the worker's own header buffer; they are
// written and read only by the thread that owns the worker.
unsafe impl Send for IovecBuf {}

/// Why a tx chain was dropped.
#[derive(Debug, thiserror::Error)]
enum BadTx {
    #[error("device-writable descriptor in a tx chain")]
    Writable,
    #[error("tx chain of at least {0} bytes is longer than a frame may be")]
    TooLong(usize),
    #[error("tx chain of {0} bytes is shorter than a virtio-net header and an Ethernet header")]
    TooShort(usize),
    #[error("tx chain is gathered from more than {MAX_TX_IOVECS} pieces")]
    TooManyPieces,
    #[error("tx descriptor outside guest memory: {0}")]
    Memory(vm_memory::GuestMemoryError),
    #[error("tx descriptor address overflows")]
    Overflow,
    #[error("tx header asks for segmentation the driver did not negotiate (gso_type {0:#x})")]
    Gso(u8),
    #[error("tx header asks for segmentation into segments of 0 bytes")]
    GsoSizeZero,
}

// A leaf, logged with `{e}` as it drops a chain: the cause is in its message.
impl From<vm_memory::GuestMemoryError> for BadTx {
    fn from(e: vm_memory::GuestMemoryError) -> Self {
        Self::Memory(e)
    }
}

/// Why an rx chain was given back empty.
#[derive(Debug, thiserror::Error)]
enum BadRx {
    #[error("device-readable descriptor in an rx chain")]
    Readable,
    #[error("rx descriptor outside guest memory")]
    Memory,
    #[error("rx chain of {0} bytes cannot hold any frame")]
    TooSmall(u64),
}

/// What the worker thread owns: memory, queues, interrupt and backend.
#[derive(Debug)]
pub(crate) struct NetWorker<B> {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) interrupt: Arc<Interrupt>,
    pub(crate) queues: Vec<ActiveQueue>,
    pub(crate) backend: B,
    pub(crate) metrics: Arc<NetMetrics>,
    /// One host frame, read before it is copied into the guest's buffer.
    rx_frame: Vec<u8>,
    /// The writable spans of the rx chain being filled.
    rx_spans: Vec<(GuestAddress, usize)>,
    tx_iovecs: IovecBuf,
    tx_spans: Vec<(GuestAddress, usize)>,
    /// The header written before every tx frame: the guest's, checked,
    /// or all zeros when no tx offload was negotiated (the guest's header
    /// then means nothing and is not passed on to the host kernel).
    tx_hdr: Box<[u8; VNET_HDR_LEN]>,
    tx_offloads: TxOffloads,
    pub(crate) rx_offloads: Offloads,
    /// A queue was found corrupt: the device stopped (DEVICE_NEEDS_RESET).
    pub(crate) broken: bool,
}

impl<B: NetBackend> NetWorker<B> {
    pub(crate) fn new(
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
        backend: B,
        metrics: Arc<NetMetrics>,
        features: u64,
    ) -> Self {
        let (tx_offloads, rx_offloads) = offloads(features);
        NetWorker {
            mem,
            interrupt,
            queues,
            backend,
            metrics,
            rx_frame: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            rx_spans: Vec::new(),
            tx_iovecs: IovecBuf::default(),
            tx_spans: Vec::new(),
            tx_hdr: Box::new([0; VNET_HDR_LEN]),
            tx_offloads,
            rx_offloads,
            broken: false,
        }
    }

    /// A queue is unusable (corrupt available index, unreadable rings):
    /// nothing on it can be trusted any more, so the device stops and asks
    /// for a reset instead of re-reading it forever.
    fn queue_broken(&mut self, index: usize, e: &virtio_queue::Error) {
        NetMetrics::inc(&self.metrics.queue_errors);
        if !self.broken {
            error!(queue = index, "net: virtqueue unusable ({e}); the device needs a reset");
            self.broken = true;
            self.interrupt.set_needs_reset();
        }
    }

    fn signal_used(&mut self, index: usize) {
        self.interrupt.signal_used("net", &mut self.queues[index].queue, &self.mem);
    }

    /// Sends every frame the guest queued on tx, until the queue is empty
    /// or the backend cannot take more.
    pub(crate) fn process_tx(&mut self) -> TxState {
        let mut used_any = false;
        let mut state = TxState::Done;
        'outer: loop {
            if self.broken {
                break;
            }
            if let Err(e) = self.queues[TXQ_INDEX].queue.disable_notification(&self.mem) {
                self.queue_broken(TXQ_INDEX, &e);
                break;
            }
            loop {
                let chain = match self.queues[TXQ_INDEX].queue.iter(&self.mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        self.queue_broken(TXQ_INDEX, &e);
                        break 'outer;
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let mut guest_hdr = [0u8; VNET_HDR_LEN];
                let built =
                    gather_tx(&self.mem, chain, &self.tx_hdr, &mut guest_hdr, &mut self.tx_iovecs.0, &mut self.tx_spans).and_then(|len| {
                        *self.tx_hdr = tx_header(&guest_hdr, self.tx_offloads)?;
                        Ok(len)
                    });
                match built {
                    Ok(len) => {
                        let frame = TxFrame { mem: &self.mem, iovecs: &self.tx_iovecs.0, spans: &self.tx_spans, hdr: &self.tx_hdr, len };
                        let written = self.backend.write_frame(&frame);
                        self.tx_iovecs.0.clear();
                        match written {
                            Ok(_) => {
                                NetMetrics::inc(&self.metrics.tx_frames);
                                NetMetrics::add(&self.metrics.tx_bytes, len - VNET_HDR_LEN);
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                // Keep the chain: it is sent when the backend drains.
                                NetMetrics::inc(&self.metrics.tx_blocked);
                                self.queues[TXQ_INDEX].queue.go_to_previous_position();
                                state = TxState::Blocked;
                                break 'outer;
                            }
                            Err(e) => {
                                // Lost like on a wire (the tap is down, or
                                // the host refused the frame).
                                NetMetrics::inc(&self.metrics.tx_errors);
                                crate::guest_warn!(len, "net: tap refused a tx frame: {e}");
                            }
                        }
                    }
                    Err(e) => {
                        self.tx_iovecs.0.clear();
                        NetMetrics::inc(&self.metrics.tx_malformed);
                        crate::guest_warn!("net: dropping tx chain: {e}");
                    }
                }
                if let Err(e) = self.queues[TXQ_INDEX].queue.add_used(&self.mem, head, 0) {
                    NetMetrics::inc(&self.metrics.queue_errors);
                    crate::guest_warn!("net: tx add_used: {e}");
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
        state
    }

    /// Moves host frames into the guest's rx buffers while both last.
    pub(crate) fn process_rx(&mut self) -> RxState {
        let mut used_any = false;
        let mut state = RxState::WaitGuest;
        'outer: loop {
            if self.broken {
                break;
            }
            // While frames flow, the backend's readiness drives us and the
            // guest's kicks would be wasted exits.
            if let Err(e) = self.queues[RXQ_INDEX].queue.disable_notification(&self.mem) {
                self.queue_broken(RXQ_INDEX, &e);
                break;
            }
            loop {
                let chain = match self.queues[RXQ_INDEX].queue.iter(&self.mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        self.queue_broken(RXQ_INDEX, &e);
                        break 'outer;
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                // The buffer is checked before a frame is read for it, so
                // that a bad buffer never costs a frame.
                let capacity = match rx_capacity(&self.mem, chain, &mut self.rx_spans) {
                    Ok(c) => c,
                    Err(e) => {
                        NetMetrics::inc(&self.metrics.rx_bad_buffers);
                        crate::guest_warn!("net: returning unusable rx buffer: {e}");
                        self.add_used_rx(head, 0);
                        used_any = true;
                        continue;
                    }
                };
                let n = match self.backend.read_frame(&mut self.rx_frame) {
                    Ok(n) => n,
                    Err(e) => {
                        self.queues[RXQ_INDEX].queue.go_to_previous_position();
                        if e.kind() == io::ErrorKind::WouldBlock {
                            state = RxState::WaitBackend;
                        } else {
                            // Polling a failing tap would spin: try again
                            // when the guest next adds a buffer.
                            NetMetrics::inc(&self.metrics.rx_errors);
                            error!("net: reading the tap failed: {e}");
                            state = RxState::WaitGuest;
                            self.enable_rx_kicks();
                        }
                        break 'outer;
                    }
                };
                match self.deliver(n, capacity) {
                    Some(used) => {
                        self.add_used_rx(head, used);
                        used_any = true;
                    }
                    // The frame is gone; the buffer waits for the next one.
                    None => self.queues[RXQ_INDEX].queue.go_to_previous_position(),
                }
            }
            // Out of guest buffers: stop reading until the guest adds some.
            match self.queues[RXQ_INDEX].queue.enable_notification(&self.mem) {
                Ok(true) => continue,
                Ok(false) => {
                    NetMetrics::inc(&self.metrics.rx_starved);
                    break;
                }
                Err(e) => {
                    self.queue_broken(RXQ_INDEX, &e);
                    break;
                }
            }
        }
        if used_any {
            self.signal_used(RXQ_INDEX);
        }
        state
    }

    fn enable_rx_kicks(&mut self) {
        if let Err(e) = self.queues[RXQ_INDEX].queue.enable_notification(&self.mem) {
            self.queue_broken(RXQ_INDEX, &e);
        }
    }

    fn add_used_rx(&mut self, head: u16, len: u32) {
        if let Err(e) = self.queues[RXQ_INDEX].queue.add_used(&self.mem, head, len) {
            NetMetrics::inc(&self.metrics.queue_errors);
            crate::guest_warn!("net: rx add_used: {e}");
        }
    }

    /// Copies the `n`-byte frame just read into the checked rx spans;
    /// returns the used length, or None if the frame was dropped.
    fn deliver(&mut self, n: usize, capacity: u64) -> Option<u32> {
        let Some(frame) = self.rx_frame.get(..n).filter(|f| f.len() >= VNET_HDR_LEN + MIN_FRAME_LEN) else {
            NetMetrics::inc(&self.metrics.rx_dropped);
            crate::guest_warn!(len = n, "net: dropping a runt frame from the tap");
            return None;
        };
        // The tap was told what the guest accepts, so it should never hand
        // over more; if it did, the guest would take a corrupt frame.
        let Some(hdr) = rx_header(&frame[..VNET_HDR_LEN], self.rx_offloads) else {
            NetMetrics::inc(&self.metrics.rx_dropped);
            crate::guest_warn!(flags = frame[0], gso_type = frame[1], "net: dropping an offloaded frame the guest cannot take");
            return None;
        };
        let used = u32::try_from(n).ok().filter(|_| n as u64 <= capacity);
        let Some(used) = used else {
            NetMetrics::inc(&self.metrics.rx_dropped);
            crate::guest_warn!(len = n - VNET_HDR_LEN, capacity, "net: dropping a frame larger than the guest's rx buffer");
            return None;
        };
        let mut src: &[u8] = &hdr;
        let mut rest = &frame[VNET_HDR_LEN..];
        for &(addr, len) in &self.rx_spans {
            let mut off = 0usize;
            while off < len && !(src.is_empty() && rest.is_empty()) {
                if src.is_empty() {
                    src = rest;
                    rest = &[];
                }
                let k = (len - off).min(src.len());
                let at = addr.checked_add(off as u64);
                if at.and_then(|a| self.mem.write_slice(&src[..k], a).ok()).is_none() {
                    // Checked in rx_capacity; only a bug lands here.
                    NetMetrics::inc(&self.metrics.rx_bad_buffers);
                    return Some(0);
                }
                src = &src[k..];
                off += k;
            }
        }
        NetMetrics::inc(&self.metrics.rx_frames);
        NetMetrics::add(&self.metrics.rx_bytes, n - VNET_HDR_LEN);
        Some(used)
    }

    /// Logs the counters (the worker stops).
    pub(crate) fn log_metrics(&self) {
        let m = &self.metrics;
        info!(
            tx_frames = NetMetrics::get(&m.tx_frames),
            tx_malformed = NetMetrics::get(&m.tx_malformed),
            tx_errors = NetMetrics::get(&m.tx_errors),
            rx_frames = NetMetrics::get(&m.rx_frames),
            rx_dropped = NetMetrics::get(&m.rx_dropped),
            rx_bad_buffers = NetMetrics::get(&m.rx_bad_buffers),
            rx_starved = NetMetrics::get(&m.rx_starved),
            "net: worker stopped"
        );
    }
}

/// The header to write before a tx frame whose guest header is `guest`.
fn tx_header(guest: &[u8; VNET_HDR_LEN], allowed: TxOffloads) -> Result<[u8; VNET_HDR_LEN], BadTx> {
    let mut hdr = [0u8; VNET_HDR_LEN];
    if !allowed.csum {
        return Ok(hdr);
    }
    hdr[..10].copy_from_slice(&guest[..10]);
    // NEEDS_CSUM is the only flag a driver sets.
    hdr[0] &= HDR_F_NEEDS_CSUM;
    match guest[1] {
        GSO_NONE => {}
        GSO_TCPV4 if allowed.tso4 => {}
        GSO_TCPV6 if allowed.tso6 => {}
        // UDP, the ECN bit (HOST_ECN is not offered), anything else.
        other => return Err(BadTx::Gso(other)),
    }
    if guest[1] != GSO_NONE && u16::from_le_bytes([guest[4], guest[5]]) == 0 {
        return Err(BadTx::GsoSizeZero);
    }
    Ok(hdr)
}

/// The header the guest gets for a host frame whose tap header is `tap`,
/// or None if the frame needs an offload the guest did not accept.
fn rx_header(tap: &[u8], allowed: Offloads) -> Option<[u8; VNET_HDR_LEN]> {
    let (flags, gso_type) = (tap[0], tap[1]);
    if flags & !(HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID) != 0 || (flags & HDR_F_NEEDS_CSUM != 0 && !allowed.csum) {
        return None;
    }
    match gso_type {
        GSO_NONE => {}
        GSO_TCPV4 if allowed.tso4 => {}
        GSO_TCPV6 if allowed.tso6 => {}
        _ => return None,
    }
    let mut hdr = [0u8; VNET_HDR_LEN];
    // DATA_VALID too is for a driver that negotiated GUEST_CSUM only.
    if allowed.csum {
        hdr[..10].copy_from_slice(&tap[..10]);
    }
    // One buffer per frame (no MRG_RXBUF).
    hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
    Some(hdr)
}

/// Walks a tx chain into `iovecs` (the device's header first, then the
/// frame's bytes after the guest's header), `spans` and `guest_hdr`;
/// returns the frame's length including the header.
fn gather_tx<I: Iterator<Item = Descriptor>>(
    mem: &GuestMemoryMmap,
    chain: I,
    hdr: &[u8; VNET_HDR_LEN],
    guest_hdr: &mut [u8; VNET_HDR_LEN],
    iovecs: &mut Vec<libc::iovec>,
    spans: &mut Vec<(GuestAddress, usize)>,
) -> Result<usize, BadTx> {
    iovecs.clear();
    spans.clear();
    iovecs.push(libc::iovec { iov_base: hdr.as_ptr().cast_mut().cast(), iov_len: VNET_HDR_LEN });
    let mut total = 0usize;
    let mut skip = VNET_HDR_LEN;
    for desc in chain {
        if desc.is_write_only() {
            return Err(BadTx::Writable);
        }
        let len = desc.len() as usize;
        total = total.saturating_add(len);
        if total > VNET_HDR_LEN + MAX_FRAME_LEN {
            return Err(BadTx::TooLong(total));
        }
        let cut = skip.min(len);
        if cut > 0 {
            let at = VNET_HDR_LEN - skip;
            mem.read_slice(&mut guest_hdr[at..at + cut], desc.addr())?;
        }
        skip -= cut;
        let len = len - cut;
        if len == 0 {
            continue;
        }
        let addr = desc.addr().checked_add(cut as u64).ok_or(BadTx::Overflow)?;
        for slice in mem.get_slices(addr, len) {
            let slice = slice?;
            if iovecs.len() == MAX_TX_IOVECS {
                return Err(BadTx::TooManyPieces);
            }
            iovecs.push(libc::iovec { iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(), iov_len: slice.len() });
        }
        spans.push((addr, len));
    }
    if total < VNET_HDR_LEN + MIN_FRAME_LEN {
        return Err(BadTx::TooShort(total));
    }
    Ok(total)
}

/// Checks an rx chain (all device-writable, all inside guest memory) into
/// `spans`; returns its capacity in bytes.
fn rx_capacity<I: Iterator<Item = Descriptor>>(
    mem: &GuestMemoryMmap,
    chain: I,
    spans: &mut Vec<(GuestAddress, usize)>,
) -> Result<u64, BadRx> {
    spans.clear();
    let mut capacity = 0u64;
    for desc in chain {
        if !desc.is_write_only() {
            return Err(BadRx::Readable);
        }
        let len = desc.len() as usize;
        if len == 0 {
            continue;
        }
        if !mem.check_range(desc.addr(), len) {
            return Err(BadRx::Memory);
        }
        capacity += u64::from(desc.len());
        spans.push((desc.addr(), len));
        // Enough for the largest frame: the rest of the chain is not needed.
        if capacity >= (VNET_HDR_LEN + MAX_FRAME_LEN) as u64 {
            break;
        }
    }
    if capacity < (VNET_HDR_LEN + MIN_FRAME_LEN) as u64 {
        return Err(BadRx::TooSmall(capacity));
    }
    Ok(capacity)
}
