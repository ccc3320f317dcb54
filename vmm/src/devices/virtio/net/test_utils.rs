//! Test fixtures for the net device: a [`PairBackend`] whose frames cross a
//! `SOCK_SEQPACKET` socketpair (one message per frame, like a tap, and real
//! `EAGAIN` when the peer stops reading), and a [`TestGuest`] that plays the
//! guest driver on the two queues, laid out in a `GuestMemoryMmap`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::Queue;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::defs::*;
use super::tap::{read_fd, writev_fd};
use super::{NetBackend, Offloads, TxFrame};
use crate::devices::virtio::ActiveQueue;

/// A backend over one end of a seqpacket socketpair; the test holds the
/// other end ([`PairPeer`]).
#[derive(Debug)]
pub struct PairBackend {
    fd: OwnedFd,
    /// When set, every write fails with this errno (a tap that refuses frames).
    pub write_errno: Option<i32>,
    /// Every `set_rx_offloads` call.
    pub offloads: Vec<Offloads>,
}

/// The test's end of a [`PairBackend`]: the "host network".
#[derive(Debug)]
pub struct PairPeer {
    fd: OwnedFd,
}

/// A connected backend and peer, both non-blocking.
pub fn pair() -> (PairBackend, PairPeer) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for the call to fill.
    let rc =
        unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
    // SAFETY: both fds were just created and are owned by nothing else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (PairBackend { fd: a, write_errno: None, offloads: Vec::new() }, PairPeer { fd: b })
}

impl NetBackend for PairBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_fd(self.fd.as_raw_fd(), buf)
    }

    fn write_frame(&mut self, frame: &TxFrame<'_>) -> io::Result<usize> {
        if let Some(e) = self.write_errno {
            return Err(io::Error::from_raw_os_error(e));
        }
        writev_fd(self.fd.as_raw_fd(), frame.iovecs())
    }

    fn poll_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn set_rx_offloads(&mut self, offloads: Offloads) -> io::Result<()> {
        self.offloads.push(offloads);
        Ok(())
    }
}

impl PairPeer {
    /// Sends one frame (header included) towards the guest.
    pub fn send(&self, frame: &[u8]) {
        let iov = [libc::iovec { iov_base: frame.as_ptr().cast_mut().cast(), iov_len: frame.len() }];
        let n = writev_fd(self.fd.as_raw_fd(), &iov).expect("peer send");
        assert_eq!(n, frame.len());
    }

    /// The next frame from the guest, if one arrives within `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN + 1];
        loop {
            match read_fd(self.fd.as_raw_fd(), &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Some(buf);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("peer recv: {e}"),
            }
        }
    }

    /// Every frame already waiting.
    pub fn recv_all(&self) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| self.recv_timeout(Duration::ZERO)).collect()
    }
}

/// A 12-byte zero virtio-net header followed by `frame`.
pub fn with_hdr(frame: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    v.extend_from_slice(frame);
    v
}

/// An Ethernet frame of `len` bytes (>= 14) with a recognizable payload:
/// destination `dst`, source 02:..:01, EtherType 0x88b5 (local
/// experimental), then bytes counting up from `seed`.
pub fn eth_frame(dst: [u8; 6], seed: u8, len: usize) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..len.saturating_sub(14)).map(|i| seed.wrapping_add(i as u8)));
    f
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

const QUEUE_BASES: [u64; 2] = [0x0, 0x1_0000];
const TX_AREA: (u64, u64) = (0x10_0000, 0x110_0000);
const RX_AREA: u64 = 0x120_0000;
/// Room for one rx buffer per descriptor index (a 64 KiB frame and header).
pub const RX_SLOT: u64 = 0x1_1000;
const MEM_SIZE: usize = 0x300_0000;

/// A guest driver for the net queues.
#[derive(Debug)]
pub struct TestGuest {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// rx, tx.
    pub queues: Vec<GuestQueue>,
    tx_next: u64,
    rx_bufs: HashMap<u16, Vec<(GuestAddress, u32)>>,
}

impl TestGuest {
    /// Lays out the two queues; returns the device's side of them.
    pub fn new() -> (TestGuest, Vec<ActiveQueue>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
        let mut queues = Vec::new();
        let mut active = Vec::new();
        for base in QUEUE_BASES {
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

    /// Writes descriptor `idx` of queue `qi` by hand.
    pub fn raw_desc(&mut self, qi: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        let at = self.queues[qi].desc.unchecked_add(u64::from(idx) * 16);
        self.mem.write_obj(d, at).expect("desc");
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

    /// Chains on queue `qi` the device has not returned yet.
    pub fn in_flight(&self, qi: usize) -> u16 {
        self.queues[qi].avail_idx.wrapping_sub(self.used_idx(qi))
    }

    fn alloc_tx(&mut self, len: u64) -> GuestAddress {
        if self.tx_next + len > TX_AREA.1 {
            self.tx_next = TX_AREA.0;
        }
        let a = GuestAddress(self.tx_next);
        self.tx_next = (self.tx_next + len + 15) & !15;
        a
    }

    /// Queues `bytes` (header included) on tx, cut into descriptors at
    /// `cuts` (offsets into `bytes`). Does not kick.
    pub fn queue_tx(&mut self, bytes: &[u8], cuts: &[usize]) -> u16 {
        let addr = self.alloc_tx(bytes.len() as u64);
        self.mem.write_slice(bytes, addr).expect("tx data");
        let mut bounds = vec![0usize];
        bounds.extend(cuts.iter().copied().filter(|&c| c > 0 && c < bytes.len()));
        bounds.push(bytes.len());
        let bufs: Vec<_> = bounds.windows(2).map(|w| (addr.unchecked_add(w[0] as u64), (w[1] - w[0]) as u32, false)).collect();
        self.add_chain(TXQ_INDEX, &bufs)
    }

    /// Sends `frame` behind a header of garbage (the device must not pass
    /// it on) in one descriptor, and kicks tx.
    pub fn send(&mut self, frame: &[u8]) {
        let mut bytes = vec![0xa5u8; VNET_HDR_LEN];
        bytes.extend_from_slice(frame);
        self.queue_tx(&bytes, &[]);
        self.kick(TXQ_INDEX);
    }

    /// Makes `n` rx buffers of `len` bytes (one descriptor each) available
    /// and kicks rx.
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

    /// Makes one rx chain of `(len, device-writable)` buffers available
    /// (within one slot) and kicks rx.
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

    /// The contents (header included, cut to the used length) of the rx
    /// buffers the device used since the last call.
    pub fn recv(&mut self) -> Vec<Vec<u8>> {
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
            out.push(bytes);
        }
        out
    }
}
