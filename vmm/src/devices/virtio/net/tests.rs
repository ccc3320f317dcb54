//! Tests of the net device: the worker's queue processing against a
//! socketpair backend, the worker thread, hostile chains, and a real tap in
//! a throwaway network namespace.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::cast_sign_loss)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::defs::*;
use super::device::{NetWorker, RxState, TxState};
use super::test_utils::*;
use super::*;
use crate::devices::virtio::{ActivateError, Interrupt, VirtioDevice, VIRTIO_MMIO_INT_CONFIG};

const MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x42]);
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

fn irq() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")))
}

fn worker() -> (TestGuest, NetWorker<PairBackend>, PairPeer, Arc<Interrupt>) {
    worker_with(0)
}

/// A worker for a driver that acked `features`.
fn worker_with(features: u64) -> (TestGuest, NetWorker<PairBackend>, PairPeer, Arc<Interrupt>) {
    let (g, queues) = TestGuest::new();
    let (backend, peer) = pair();
    let irq = irq();
    let w = NetWorker::new(g.mem.clone(), irq.clone(), queues, backend, Arc::default(), features);
    (g, w, peer, irq)
}

fn bits(list: &[u32]) -> u64 {
    list.iter().fold(0, |acc, b| acc | (1u64 << b))
}

/// A virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
fn vhdr(flags: u8, gso: u8, hdr_len: u16, gso_size: u16, start: u16, off: u16) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = flags;
    h[1] = gso;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&start.to_le_bytes());
    h[8..10].copy_from_slice(&off.to_le_bytes());
    h
}

fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// What the guest must find in an rx buffer for `frame`.
fn rx_bytes(frame: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    v[10] = 1; // num_buffers
    v.extend_from_slice(frame);
    v
}

#[test]
fn device_basics() {
    let (b, _peer) = pair();
    let d = Net::with_backend(MAC, 9000, b).expect("net");
    assert_eq!(d.device_type(), 1);
    assert_eq!(d.queue_max_sizes(), &[256, 256]);
    for bit in [VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS] {
        assert_ne!(d.avail_features() & (1 << bit), 0, "feature {bit}");
    }
    // Checksum and TCP segmentation offloads both ways.
    for bit in [0u32, 1, 7, 8, 11, 12] {
        assert_ne!(d.avail_features() & (1 << bit), 0, "feature {bit}");
    }
    // No ECN or UFO offloads, no merged buffers, no control queue, no multiqueue.
    for bit in [9u32, 10, 13, 14, 15, 17, 22] {
        assert_eq!(d.avail_features() & (1 << bit), 0, "feature {bit}");
    }
    let mut cfg = [0u8; CONFIG_SPACE_SIZE];
    d.read_config(0, &mut cfg);
    assert_eq!(&cfg[0..6], &MAC.0);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 9000);
    let mut b = [0xffu8; 4];
    d.read_config(10, &mut b);
    assert_eq!(b, [0x28, 0x23, 0, 0], "partly out of range: zero-filled");
    d.read_config(64, &mut b);
    assert_eq!(b, [0; 4]);
    d.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);

    let (b, _peer) = pair();
    assert!(matches!(Net::with_backend(MacAddr([1, 0, 0, 0, 0, 1]), 1500, b), Err(NetError::Config(NetConfigError::MacNotUnicast(_)))));
    let (b, _peer) = pair();
    assert!(matches!(Net::with_backend(MAC, 65536, b), Err(NetError::Config(NetConfigError::BadMtu(65536)))));
    let (b, _peer) = pair();
    assert!(matches!(Net::with_backend(MAC, 67, b), Err(NetError::Config(NetConfigError::BadMtu(67)))));
}

#[test]
fn tx_frames_reach_the_backend_intact() {
    let (mut g, mut w, peer, irq) = worker();
    let dst = [0x02, 0, 0, 0, 0, 0x99];
    let frames: Vec<Vec<u8>> = [60usize, 14, 1514, 9014, MAX_FRAME_LEN].iter().map(|&n| eth_frame(dst, n as u8, n)).collect();
    for f in &frames {
        g.send(f);
    }
    // Header split across descriptors, frame cut at odd places.
    let mut bytes = vec![0u8; VNET_HDR_LEN];
    bytes.extend_from_slice(&frames[2]);
    g.queue_tx(&bytes, &[5, 12, 13, 100, 1000]);
    // Header and frame in one descriptor each.
    g.queue_tx(&bytes, &[VNET_HDR_LEN]);
    assert_eq!(w.process_tx(), TxState::Done);
    let used = g.take_used(TXQ_INDEX);
    assert_eq!(used.len(), 7);
    assert!(used.iter().all(|&(_, len)| len == 0));
    let got = peer.recv_all();
    assert_eq!(got.len(), 7);
    for (i, f) in frames.iter().chain([&frames[2], &frames[2]]).enumerate() {
        // The guest's header (0xa5 garbage in `send`) is not passed on.
        assert_eq!(&got[i][..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN], "frame {i}");
        assert_eq!(&got[i][VNET_HDR_LEN..], &f[..], "frame {i}");
    }
    assert_eq!(count(&w.metrics.tx_frames), 7);
    assert_eq!(irq.irqfd().read().expect("interrupt"), 1);
}

#[test]
fn rx_frames_reach_the_guest_with_a_header() {
    let (mut g, mut w, peer, irq) = worker();
    let frames: Vec<Vec<u8>> = [60usize, 1514, 65000].iter().map(|&n| eth_frame(MAC.0, n as u8, n)).collect();
    for f in &frames {
        peer.send(&with_hdr(f));
    }
    // No buffers yet: nothing is read, nothing is lost.
    assert_eq!(w.process_rx(), RxState::WaitGuest);
    assert_eq!(count(&w.metrics.rx_starved), 1);
    assert!(irq.irqfd().read().is_err());
    // A one-descriptor buffer, a multi-descriptor chain, a big buffer.
    g.post_rx(1, 1600);
    g.post_rx_chain(&[(VNET_HDR_LEN as u32, true), (100, true), (1500, true)]);
    g.post_rx(1, RX_SLOT as u32);
    // And one more: the backend runs dry first.
    g.post_rx(1, 2048);
    assert_eq!(w.process_rx(), RxState::WaitBackend);
    let got = g.recv();
    assert_eq!(got.len(), 3);
    for (f, b) in frames.iter().zip(&got) {
        assert_eq!(b, &rx_bytes(f));
    }
    assert_eq!(irq.irqfd().read().expect("interrupt"), 1);
    assert_eq!(count(&w.metrics.rx_frames), 3);
}

#[test]
fn no_frame_is_lost_while_the_guest_has_no_buffers() {
    let (mut g, mut w, peer, _irq) = worker();
    let frames: Vec<Vec<u8>> = (0..8u8).map(|i| eth_frame(MAC.0, i, 100 + usize::from(i))).collect();
    for f in &frames {
        peer.send(&with_hdr(f));
    }
    g.post_rx(3, 2048);
    assert_eq!(w.process_rx(), RxState::WaitGuest);
    let mut got = g.recv();
    assert_eq!(got.len(), 3);
    assert_eq!(count(&w.metrics.rx_starved), 1);
    g.post_rx(10, 2048);
    assert_eq!(w.process_rx(), RxState::WaitBackend);
    got.extend(g.recv());
    assert_eq!(got, frames.iter().map(|f| rx_bytes(f)).collect::<Vec<_>>());
    assert_eq!(count(&w.metrics.rx_dropped), 0);
}

#[test]
fn oversized_frames_are_dropped_and_the_buffer_kept() {
    let (mut g, mut w, peer, _irq) = worker();
    let big = eth_frame(MAC.0, 1, 3000);
    let small = eth_frame(MAC.0, 2, 200);
    peer.send(&with_hdr(&big));
    peer.send(&with_hdr(&small));
    // A runt (shorter than an Ethernet header) and an offloaded frame.
    peer.send(&with_hdr(&[1, 2, 3]));
    let mut gso = with_hdr(&small);
    gso[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
    peer.send(&gso);
    let mut csum = with_hdr(&small);
    csum[0] = 1; // NEEDS_CSUM
    peer.send(&csum);
    peer.send(&with_hdr(&small));
    g.post_rx(2, 1024);
    // Both buffers used: the guest must add more.
    assert_eq!(w.process_rx(), RxState::WaitGuest);
    assert_eq!(g.recv(), vec![rx_bytes(&small), rx_bytes(&small)]);
    assert_eq!(count(&w.metrics.rx_dropped), 4);
}

#[test]
fn unusable_rx_buffers_are_returned_empty_without_losing_frames() {
    let (mut g, mut w, peer, _irq) = worker();
    let f = eth_frame(MAC.0, 7, 500);
    peer.send(&with_hdr(&f));
    let ro = g.post_rx_chain(&[(2048, false)]);
    let mixed = g.post_rx_chain(&[(VNET_HDR_LEN as u32, true), (2048, false)]);
    let tiny = g.post_rx_chain(&[(20, true)]);
    let outside = g.add_chain(RXQ_INDEX, &[(GuestAddress(0xff_0000_0000), 4096, true)]);
    let straddle = g.add_chain(RXQ_INDEX, &[(GuestAddress(0x2ff_f000), 0x2000, true)]);
    g.post_rx(1, 2048);
    assert_eq!(w.process_rx(), RxState::WaitGuest);
    let used = g.take_used(RXQ_INDEX);
    assert_eq!(&used[..5], &[(ro, 0), (mixed, 0), (tiny, 0), (outside, 0), (straddle, 0)]);
    assert_eq!(used.len(), 6);
    assert_eq!(used[5].1 as usize, VNET_HDR_LEN + f.len());
    assert_eq!(count(&w.metrics.rx_bad_buffers), 5);
    assert_eq!(count(&w.metrics.rx_frames), 1);
}

#[test]
fn hostile_tx_chains_are_dropped_and_the_device_goes_on() {
    let (mut g, mut w, peer, _irq) = worker();
    let good = eth_frame([2, 0, 0, 0, 0, 1], 3, 64);
    let mut bytes = vec![0u8; VNET_HDR_LEN];
    bytes.extend_from_slice(&good);
    let data = GuestAddress(0x30_0000);
    g.mem.write_slice(&bytes, data).expect("write");
    // A device-writable descriptor.
    g.add_chain(TXQ_INDEX, &[(data, 12, false), (GuestAddress(data.0 + 12), 64, true)]);
    // Longer than the largest frame (in pieces, each in memory).
    g.add_chain(TXQ_INDEX, &[(data, 40_000, false), (data, 40_000, false)]);
    // Shorter than header + Ethernet header.
    g.add_chain(TXQ_INDEX, &[(data, 25, false)]);
    g.add_chain(TXQ_INDEX, &[(data, 0, false)]);
    // Outside guest memory, and wrapping around the address space.
    g.add_chain(TXQ_INDEX, &[(data, 12, false), (GuestAddress(0xff_0000_0000), 64, false)]);
    g.add_chain(TXQ_INDEX, &[(GuestAddress(u64::MAX - 4), 64, false)]);
    // Straddling the end of guest memory.
    g.add_chain(TXQ_INDEX, &[(data, 12, false), (GuestAddress(0x2ff_fff0), 64, false)]);
    // A descriptor whose `next` is itself, and two pointing at each other.
    let base = 200u16;
    g.raw_desc(TXQ_INDEX, base, data.0, 60, NEXT, base);
    g.publish_head(TXQ_INDEX, base);
    g.raw_desc(TXQ_INDEX, base + 1, data.0, 40, NEXT, base + 2);
    g.raw_desc(TXQ_INDEX, base + 2, data.0, 40, NEXT, base + 1);
    g.publish_head(TXQ_INDEX, base + 1);
    // A head index beyond the table.
    g.publish_head(TXQ_INDEX, QUEUE_SIZE + 5);
    // An indirect table of 4096 one-byte descriptors looping on itself
    // (more pieces than writev takes), one outside memory, one nested.
    let table = 0x40_0000u64;
    for i in 0..4096u16 {
        let d = virtio_queue::desc::RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(data.0, 1, NEXT, (i + 1) % 4096));
        g.mem.write_obj(d, GuestAddress(table + 16 * u64::from(i))).expect("indirect");
    }
    for (i, (addr, len, flags)) in
        [(table, 16 * 4096, INDIRECT), (0xff_0000_0000, 64, INDIRECT), (table, 20, INDIRECT), (data.0, 76, INDIRECT | WRITE)]
            .into_iter()
            .enumerate()
    {
        let idx = base + 10 + i as u16;
        g.raw_desc(TXQ_INDEX, idx, addr, len, flags, 0);
        g.publish_head(TXQ_INDEX, idx);
    }
    // Then a good frame.
    g.send(&good);
    let start = Instant::now();
    assert_eq!(w.process_tx(), TxState::Done);
    assert!(start.elapsed() < Duration::from_secs(30), "bounded work");
    assert!(!w.broken);
    let got = peer.recv_all();
    assert_eq!(got.last().map(|f| &f[VNET_HDR_LEN..]), Some(&good[..]));
    // Whatever went out is a whole frame behind a zero header.
    for f in &got {
        assert!(f.len() >= VNET_HDR_LEN + MIN_FRAME_LEN && f[..VNET_HDR_LEN] == [0; VNET_HDR_LEN]);
    }
    assert!(count(&w.metrics.tx_malformed) >= 8, "{}", count(&w.metrics.tx_malformed));
    // Every chain but the out-of-range head went back to the guest.
    assert_eq!(g.take_used(TXQ_INDEX).len(), 14);
}

#[test]
fn corrupt_avail_index_breaks_the_device() {
    let (mut g, mut w, peer, irq) = worker();
    g.send(&eth_frame([2, 0, 0, 0, 0, 1], 0, 60));
    g.corrupt_avail_idx(TXQ_INDEX, QUEUE_SIZE + 1);
    let start = Instant::now();
    assert_eq!(w.process_tx(), TxState::Done);
    assert!(start.elapsed() < Duration::from_secs(10), "no spinning");
    assert!(w.broken && irq.needs_reset());
    assert_eq!(irq.status() & VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_CONFIG);
    assert!(peer.recv_all().is_empty());
    // Nothing is processed any more, on any queue.
    peer.send(&with_hdr(&eth_frame(MAC.0, 0, 60)));
    g.post_rx(1, 2048);
    w.process_rx();
    assert!(g.take_used(RXQ_INDEX).is_empty());

    let (mut g, mut w, peer, irq) = worker();
    peer.send(&with_hdr(&eth_frame(MAC.0, 0, 60)));
    g.post_rx(1, 2048);
    g.corrupt_avail_idx(RXQ_INDEX, QUEUE_SIZE + 1);
    w.process_rx();
    assert!(w.broken && irq.needs_reset());
}

#[test]
fn a_full_backend_holds_tx_frames_until_it_drains() {
    let (mut g, mut w, peer, _irq) = worker();
    let frames: Vec<Vec<u8>> = (0..120u8).map(|i| eth_frame([2, 0, 0, 0, 0, 1], i, 1000 + usize::from(i))).collect();
    for f in &frames {
        g.send(f);
    }
    // The peer does not read: the socket fills up.
    assert_eq!(w.process_tx(), TxState::Blocked);
    assert!(count(&w.metrics.tx_blocked) >= 1);
    let pending = g.in_flight(TXQ_INDEX);
    assert!(pending > 0, "the frames that did not fit stay with the device");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < frames.len() {
        assert!(Instant::now() < deadline);
        got.extend(peer.recv_all());
        w.process_tx();
    }
    assert_eq!(got.iter().map(|f| f[VNET_HDR_LEN..].to_vec()).collect::<Vec<_>>(), frames);
    assert_eq!(g.in_flight(TXQ_INDEX), 0);
    assert_eq!(count(&w.metrics.tx_errors), 0);
}

#[test]
fn backend_write_errors_drop_the_frame_only() {
    let (mut g, mut w, peer, _irq) = worker();
    w.backend.write_errno = Some(libc::EIO);
    g.send(&eth_frame([2, 0, 0, 0, 0, 1], 0, 60));
    assert_eq!(w.process_tx(), TxState::Done);
    assert_eq!(g.take_used(TXQ_INDEX).len(), 1);
    assert_eq!(count(&w.metrics.tx_errors), 1);
    w.backend.write_errno = None;
    g.send(&eth_frame([2, 0, 0, 0, 0, 1], 1, 60));
    w.process_tx();
    assert_eq!(peer.recv_all().len(), 1);
}

/// With CSUM (and HOST_TSO4) acked, the guest's header reaches the tap as
/// far as it uses what was negotiated; anything else drops the frame.
#[test]
fn tx_offload_headers_are_checked_against_the_features() {
    use virtio_bindings::virtio_net::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4};
    let (mut g, mut w, peer, _irq) = worker_with(bits(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4]));
    let f = eth_frame([2, 0, 0, 0, 0, 1], 0, 200);
    let send = |g: &mut TestGuest, h: [u8; VNET_HDR_LEN]| {
        let mut b = h.to_vec();
        b.extend_from_slice(&f);
        // Header cut in two: it is read across descriptors.
        g.queue_tx(&b, &[3]);
    };
    let mut csum = vhdr(1, 0, 0, 0, 34, 16);
    csum[10] = 0x55; // num_buffers: meaningless on tx, not passed on
    send(&mut g, csum);
    send(&mut g, vhdr(1, 1, 54, 1448, 34, 16)); // TCPv4 segmentation: acked
    send(&mut g, vhdr(1 | 2 | 0x80, 0, 0, 0, 34, 16)); // flags beyond NEEDS_CSUM: stripped
    send(&mut g, vhdr(1, 4, 74, 1428, 54, 16)); // TCPv6: not acked
    send(&mut g, vhdr(1, 0x81, 54, 1448, 34, 16)); // ECN: not offered
    send(&mut g, vhdr(1, 3, 42, 1000, 34, 6)); // UDP: not offered
    send(&mut g, vhdr(1, 1, 54, 0, 34, 16)); // segments of 0 bytes
    assert_eq!(w.process_tx(), TxState::Done);
    let got = peer.recv_all();
    let hdrs: Vec<&[u8]> = got.iter().map(|b| &b[..VNET_HDR_LEN]).collect();
    assert_eq!(hdrs, vec![&vhdr(1, 0, 0, 0, 34, 16)[..], &vhdr(1, 1, 54, 1448, 34, 16)[..], &vhdr(1, 0, 0, 0, 34, 16)[..]]);
    assert!(got.iter().all(|b| b[VNET_HDR_LEN..] == f[..]));
    assert_eq!(count(&w.metrics.tx_malformed), 4);
    assert_eq!(g.take_used(TXQ_INDEX).len(), 7);

    // TSO without CSUM is not segmentation the device does (5.1.3.1).
    let (mut g, mut w, peer, _irq) = worker_with(bits(&[VIRTIO_NET_F_HOST_TSO4]));
    send(&mut g, vhdr(1, 1, 54, 1448, 34, 16));
    w.process_tx();
    let got = peer.recv_all();
    assert_eq!(&got[0][..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN], "no CSUM: the header is zeros");
}

/// With GUEST_CSUM (and GUEST_TSO4) acked, offloaded host frames reach the
/// guest with their header; what the guest did not accept is dropped.
#[test]
fn rx_offload_headers_are_checked_against_the_features() {
    use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4};
    let (mut g, mut w, peer, _irq) = worker_with(bits(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4]));
    let small = eth_frame(MAC.0, 1, 300);
    let big = eth_frame(MAC.0, 2, 65_000);
    let framed = |h: [u8; VNET_HDR_LEN], f: &[u8]| {
        let mut b = h.to_vec();
        b.extend_from_slice(f);
        b
    };
    peer.send(&framed(vhdr(1, 0, 0, 0, 34, 16), &small));
    peer.send(&framed(vhdr(2, 0, 0, 0, 0, 0), &small));
    peer.send(&framed(vhdr(1, 1, 54, 1448, 34, 16), &big));
    peer.send(&framed(vhdr(1, 4, 74, 1428, 54, 16), &big)); // TCPv6: not accepted
    peer.send(&framed(vhdr(1, 3, 42, 1000, 34, 6), &small)); // UDP
    peer.send(&framed(vhdr(4, 0, 0, 0, 0, 0), &small)); // unknown flag
    g.post_rx(2, 2048);
    // A big-packets chain, as Linux posts without MRG_RXBUF.
    let chain: Vec<(u32, bool)> = std::iter::once((VNET_HDR_LEN as u32, true)).chain((0..17).map(|_| (4096, true))).collect();
    g.post_rx_chain(&chain);
    g.post_rx(1, 2048);
    w.process_rx();
    let got = g.recv();
    let with_nb = |h: [u8; VNET_HDR_LEN], f: &[u8]| {
        let mut b = framed(h, f);
        b[10] = 1;
        b
    };
    assert_eq!(got.len(), 3);
    assert_eq!(got[0], with_nb(vhdr(1, 0, 0, 0, 34, 16), &small));
    assert_eq!(got[1], with_nb(vhdr(2, 0, 0, 0, 0, 0), &small));
    assert_eq!(got[2], with_nb(vhdr(1, 1, 54, 1448, 34, 16), &big));
    assert_eq!(count(&w.metrics.rx_dropped), 3);

    // Without GUEST_CSUM: DATA_VALID is not passed on, NEEDS_CSUM is dropped.
    let (mut g, mut w, peer, _irq) = worker();
    peer.send(&framed(vhdr(2, 0, 0, 0, 0, 0), &small));
    peer.send(&framed(vhdr(1, 0, 0, 0, 34, 16), &small));
    g.post_rx(4, 2048);
    w.process_rx();
    assert_eq!(g.recv(), vec![rx_bytes(&small)]);
}

/// The worker turns the backend's rx offloads on for what the driver
/// accepted, and off again when the device is reset.
#[test]
fn rx_offloads_follow_the_driver() {
    use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO6};
    let (b, _peer) = pair();
    let mut d = Net::with_backend(MAC, 1500, b).expect("net");
    d.set_acked_features(bits(&[VIRTIO_F_VERSION_1, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO6]));
    let (_g, queues) = TestGuest::new();
    d.activate(_g.mem.clone(), irq(), queues).expect("activate");
    assert!(d.reset());
    let on = Offloads { csum: true, tso4: false, tso6: true };
    assert_eq!(d.backend().expect("backend").offloads, vec![on, Offloads::default()]);
    // A driver without offloads: the backend is not touched.
    d.set_acked_features(1 << VIRTIO_F_VERSION_1);
    let (_g, queues) = TestGuest::new();
    d.activate(_g.mem.clone(), irq(), queues).expect("activate");
    assert!(d.reset());
    assert_eq!(d.backend().expect("backend").offloads.len(), 2);
}

/// CPU time (user + system, in clock ticks) of this process's threads named `name`.
fn threads_cpu_ticks(name: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").expect("tasks").flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesized name: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        total += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    total
}

#[test]
fn worker_thread_moves_frames_and_idles_when_starved() {
    let (b, peer) = pair();
    let mut d = Net::with_backend(MAC, 1500, b).expect("net");
    let (mut g, queues) = TestGuest::new();
    let irq = irq();
    // Wrong queue count.
    let (_, mut one) = TestGuest::new();
    one.truncate(1);
    assert!(matches!(d.activate(g.mem.clone(), irq.clone(), one), Err(ActivateError::QueueCount { expected: 2, got: 1 })));
    d.activate(g.mem.clone(), irq.clone(), queues).expect("activate");
    assert!(d.is_active() && d.backend().is_none());

    // Guest to host.
    let out = eth_frame([2, 0, 0, 0, 0, 1], 1, 1514);
    g.send(&out);
    let got = peer.recv_timeout(Duration::from_secs(30)).expect("frame from the guest");
    assert_eq!(&got[VNET_HDR_LEN..], &out[..]);

    // Host to guest, with no buffers: the worker waits without spinning.
    let frames: Vec<Vec<u8>> = (0..5u8).map(|i| eth_frame(MAC.0, i, 60 + usize::from(i))).collect();
    for f in &frames {
        peer.send(&with_hdr(f));
    }
    std::thread::sleep(Duration::from_millis(50));
    let starved = count(&d.metrics().rx_starved);
    let cpu = threads_cpu_ticks("net");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(&d.metrics().rx_starved), starved, "no re-polling while starved");
    assert!(threads_cpu_ticks("net") - cpu < 25, "the worker spins while the guest has no buffers");
    g.post_rx(2, 2048);
    let mut got = Vec::new();
    wait_for("two rx frames", || {
        got.extend(g.recv());
        (got.len() == 2).then_some(())
    });
    g.post_rx(8, 2048);
    wait_for("all rx frames", || {
        got.extend(g.recv());
        (got.len() == 5).then_some(())
    });
    assert_eq!(got, frames.iter().map(|f| rx_bytes(f)).collect::<Vec<_>>());
    // More frames while buffers are there: delivered as they come.
    let late = eth_frame(MAC.0, 9, 300);
    peer.send(&with_hdr(&late));
    wait_for("late frame", || g.recv().pop()).eq(&rx_bytes(&late)).then_some(()).expect("late frame intact");

    // Reset gives the backend back; a fresh activation works.
    assert!(d.reset());
    assert!(!d.is_active() && d.backend().is_some());
    assert_eq!(d.acked_features(), 0);
    let (mut g, queues) = TestGuest::new();
    d.activate(g.mem.clone(), irq, queues).expect("re-activate");
    g.send(&out);
    assert!(peer.recv_timeout(Duration::from_secs(30)).is_some());
    drop(d);
}

/// A frame queued just before the device stops still goes out.
#[test]
fn stopping_worker_drains_tx() {
    let (b, peer) = pair();
    let mut d = Net::with_backend(MAC, 1500, b).expect("net");
    let (mut g, queues) = TestGuest::new();
    d.activate(g.mem.clone(), irq(), queues).expect("activate");
    g.send(&eth_frame([2, 0, 0, 0, 0, 1], 0, 60));
    assert!(peer.recv_timeout(Duration::from_secs(30)).is_some());
    let mut bytes = vec![0u8; VNET_HDR_LEN];
    bytes.extend_from_slice(&eth_frame([2, 0, 0, 0, 0, 1], 1, 61));
    g.queue_tx(&bytes, &[]);
    assert!(d.reset());
    assert_eq!(peer.recv_all().len(), 1);
}

/// The worker of a broken device parks until the reset.
#[test]
fn broken_device_waits_for_reset() {
    let (b, _peer) = pair();
    let mut d = Net::with_backend(MAC, 1500, b).expect("net");
    let (mut g, queues) = TestGuest::new();
    let irq = irq();
    d.activate(g.mem.clone(), irq.clone(), queues).expect("activate");
    g.corrupt_avail_idx(TXQ_INDEX, QUEUE_SIZE + 7);
    g.kick(TXQ_INDEX);
    wait_for("needs reset", || irq.needs_reset().then_some(()));
    assert!(d.is_active());
    assert!(d.reset());
    assert!(d.backend().is_some());
}

// ---- a real tap, in a network namespace of the test's own thread ----

/// Runs `f` on a thread in a fresh network namespace; false (and a note)
/// where that is not possible (not root, no /dev/net/tun), or a failure
/// under CARAPACE_REQUIRE_KVM=1.
fn in_netns(test: &str, f: impl FnOnce() + Send + 'static) -> bool {
    use carapace_test_support::{can_run, Need};
    if !can_run(test, &[Need::Root, Need::Tun]) {
        return false;
    }
    std::thread::spawn(move || {
        // SAFETY: unshare(CLONE_NEWNET) moves only this thread into a new
        // network namespace; it touches no memory.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        f();
    })
    .join()
    .map_err(std::panic::resume_unwind)
    .is_ok()
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeros is valid.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    r
}

/// Brings interface `name` up; returns its index.
fn link_up(name: &str) -> i32 {
    // SAFETY: plain socket creation.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(s >= 0);
    let mut r = ifreq(name);
    // SAFETY: `r` is a valid ifreq for these requests.
    unsafe {
        assert_eq!(libc::ioctl(s, libc::SIOCGIFFLAGS, &mut r), 0);
        r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(s, libc::SIOCSIFFLAGS, &mut r), 0);
        assert_eq!(libc::ioctl(s, libc::SIOCGIFINDEX, &mut r), 0);
        libc::close(s);
        r.ifr_ifru.ifru_ifindex
    }
}

/// A packet socket on interface `ifindex` for EtherType 0x88b5 frames.
fn packet_socket(ifindex: i32) -> std::os::fd::OwnedFd {
    packet_socket_for(ifindex, 0x88b5)
}

/// A packet socket on interface `ifindex` for EtherType `ethertype` frames.
fn packet_socket_for(ifindex: i32, ethertype: u16) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let proto = ethertype.to_be();
    // SAFETY: plain socket creation.
    let s = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
    assert!(s >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: sockaddr_ll is plain data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex;
    // SAFETY: `sll` is a valid sockaddr_ll of the given size.
    let rc = unsafe { libc::bind(s, (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32) };
    assert_eq!(rc, 0);
    let tv = libc::timeval { tv_sec: 10, tv_usec: 0 };
    // SAFETY: `tv` is a valid timeval of the given size.
    unsafe {
        libc::setsockopt(
            s,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    // SAFETY: `s` was just created and is owned by nothing else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(s) }
}

#[test]
fn real_tap_carries_frames_both_ways() {
    use std::os::fd::AsRawFd;
    in_netns("real_tap_carries_frames_both_ways", || {
        let tap = Tap::open_named("cpnet0").expect("create tap");
        assert_eq!(tap.name(), "cpnet0");
        let ifindex = link_up("cpnet0");
        let sock = packet_socket(ifindex);

        let (mut g, queues) = TestGuest::new();
        let mut w = NetWorker::new(g.mem.clone(), irq(), queues, tap, Arc::default(), 0);

        // Guest to host: out of the tap, byte for byte (big and small).
        for (seed, len) in [(1u8, 60usize), (2, 1514)] {
            let f = eth_frame([0x02, 0, 0, 0, 0, 0x77], seed, len);
            g.send(&f);
            assert_eq!(w.process_tx(), TxState::Done);
            let mut buf = vec![0u8; 4096];
            // SAFETY: `buf` is a live buffer of its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(n > 0, "no frame on the tap: {}", std::io::Error::last_os_error());
            assert_eq!(&buf[..n as usize], &f[..]);
        }
        assert_eq!(count(&w.metrics.tx_errors), 0);

        // Host to guest: into the rx buffer behind a 12-byte header.
        g.post_rx(16, 2048);
        let f = eth_frame(MAC.0, 5, 1000);
        // SAFETY: `f` is a live buffer of its length.
        let n = unsafe { libc::send(sock.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        assert_eq!(n as usize, f.len());
        // The namespace's own traffic (IPv6 neighbour discovery) may come
        // first: look for ours.
        let got = wait_for("frame in the guest", || {
            w.process_rx();
            g.recv().into_iter().find(|b| b.len() > VNET_HDR_LEN + 14 && b[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == [0x88, 0xb5])
        });
        assert_eq!(got, rx_bytes(&f));
    });
}

/// A TCP segmentation-offloaded frame from the guest (CSUM, HOST_TSO4) is
/// taken by a real tap and reaches the host stack whole; a header the host
/// kernel finds invalid loses that frame only. The tap takes the rx
/// offloads a driver may accept.
#[test]
fn real_tap_takes_offloaded_frames() {
    use std::os::fd::AsRawFd;
    use virtio_bindings::virtio_net::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4};
    in_netns("real_tap_takes_offloaded_frames", || {
        let mut tap = Tap::open_named("cpnet4").expect("tap");
        tap.set_rx_offloads(Offloads { csum: true, tso4: true, tso6: true }).expect("TUNSETOFFLOAD");
        tap.set_rx_offloads(Offloads::default()).expect("TUNSETOFFLOAD off");
        let ifindex = link_up("cpnet4");
        let sock = packet_socket_for(ifindex, 0x0800);
        let (mut g, queues) = TestGuest::new();
        let features = bits(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4]);
        let mut w = NetWorker::new(g.mem.clone(), irq(), queues, tap, Arc::default(), features);
        // Ethernet, IPv4 (20 bytes), TCP (20 bytes), 3000 bytes of payload.
        let payload = 3000usize;
        let mut f = vec![0x02, 0, 0, 0, 0, 0x77, 0x02, 0, 0, 0, 0, 0x42, 0x08, 0x00];
        let ip_len = u16::try_from(40 + payload).unwrap();
        f.extend_from_slice(&[0x45, 0, (ip_len >> 8) as u8, ip_len as u8, 0, 1, 0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 1]);
        f.extend_from_slice(&[0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend((0..payload).map(|i| i as u8));
        let mut b = vhdr(1, 1, 54, 1448, 34, 16).to_vec();
        b.extend_from_slice(&f);
        g.queue_tx(&b, &[VNET_HDR_LEN]);
        // csum_start past the end of the frame: the host kernel refuses it.
        let mut bad = vhdr(1, 0, 0, 0, 60_000, 16).to_vec();
        bad.extend_from_slice(&f);
        g.queue_tx(&bad, &[]);
        assert_eq!(w.process_tx(), TxState::Done);
        assert_eq!(g.take_used(TXQ_INDEX).len(), 2);
        assert_eq!(count(&w.metrics.tx_frames), 1);
        assert_eq!(count(&w.metrics.tx_errors), 1);
        let mut buf = vec![0u8; 70_000];
        // SAFETY: `buf` is a live buffer of its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(n > 0, "no frame on the tap: {}", std::io::Error::last_os_error());
        // The stack sees the whole frame (segmented later, if forwarded);
        // its payload is intact.
        assert_eq!(n as usize, f.len());
        assert_eq!(&buf[54..n as usize], &f[54..]);
    });
}

#[test]
fn inherited_tap_fds_are_checked() {
    use std::os::fd::AsRawFd;
    // Not open.
    let e = Tap::from_fd(987_654).expect_err("closed fd").to_string();
    assert!(e.contains("987654") && e.contains("not open"), "{e}");
    // Not a tap at all.
    let f = std::fs::File::open("/dev/null").expect("null");
    let e = Tap::from_fd(f.as_raw_fd()).expect_err("not a tap").to_string();
    assert!(e.contains(&f.as_raw_fd().to_string()) && e.contains("not a usable tap"), "{e}");
    in_netns("inherited_tap_fds_are_checked", || {
        use std::os::fd::FromRawFd;
        // A tap opened the runtime's way: usable, and the caller keeps its fd.
        let own = Tap::open_named("cpnet1").expect("tap");
        let raw = own.poll_fd();
        let t = Tap::from_fd(raw).expect("inherited tap");
        assert_eq!(t.name(), "cpnet1");
        assert_ne!(t.poll_fd(), raw);
        drop(t);
        // SAFETY: F_GETFD on an fd number; no memory involved.
        assert!(unsafe { libc::fcntl(raw, libc::F_GETFD) } >= 0, "the inherited fd stays open");
        drop(own);
        // A tap without IFF_VNET_HDR.
        // SAFETY: literal path, valid flags.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just opened, owned here.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let mut r = ifreq("cpnet2");
        r.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: `r` is a valid ifreq.
        assert_eq!(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut r) }, 0);
        let e = Tap::from_fd(fd.as_raw_fd()).expect_err("no vnet hdr").to_string();
        assert!(e.contains("IFF_VNET_HDR"), "{e}");
        // A tun (IP) device.
        // SAFETY: literal path, valid flags.
        let fd2 = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        // SAFETY: just opened, owned here.
        let fd2 = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd2) };
        let mut r = ifreq("cptun0");
        r.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: `r` is a valid ifreq.
        assert_eq!(unsafe { libc::ioctl(fd2.as_raw_fd(), libc::TUNSETIFF, &mut r) }, 0);
        let e = Tap::from_fd(fd2.as_raw_fd()).expect_err("tun").to_string();
        assert!(e.contains("not a tap"), "{e}");
        // An unattached /dev/net/tun file.
        // SAFETY: literal path, valid flags.
        let fd3 = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        // SAFETY: just opened, owned here.
        let fd3 = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd3) };
        let e = Tap::from_fd(fd3.as_raw_fd()).expect_err("unattached").to_string();
        assert!(e.contains("not an attached"), "{e}");
    });
}

/// A tap whose interface is deleted under the device does not make the
/// worker spin or die: frames are dropped, the device keeps serving.
#[test]
fn deleted_tap_interface_does_not_spin() {
    in_netns("deleted_tap_interface_does_not_spin", || {
        let tap = Tap::open_named("cpnet3").expect("tap");
        link_up("cpnet3");
        let mut d = Net::with_backend(MAC, 1500, tap).expect("net");
        let (mut g, queues) = TestGuest::new();
        d.activate(g.mem.clone(), irq(), queues).expect("activate");
        g.post_rx(4, 2048);
        // Deleting the interface: the last fd is the device's, so make it
        // non-persistent and detach by a netlink-free route: TUNSETPERSIST
        // does not delete an attached tap, so use the ip tool if present.
        let deleted = std::process::Command::new("ip").args(["link", "del", "cpnet3"]).status().map(|s| s.success()).unwrap_or(false);
        if !deleted {
            carapace_test_support::skip("deleted_tap_interface_does_not_spin (the deletion part)", "the `ip` tool");
            return;
        }
        let cpu = threads_cpu_ticks("net");
        g.send(&eth_frame([2, 0, 0, 0, 0, 1], 0, 60));
        wait_for("tx used", || (g.in_flight(TXQ_INDEX) == 0).then_some(()));
        std::thread::sleep(Duration::from_millis(500));
        assert!(threads_cpu_ticks("net") - cpu < 25, "the worker spins on a dead tap");
        assert!(count(&d.metrics().tx_errors) >= 1, "the frame was dropped, not sent");
        assert!(d.reset());
    });
}
