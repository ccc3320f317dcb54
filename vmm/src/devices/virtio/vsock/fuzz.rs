//! Fuzz harnesses for the vsock device (see [`crate::fuzzing`]).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::defs::*;
use super::device::VsockWorker;
use super::packet::{VsockHeader, VsockPacket};
use super::test_utils::{TestBackend, TestGuest, TEST_GUEST_CID};
use super::{VsockBackend, VsockUnixBackend};
use crate::devices::virtio::{ActiveQueue, Interrupt};
use crate::fuzzing::{queue_layout, ready_queue, Input};

/// Guest memory of the queue-walk harness: small, so that many fuzzed
/// addresses fall outside it.
const QW_MEM: usize = 1 << 20;
/// Where the fuzzed buffer contents go.
const QW_DATA: u64 = 0x1_0000;

fn irq() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")))
}

/// Fills queue `size`'s descriptor table and available ring at `base` from
/// the input; returns the available index written.
fn fill_queue(mem: &GuestMemoryMmap, inp: &mut Input<'_>, base: u64, size: u16) -> u16 {
    let (desc, avail, used) = queue_layout(base, size);
    for i in 0..u64::from(size) {
        let sel = inp.u8();
        // Mostly addresses in guest memory; sometimes anything at all.
        let addr = if sel & 0xc0 == 0 { inp.u64() } else { QW_DATA + u64::from(inp.u32()) % (QW_MEM as u64 - QW_DATA) };
        let len = if sel & 0x30 == 0 { inp.u32() } else { u32::from(inp.u16()) };
        let flags = u16::from(sel & 0x7) | if sel & 0x8 != 0 { inp.u16() } else { 0 };
        let next = inp.u16() % size.saturating_add(2);
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        let _ = mem.write_obj(d, desc.unchecked_add(16 * i));
    }
    let ahead = inp.u8();
    // Mostly a plausible number of entries; sometimes a corrupt index.
    let idx = if ahead & 0x80 != 0 { inp.u16() } else { u16::from(ahead) % size.saturating_add(1) };
    for i in 0..u64::from(idx.min(size)) {
        let head = inp.u16() % size.saturating_add(2);
        let _ = mem.write_obj(head.to_le(), avail.unchecked_add(4 + 2 * i));
    }
    let _ = mem.write_obj(inp.u16().to_le(), avail.unchecked_add(4 + 2 * u64::from(size)));
    let _ = mem.write_obj(0u16, used.unchecked_add(2));
    fence(Ordering::SeqCst);
    let _ = mem.write_obj(idx.to_le(), avail.unchecked_add(2));
    idx
}

fn used_idx(mem: &GuestMemoryMmap, base: u64, size: u16) -> u16 {
    let (_, _, used) = queue_layout(base, size);
    mem.read_obj::<u16>(used.unchecked_add(2)).map(u16::from_le).unwrap_or(0)
}

/// The virtio queue walk: descriptor tables and available rings made of
/// fuzz bytes (loops, indirect tables, heads out of range, addresses
/// outside memory, corrupt indices), walked by the vsock device's tx and
/// rx processing through virtio-queue.
pub fn virtio_queue(data: &[u8]) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), QW_MEM)]).expect("guest memory");
    let mut inp = Input::new(data);
    let size = 1u16 << (inp.u8() % 9);
    let flags = inp.u8();
    let event_idx = flags & 1 != 0;
    let bases = [0x0u64, 0x4000, 0x8000];
    let rx_idx = fill_queue(&mem, &mut inp, bases[RXQ_INDEX], size);
    let tx_idx = fill_queue(&mem, &mut inp, bases[TXQ_INDEX], size);
    let rest = inp.bytes(QW_MEM - QW_DATA as usize);
    mem.write_slice(rest, GuestAddress(QW_DATA)).expect("buffers");

    let mut queues = Vec::new();
    for base in bases {
        let queue = ready_queue(&mem, base, size, event_idx).expect("a valid layout");
        queues.push(ActiveQueue { queue, notify: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd") });
    }
    let mut backend = TestBackend::default();
    let rx_pending = flags >> 4 != 0;
    for i in 0..usize::from(flags >> 4) {
        let hdr = VsockHeader { op: OP_RW, src_port: i as u32, ..Default::default() };
        backend.rx_pkts.push_back(VsockPacket { hdr, data: vec![0x5a; i * 997] });
    }
    let irq = irq();
    let mut w = VsockWorker::new(mem.clone(), irq.clone(), queues, backend, Arc::default());
    w.process_tx();
    w.process_rx();
    w.process_tx();

    // A corrupt available index breaks the device; otherwise each
    // available entry was used at most once.
    for (qi, idx) in [(RXQ_INDEX, rx_idx), (TXQ_INDEX, tx_idx)] {
        // (rx is only looked at when there is something to deliver)
        if idx > size && (qi == TXQ_INDEX || rx_pending) {
            assert!(w.broken && irq.needs_reset(), "queue {qi}: index {idx} > size {size} not caught");
        }
        let used = used_idx(&mem, bases[qi], size);
        assert!(used <= idx.min(size), "queue {qi}: {used} used of {idx} available");
    }
    if !w.broken {
        // Every well-formed tx packet the backend saw respects the limits.
        for p in &w.backend.tx_pkts {
            assert_eq!(p.hdr.len as usize, p.data.len());
            assert!(p.data.len() <= MAX_PKT_BUF_SIZE);
        }
    }
}

/// What the packet harness keeps between inputs: a guest driver, a worker
/// over the real Unix backend, and host listeners for guest connections.
struct PacketRig {
    g: TestGuest,
    w: VsockWorker<VsockUnixBackend>,
    uds: PathBuf,
    listeners: Vec<UnixListener>,
    clients: Vec<UnixStream>,
    accepted: Vec<UnixStream>,
}

static RIG: Mutex<Option<PacketRig>> = Mutex::new(None);

/// Host ports with a listener (guest REQUESTs to them connect).
const LISTEN_PORTS: [u32; 2] = [700, 701];

fn rig() -> PacketRig {
    let dir = std::env::temp_dir().join(format!("carapace-fuzz-vsock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let uds = dir.join("v.sock");
    let mut backend = VsockUnixBackend::new(TEST_GUEST_CID, uds.clone()).expect("backend");
    // A small limit, so that floods reach it.
    backend.set_max_connections(16);
    let listeners = LISTEN_PORTS
        .iter()
        .map(|p| {
            let l = UnixListener::bind(format!("{}_{p}", uds.display())).expect("bind");
            l.set_nonblocking(true).expect("nonblocking");
            l
        })
        .collect();
    let (mut g, queues) = TestGuest::new();
    g.post_rx(64, 4096);
    let metrics = backend.metrics().clone();
    let w = VsockWorker::new(g.mem.clone(), irq(), queues, backend, metrics);
    PacketRig { g, w, uds, listeners, clients: Vec::new(), accepted: Vec::new() }
}

/// The vsock packet parser and connection state machine: a sequence of
/// packets (header and payload from the input, mostly with the right CIDs
/// so they reach the connection logic, cut into descriptors at fuzzed
/// places) interleaved with host-side events, against the real backend.
/// Every packet the device puts in an rx buffer must be well formed.
pub fn vsock_packets(data: &[u8]) {
    let mut guard = RIG.lock().unwrap_or_else(|e| e.into_inner());
    let rig = guard.get_or_insert_with(rig);
    let mut inp = Input::new(data);
    let mut rounds = 0;
    while !inp.is_empty() && rounds < 64 {
        rounds += 1;
        let ctl = inp.u8();
        let len = usize::from(inp.u16()) % (MAX_PKT_BUF_SIZE + PKT_HDR_SIZE + 64);
        let mut bytes = inp.bytes(len).to_vec();
        if bytes.len() >= PKT_HDR_SIZE {
            let mut h = VsockHeader::from_bytes(bytes[..PKT_HDR_SIZE].try_into().expect("44 bytes"));
            if ctl & 1 != 0 {
                h.src_cid = TEST_GUEST_CID;
                h.dst_cid = HOST_CID;
                h.type_ = TYPE_STREAM;
            }
            if ctl & 2 != 0 {
                h.len = (bytes.len() - PKT_HDR_SIZE) as u32;
            }
            if ctl & 4 != 0 {
                // A listening host port, or a host-initiated connection.
                h.dst_port = if h.dst_port & 1 == 0 {
                    LISTEN_PORTS[(h.dst_port as usize >> 1) % LISTEN_PORTS.len()]
                } else {
                    LOCAL_PORT_START + (h.dst_port >> 1) % 8
                };
                h.src_port %= 8;
                h.op = 1 + h.op % 8;
            }
            bytes[..PKT_HDR_SIZE].copy_from_slice(&h.to_bytes());
        }
        let mut cuts = [usize::from(inp.u16()) % (bytes.len() + 1), PKT_HDR_SIZE];
        cuts.sort_unstable();
        let write_only = (ctl & 0x18 == 0x18).then_some(usize::from(ctl >> 5) % 3);
        rig.g.queue_tx_raw(&bytes, &cuts, write_only);
        host_event(rig, ctl >> 5, &mut inp);
        rig.w.process_tx();
        rig.w.backend.process_host_events();
        if ctl & 0x20 != 0 {
            rig.w.backend.process_timeouts(Instant::now() + Duration::from_secs(30));
        }
        rig.w.process_rx();
        check_rx(rig);
    }
    // Start the next input from a clean slate.
    rig.w.backend.reset();
    rig.clients.clear();
    rig.accepted.clear();
    for l in &rig.listeners {
        while l.accept().is_ok() {}
    }
    rig.w.process_rx();
    check_rx(rig);
}

/// Packets the device delivered: headers from the host to this guest, a
/// length that matches the payload (TestGuest checks that) within limits.
fn check_rx(rig: &mut PacketRig) {
    for p in rig.g.recv(true) {
        assert_eq!((p.hdr.src_cid, p.hdr.dst_cid), (HOST_CID, TEST_GUEST_CID), "{:?}", p.hdr);
        assert_eq!(p.hdr.type_, TYPE_STREAM);
        assert!(p.data.len() <= MAX_PKT_BUF_SIZE);
        assert!((OP_REQUEST..=OP_CREDIT_REQUEST).contains(&p.hdr.op), "{:?}", p.hdr);
    }
}

/// One host-side action: a client connects, writes or leaves; a guest
/// connection is accepted, written to or closed.
fn host_event(rig: &mut PacketRig, what: u8, inp: &mut Input<'_>) {
    let arg = inp.u8();
    match what {
        1 if rig.clients.len() < 8 => {
            if let Ok(mut c) = UnixStream::connect(&rig.uds) {
                let _ = c.set_nonblocking(true);
                let _ = c.write_all(format!("CONNECT {}\n", arg % 8).as_bytes());
                rig.clients.push(c);
            }
        }
        2 if !rig.clients.is_empty() => {
            let i = usize::from(arg) % rig.clients.len();
            let _ = rig.clients[i].write(&vec![arg; usize::from(arg) * 64]);
        }
        3 if !rig.clients.is_empty() => {
            let i = usize::from(arg) % rig.clients.len();
            drop(rig.clients.swap_remove(i));
        }
        4 => {
            for l in &rig.listeners {
                while let Ok((s, _)) = l.accept() {
                    let _ = s.set_nonblocking(true);
                    rig.accepted.push(s);
                }
            }
        }
        5 if !rig.accepted.is_empty() => {
            let i = usize::from(arg) % rig.accepted.len();
            let _ = rig.accepted[i].write(&vec![arg; usize::from(arg) * 64]);
            let mut sink = [0u8; 4096];
            let _ = rig.accepted[i].read(&mut sink);
        }
        6 if !rig.accepted.is_empty() => {
            let i = usize::from(arg) % rig.accepted.len();
            drop(rig.accepted.swap_remove(i));
        }
        _ => {}
    }
}
