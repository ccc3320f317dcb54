//! Test fixtures for the vsock device: a recording [`TestBackend`] and a
//! [`TestGuest`] that plays the guest driver on the three queues, laid out
//! in a `GuestMemoryMmap`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::collections::{HashMap, VecDeque};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::defs::*;
use super::packet::{VsockHeader, VsockPacket};
use super::VsockBackend;
use crate::devices::virtio::ActiveQueue;

/// The guest CID the fixtures use.
pub const TEST_GUEST_CID: u64 = 3;

/// A backend that records what the guest sends and delivers canned packets.
#[derive(Debug)]
pub struct TestBackend {
    /// Well-formed packets from the guest.
    pub tx_pkts: Vec<VsockPacket>,
    /// Headers of malformed packets from the guest.
    pub bad_hdrs: Vec<VsockHeader>,
    /// Packets to hand the guest, in order.
    pub rx_pkts: VecDeque<VsockPacket>,
    /// The `max_data` of each `recv_pkt` call.
    pub max_data_seen: Vec<usize>,
    /// Signalled to make the worker call `process_host_events`.
    pub evfd: EventFd,
    /// How many times `process_host_events` ran.
    pub host_events: usize,
    /// How many times `reset` ran.
    pub resets: usize,
}

impl Default for TestBackend {
    fn default() -> Self {
        TestBackend {
            tx_pkts: Vec::new(),
            bad_hdrs: Vec::new(),
            rx_pkts: VecDeque::new(),
            max_data_seen: Vec::new(),
            evfd: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            host_events: 0,
            resets: 0,
        }
    }
}

impl VsockBackend for TestBackend {
    fn send_pkt(&mut self, pkt: &VsockPacket) {
        self.tx_pkts.push(pkt.clone());
    }
    fn bad_pkt(&mut self, hdr: &VsockHeader) {
        self.bad_hdrs.push(*hdr);
    }
    fn recv_pkt(&mut self, pkt: &mut VsockPacket, max_data: usize) -> bool {
        self.max_data_seen.push(max_data);
        match self.rx_pkts.pop_front() {
            Some(mut p) => {
                p.data.truncate(max_data);
                p.hdr.len = p.data.len() as u32;
                *pkt = p;
                true
            }
            None => false,
        }
    }
    fn has_pending_rx(&self) -> bool {
        !self.rx_pkts.is_empty()
    }
    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.evfd.as_raw_fd())
    }
    fn process_host_events(&mut self) {
        let _ = self.evfd.read();
        self.host_events += 1;
    }
    fn next_timeout(&self) -> Option<Instant> {
        None
    }
    fn process_timeouts(&mut self, _now: Instant) {}
    fn reset(&mut self) {
        self.resets += 1;
        self.rx_pkts.clear();
    }
}

/// A header from the guest (`src_cid` = [`TEST_GUEST_CID`]).
pub fn guest_hdr(op: u16, guest_port: u32, host_port: u32) -> VsockHeader {
    VsockHeader {
        src_cid: TEST_GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

/// Polls `f` until it returns `Some`, failing the test after a generous
/// deadline (a hang guard, not a speed check).
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The driver's view of one split queue.
#[derive(Debug)]
pub struct GuestQueue {
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    /// The QueueNotify eventfd.
    pub notify: EventFd,
}

const QUEUE_BASES: [u64; 3] = [0x0, 0x1_0000, 0x2_0000];
const TX_AREA: (u64, u64) = (0x10_0000, 0x110_0000);
const RX_AREA: u64 = 0x120_0000;
const RX_SLOT: u64 = 0x1_1000;
const MEM_SIZE: usize = 0x400_0000;

/// A guest driver for the vsock queues.
#[derive(Debug)]
pub struct TestGuest {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// rx, tx, event.
    pub queues: Vec<GuestQueue>,
    tx_next: u64,
    rx_bufs: HashMap<u16, Vec<(GuestAddress, u32)>>,
}

impl TestGuest {
    /// Lays out the three queues; returns the device's side of them.
    pub fn new() -> (TestGuest, Vec<ActiveQueue>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
        let mut queues = Vec::new();
        let mut active = Vec::new();
        for base in QUEUE_BASES {
            // The layout of a split queue, as a driver would set it up.
            // (`virtio_queue::mock::MockSplitQueue` places the used ring
            // inside the available ring once more than a few entries are in
            // use, so only its descriptor-table helpers are usable here.)
            let size = u64::from(QUEUE_SIZE);
            let desc = GuestAddress(base);
            let avail = desc.unchecked_add(16 * size);
            let used = GuestAddress((avail.0 + 6 + 2 * size + 3) & !3);
            let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
            queue.set_size(QUEUE_SIZE);
            queue.set_desc_table_address(Some(desc.0 as u32), Some((desc.0 >> 32) as u32));
            queue.set_avail_ring_address(Some(avail.0 as u32), Some((avail.0 >> 32) as u32));
            queue.set_used_ring_address(Some(used.0 as u32), Some((used.0 >> 32) as u32));
            queue.set_ready(true);
            assert!(queue.is_valid(&mem));
            let notify = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            active.push(ActiveQueue { queue, notify: notify.try_clone().expect("clone") });
            queues.push(GuestQueue { size: QUEUE_SIZE, desc, avail, used, next_desc: 0, avail_idx: 0, used_seen: 0, notify });
        }
        (TestGuest { mem, queues, tx_next: TX_AREA.0, rx_bufs: HashMap::new() }, active)
    }

    /// Writes a chain of `(addr, len, device-writable)` buffers and makes it
    /// available; returns its head index. Does not notify.
    pub fn add_chain(&mut self, qi: usize, bufs: &[(GuestAddress, u32, bool)]) -> u16 {
        let q = &mut self.queues[qi];
        let head = q.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % q.size;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let next = (idx + 1) % q.size;
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = RawDescriptor::from(Descriptor::new(addr.0, len, flags, next));
            self.mem.write_obj(d, q.desc.unchecked_add(u64::from(idx) * 16)).expect("desc");
        }
        q.next_desc = (head + bufs.len() as u16) % q.size;
        self.publish(qi, head);
        head
    }

    /// Where descriptor `idx` of queue `qi` lives.
    pub fn desc_addr(&self, qi: usize, idx: u16) -> GuestAddress {
        self.queues[qi].desc.unchecked_add(u64::from(idx) * 16)
    }

    /// Makes the chain at `head` available (descriptors written by hand).
    pub fn publish_head(&mut self, qi: usize, head: u16) {
        self.publish(qi, head);
    }

    /// Moves queue `qi`'s available index `ahead` entries past the device
    /// (more than a queue size is a corrupt queue).
    pub fn corrupt_avail_idx(&mut self, qi: usize, ahead: u16) {
        let q = &mut self.queues[qi];
        q.avail_idx = q.avail_idx.wrapping_add(ahead);
        self.mem.write_obj(q.avail_idx.to_le(), q.avail.unchecked_add(2)).expect("avail idx");
    }

    fn publish(&mut self, qi: usize, head: u16) {
        let q = &mut self.queues[qi];
        let slot = q.avail.unchecked_add(4 + 2 * u64::from(q.avail_idx % q.size));
        self.mem.write_obj(head.to_le(), slot).expect("avail ring");
        fence(Ordering::SeqCst);
        q.avail_idx = q.avail_idx.wrapping_add(1);
        self.mem.write_obj(q.avail_idx.to_le(), q.avail.unchecked_add(2)).expect("avail idx");
        fence(Ordering::SeqCst);
    }

    /// Kicks queue `qi`.
    pub fn kick(&self, qi: usize) {
        self.queues[qi].notify.write(1).expect("kick");
    }

    fn used_idx(&self, qi: usize) -> u16 {
        let q = &self.queues[qi];
        fence(Ordering::SeqCst);
        u16::from_le(self.mem.read_obj(q.used.unchecked_add(2)).expect("used idx"))
    }

    /// New used-ring entries (id, len) of queue `qi` since the last call.
    pub fn take_used(&mut self, qi: usize) -> Vec<(u16, u32)> {
        let end = self.used_idx(qi);
        let q = &mut self.queues[qi];
        let mut out = Vec::new();
        while q.used_seen != end {
            let at = q.used.unchecked_add(4 + 8 * u64::from(q.used_seen % q.size));
            let id: u32 = u32::from_le(self.mem.read_obj(at).expect("used id"));
            let len: u32 = u32::from_le(self.mem.read_obj(at.unchecked_add(4)).expect("used len"));
            out.push((id as u16, len));
            q.used_seen = q.used_seen.wrapping_add(1);
        }
        out
    }

    /// The device's `avail_event` (EVENT_IDX): kick when avail idx passes it.
    pub fn avail_event(&self, qi: usize) -> u16 {
        let q = &self.queues[qi];
        let at = q.used.unchecked_add(4 + 8 * u64::from(q.size));
        u16::from_le(self.mem.read_obj(at).expect("avail_event"))
    }

    /// Sets the driver's `used_event` (EVENT_IDX): interrupt when used idx passes it.
    pub fn set_used_event(&self, qi: usize, v: u16) {
        let q = &self.queues[qi];
        let at = q.avail.unchecked_add(4 + 2 * u64::from(q.size));
        self.mem.write_obj(v.to_le(), at).expect("used_event");
    }

    /// tx chains the device has not returned yet.
    pub fn tx_in_flight(&self) -> u16 {
        self.queues[TXQ_INDEX].avail_idx.wrapping_sub(self.used_idx(TXQ_INDEX))
    }

    fn alloc_tx(&mut self, len: u64) -> GuestAddress {
        if self.tx_next + len > TX_AREA.1 {
            self.tx_next = TX_AREA.0;
        }
        let a = GuestAddress(self.tx_next);
        self.tx_next = (self.tx_next + len + 15) & !15;
        a
    }

    /// Queues `bytes` on tx cut into descriptors at `cuts` (offsets into
    /// `bytes`); descriptor `write_only` (if any) is marked device-writable.
    /// Does not kick.
    pub fn queue_tx_raw(&mut self, bytes: &[u8], cuts: &[usize], write_only: Option<usize>) -> u16 {
        // Keep well clear of reusing descriptors the device still holds.
        while self.tx_in_flight() > QUEUE_SIZE / 4 {
            self.kick(TXQ_INDEX);
            std::thread::sleep(Duration::from_millis(1));
        }
        let addr = self.alloc_tx(bytes.len() as u64);
        self.mem.write_slice(bytes, addr).expect("tx data");
        let mut bounds = vec![0usize];
        bounds.extend(cuts.iter().copied().filter(|&c| c > 0 && c < bytes.len()));
        bounds.push(bytes.len());
        let bufs: Vec<_> = bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| (addr.unchecked_add(w[0] as u64), (w[1] - w[0]) as u32, write_only == Some(i)))
            .collect();
        self.add_chain(TXQ_INDEX, &bufs)
    }

    /// Sends a packet in one descriptor and kicks tx.
    pub fn send(&mut self, mut hdr: VsockHeader, data: &[u8]) {
        hdr.len = data.len() as u32;
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(data);
        self.queue_tx_raw(&bytes, &[], None);
        self.kick(TXQ_INDEX);
    }

    /// Sends a packet with the header and the data in separate descriptors.
    pub fn send_split(&mut self, mut hdr: VsockHeader, data: &[u8]) {
        hdr.len = data.len() as u32;
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(data);
        self.queue_tx_raw(&bytes, &[PKT_HDR_SIZE], None);
        self.kick(TXQ_INDEX);
    }

    /// Makes `n` rx buffers of `len` bytes (one descriptor each) available.
    pub fn post_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let idx = self.queues[RXQ_INDEX].next_desc;
            let addr = GuestAddress(RX_AREA + u64::from(idx) * RX_SLOT);
            assert!(u64::from(len) <= RX_SLOT);
            let head = self.add_chain(RXQ_INDEX, &[(addr, len, true)]);
            self.rx_bufs.insert(head, vec![(addr, len)]);
        }
        self.kick(RXQ_INDEX);
    }

    /// Makes one rx chain of arbitrary buffers available (for malformed cases).
    pub fn post_rx_chain(&mut self, bufs: &[(u32, bool)]) -> u16 {
        let idx = self.queues[RXQ_INDEX].next_desc;
        let base = RX_AREA + u64::from(idx) * RX_SLOT;
        let mut off = 0u64;
        let mut chain = Vec::new();
        for &(len, write) in bufs {
            chain.push((GuestAddress(base + off), len, write));
            off += u64::from(len);
        }
        let head = self.add_chain(RXQ_INDEX, &chain);
        self.rx_bufs.insert(head, chain.iter().map(|&(a, l, _)| (a, l)).collect());
        self.kick(RXQ_INDEX);
        head
    }

    /// Reads the packets the device put in rx buffers since the last call,
    /// and gives each buffer back to the device (if `repost`).
    pub fn recv(&mut self, repost: bool) -> Vec<VsockPacket> {
        let used = self.take_used(RXQ_INDEX);
        let mut out = Vec::new();
        for (id, len) in used {
            let bufs = self.rx_bufs.remove(&id).expect("rx buffer we posted");
            let mut bytes = Vec::new();
            for &(a, l) in &bufs {
                let mut b = vec![0u8; l as usize];
                self.mem.read_slice(&mut b, a).expect("rx data");
                bytes.extend_from_slice(&b);
            }
            bytes.truncate(len as usize);
            if bytes.len() >= PKT_HDR_SIZE {
                let hdr = VsockHeader::from_bytes(bytes[..PKT_HDR_SIZE].try_into().expect("44 bytes"));
                let data = bytes[PKT_HDR_SIZE..].to_vec();
                assert_eq!(hdr.len as usize, data.len(), "rx used length matches the header");
                out.push(VsockPacket { hdr, data });
            }
            if repost {
                let single = bufs.len() == 1;
                if single {
                    let (addr, l) = bufs[0];
                    // Repost in place (same descriptor index).
                    let q = &self.queues[RXQ_INDEX];
                    let d = RawDescriptor::from(Descriptor::new(addr.0, l, VRING_DESC_F_WRITE as u16, 0));
                    self.mem.write_obj(d, q.desc.unchecked_add(u64::from(id) * 16)).expect("desc");
                    self.publish(RXQ_INDEX, id);
                    self.rx_bufs.insert(id, bufs);
                }
            }
        }
        if repost {
            self.kick(RXQ_INDEX);
        }
        out
    }
}
