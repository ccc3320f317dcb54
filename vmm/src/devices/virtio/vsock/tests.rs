//! End-to-end tests: the real device and Unix backend on a worker thread,
//! driven through guest memory by [`TestGuest`] and through real Unix sockets
//! in a temporary directory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::defs::*;
use super::test_utils::*;
use super::{Vsock, VsockHeader, VsockPacket};
use crate::devices::virtio::{Interrupt, VirtioDevice};

const IO_TIMEOUT: Duration = Duration::from_secs(30);

struct Harness {
    g: TestGuest,
    dev: Vsock,
    _dir: tempfile::TempDir,
    uds: PathBuf,
    stash: Vec<VsockPacket>,
}

impl Harness {
    fn new() -> Self {
        let _ = tracing_subscriber::fmt().with_test_writer().with_max_level(tracing::Level::DEBUG).try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("v.sock");
        let mut dev = Vsock::new(TEST_GUEST_CID, uds.clone()).expect("vsock");
        let (mut g, queues) = TestGuest::new();
        g.post_rx(128, 4096 + PKT_HDR_SIZE as u32);
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
        dev.activate(g.mem.clone(), irq, queues).expect("activate");
        Harness { g, dev, _dir: dir, uds, stash: Vec::new() }
    }

    fn pump(&mut self) {
        let new = self.g.recv(true);
        self.stash.extend(new);
    }

    /// Waits for (and takes) the first packet to the guest matching `pred`.
    fn wait_pkt(&mut self, what: &str, pred: impl Fn(&VsockPacket) -> bool) -> VsockPacket {
        wait_for(what, || {
            self.pump();
            let i = self.stash.iter().position(&pred)?;
            Some(self.stash.remove(i))
        })
    }

    /// Waits for a packet with `op` from host port `host` to guest port `guest`.
    fn wait_op(&mut self, guest: u32, host: u32, op: u16) -> VsockPacket {
        let p = self.wait_pkt(&format!("op {op} {host}->{guest}"), |p| p.hdr.op == op && p.hdr.dst_port == guest && p.hdr.src_port == host);
        assert_eq!((p.hdr.src_cid, p.hdr.dst_cid, p.hdr.type_), (HOST_CID, TEST_GUEST_CID, TYPE_STREAM));
        p
    }

    /// Collects `n` bytes of RW payload on one connection.
    fn recv_data(&mut self, guest: u32, host: u32, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < n {
            let p = self.wait_op(guest, host, OP_RW);
            out.extend_from_slice(&p.data);
        }
        assert_eq!(out.len(), n, "no more data than expected");
        out
    }

    /// Whether any packet at all for the connection is waiting.
    fn quiet_for(&mut self, guest: u32, host: u32, d: Duration) -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.pump();
            if self.stash.iter().any(|p| p.hdr.dst_port == guest && p.hdr.src_port == host) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    fn client(&self, line: &str) -> UnixStream {
        let mut c = UnixStream::connect(&self.uds).expect("connect to the vsock socket");
        c.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        c.write_all(line.as_bytes()).expect("write CONNECT");
        c
    }

    /// A host-initiated connection to guest port `port`, accepted by the guest
    /// with `buf_alloc`; returns the client and the device's local port.
    fn host_connect(&mut self, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
        let mut c = self.client(&format!("CONNECT {port}\n"));
        let req = self.wait_pkt("REQUEST", |p| p.hdr.op == OP_REQUEST && p.hdr.dst_port == port);
        let local = req.hdr.src_port;
        let mut resp = guest_hdr(OP_RESPONSE, port, local);
        resp.buf_alloc = buf_alloc;
        self.g.send(resp, b"");
        assert_eq!(read_line(&mut c), format!("OK {local}"));
        (c, local)
    }

    fn send(&mut self, op: u16, guest: u32, host: u32, data: &[u8]) {
        self.g.send(guest_hdr(op, guest, host), data);
    }

    fn shutdown(&mut self, guest: u32, host: u32, flags: u32) {
        let mut h = guest_hdr(OP_SHUTDOWN, guest, host);
        h.flags = flags;
        self.g.send(h, b"");
    }

    fn sub_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds.display()))
    }
}

fn read_line(c: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        assert_eq!(c.read(&mut b).expect("read line"), 1, "EOF before end of line");
        if b[0] == b'\n' {
            return String::from_utf8(line).expect("utf8");
        }
        line.push(b[0]);
    }
}

fn read_n(c: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    c.read_exact(&mut v).expect("read");
    v
}

/// Reads until EOF (or reset); returns what came before it.
fn read_to_eof(c: &mut UnixStream) -> Vec<u8> {
    let mut v = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return v,
            Ok(n) => v.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return v,
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn host_initiated_round_trip() {
    let mut h = Harness::new();
    let mut c = h.client("CONNECT 1024\n");
    let req = h.wait_pkt("REQUEST", |p| p.hdr.op == OP_REQUEST);
    assert_eq!(req.hdr.dst_port, 1024);
    assert!(req.hdr.src_port >= LOCAL_PORT_START);
    assert_eq!((req.hdr.src_cid, req.hdr.dst_cid, req.hdr.type_), (HOST_CID, TEST_GUEST_CID, TYPE_STREAM));
    assert_eq!(req.hdr.buf_alloc, CONN_TX_BUF_SIZE);
    let local = req.hdr.src_port;

    h.send(OP_RESPONSE, 1024, local, b"");
    assert_eq!(read_line(&mut c), format!("OK {local}"));

    c.write_all(b"ping").expect("write");
    assert_eq!(h.recv_data(1024, local, 4), b"ping");
    h.send(OP_RW, 1024, local, b"pong");
    assert_eq!(read_n(&mut c, 4), b"pong");

    h.send(OP_CREDIT_REQUEST, 1024, local, b"");
    let cu = h.wait_op(1024, local, OP_CREDIT_UPDATE);
    assert_eq!((cu.hdr.fwd_cnt, cu.hdr.buf_alloc), (4, CONN_TX_BUF_SIZE));

    // The guest closes: the device answers RST and the client sees EOF.
    h.shutdown(1024, local, SHUTDOWN_BOTH);
    h.wait_op(1024, local, OP_RST);
    assert!(read_to_eof(&mut c).is_empty());

    // The next client gets a different local port.
    let (_c2, local2) = h.host_connect(1024, 65536);
    assert_ne!(local2, local);
}

#[test]
fn connect_line_split_and_followed_by_data() {
    let mut h = Harness::new();
    let mut c = UnixStream::connect(&h.uds).expect("connect");
    c.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    c.write_all(b"CONN").expect("write");
    std::thread::sleep(Duration::from_millis(20));
    // Bytes right after the line are data, not part of the handshake.
    c.write_all(b"ECT 77\nearly").expect("write");
    let req = h.wait_pkt("REQUEST", |p| p.hdr.op == OP_REQUEST && p.hdr.dst_port == 77);
    let local = req.hdr.src_port;
    h.send(OP_RESPONSE, 77, local, b"");
    assert_eq!(read_line(&mut c), format!("OK {local}"));
    assert_eq!(h.recv_data(77, local, 5), b"early");
}

#[test]
fn bad_connect_lines_close_the_client() {
    let h = Harness::new();
    for line in ["HELLO 5\n", "CONNECT abc\n", "CONNECT 1 2\n"] {
        let mut c = h.client(line);
        assert!(read_to_eof(&mut c).is_empty(), "{line:?}");
    }
    let mut c = h.client(&"x".repeat(MAX_CONNECT_LINE + 10));
    assert!(read_to_eof(&mut c).is_empty());
}

#[test]
fn guest_refuses_host_connection() {
    let mut h = Harness::new();
    let mut c = h.client("CONNECT 5555\n");
    let req = h.wait_pkt("REQUEST", |p| p.hdr.op == OP_REQUEST);
    h.send(OP_RST, 5555, req.hdr.src_port, b"");
    assert!(read_to_eof(&mut c).is_empty(), "no OK line, just EOF");
}

#[test]
fn guest_reset_closes_client() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(1024, 65536);
    h.send(OP_RW, 1024, local, b"last words");
    h.send(OP_RST, 1024, local, b"");
    let got = read_to_eof(&mut c);
    assert!(got.is_empty() || got == b"last words");
    // No reply to an RST.
    assert!(h.quiet_for(1024, local, Duration::from_millis(50)));
}

#[test]
fn client_close_and_half_close() {
    let mut h = Harness::new();
    // Half close: the guest hears SHUTDOWN(SEND) and can still answer.
    let (mut c, local) = h.host_connect(1024, 65536);
    c.write_all(b"request").expect("write");
    c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    assert_eq!(h.recv_data(1024, local, 7), b"request");
    let s = h.wait_op(1024, local, OP_SHUTDOWN);
    assert_eq!(s.hdr.flags, SHUTDOWN_SEND);
    h.send(OP_RW, 1024, local, b"response");
    assert_eq!(read_n(&mut c, 8), b"response");
    h.shutdown(1024, local, SHUTDOWN_BOTH);
    h.wait_op(1024, local, OP_RST);
    assert!(read_to_eof(&mut c).is_empty());

    // Full close: SHUTDOWN with both flags (maybe in two steps), then RST.
    let (c, local) = h.host_connect(1024, 65536);
    drop(c);
    let mut flags = 0;
    while flags != SHUTDOWN_BOTH {
        flags |= h.wait_op(1024, local, OP_SHUTDOWN).hdr.flags;
    }
    h.send(OP_RST, 1024, local, b"");
    assert!(h.quiet_for(1024, local, Duration::from_millis(50)));
}

#[test]
fn guest_initiated_connection() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.sub_path(5000)).expect("bind");
    h.send(OP_REQUEST, 7000, 5000, b"");
    let resp = h.wait_op(7000, 5000, OP_RESPONSE);
    assert_eq!(resp.hdr.buf_alloc, CONN_TX_BUF_SIZE);
    let (mut s, _) = listener.accept().expect("accept");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");

    h.send(OP_RW, 7000, 5000, b"hello");
    assert_eq!(read_n(&mut s, 5), b"hello");
    s.write_all(b"world").expect("write");
    assert_eq!(h.recv_data(7000, 5000, 5), b"world");

    // The guest stops sending: the host sees EOF but can still answer.
    h.shutdown(7000, 5000, SHUTDOWN_SEND);
    assert!(read_to_eof(&mut s).is_empty());
    s.write_all(b"bye").expect("write");
    assert_eq!(h.recv_data(7000, 5000, 3), b"bye");
    drop(s);
    let mut flags = 0;
    while flags != SHUTDOWN_BOTH {
        flags |= h.wait_op(7000, 5000, OP_SHUTDOWN).hdr.flags;
    }
    h.send(OP_RST, 7000, 5000, b"");

    // The same guest port can connect again.
    h.send(OP_REQUEST, 7000, 5000, b"");
    h.wait_op(7000, 5000, OP_RESPONSE);
    let _ = listener.accept().expect("accept");
}

#[test]
fn guest_connection_refused() {
    let mut h = Harness::new();
    h.send(OP_REQUEST, 7001, 5001, b"");
    let rst = h.wait_op(7001, 5001, OP_RST);
    assert_eq!(rst.hdr.len, 0);
    // A stale socket file with no listener is refused too.
    drop(UnixListener::bind(h.sub_path(5002)).expect("bind"));
    h.send(OP_REQUEST, 7002, 5002, b"");
    h.wait_op(7002, 5002, OP_RST);
    assert_eq!(h.dev.metrics().guest_connect_refused.load(Ordering::Relaxed), 2);
}

#[test]
fn guest_credit_limits_what_the_host_sends() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(1024, 1000);
    let all: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    c.write_all(&all).expect("write");
    let mut got = h.recv_data(1024, local, 1000);
    // Out of credit: the device asks for more and sends nothing else.
    h.wait_op(1024, local, OP_CREDIT_REQUEST);
    assert!(h.quiet_for(1024, local, Duration::from_millis(100)));
    while got.len() < all.len() {
        let mut cu = guest_hdr(OP_CREDIT_UPDATE, 1024, local);
        cu.buf_alloc = 1000;
        cu.fwd_cnt = got.len() as u32;
        h.g.send(cu, b"");
        let n = (all.len() - got.len()).min(1000);
        got.extend(h.recv_data(1024, local, n));
        if got.len() < all.len() {
            h.wait_op(1024, local, OP_CREDIT_REQUEST);
        }
    }
    assert_eq!(got, all);
}

/// Bytes of a test stream: position-dependent, so reordering shows.
fn pattern(start: usize, n: usize) -> Vec<u8> {
    (start..start + n).map(|i| (i * 7 % 256) as u8).collect()
}

#[test]
fn host_backpressure_is_bounded_by_credit() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(1024, 65536);
    const TOTAL: usize = 3 * 1024 * 1024;
    const CHUNK: usize = 32 * 1024;
    let mut sent = 0usize;
    let mut peer_fwd = 0u32;
    let peer_alloc = CONN_TX_BUF_SIZE as usize;

    // Send while credit lasts; returns when blocked (credit exhausted and
    // no update in sight) or done.
    let send_some = |h: &mut Harness, sent: &mut usize, peer_fwd: &mut u32, block_ok: bool| loop {
        h.pump();
        for p in h.stash.drain(..) {
            assert_ne!(p.hdr.op, OP_RST, "connection reset");
            if p.hdr.dst_port == 1024 && p.hdr.src_port == local {
                *peer_fwd = p.hdr.fwd_cnt;
            }
        }
        if *sent >= TOTAL {
            return;
        }
        let credit = peer_alloc - (*sent - *peer_fwd as usize);
        if credit >= CHUNK.min(TOTAL - *sent) {
            let n = CHUNK.min(TOTAL - *sent);
            h.send(OP_RW, 1024, local, &pattern(*sent, n));
            *sent += n;
            continue;
        }
        if block_ok && h.g.tx_in_flight() == 0 && h.quiet_for(1024, local, Duration::from_millis(300)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    };

    // Nobody reads: the guest ends up blocked on credit, with at most
    // buf_alloc bytes held by the device beyond the socket buffer.
    send_some(&mut h, &mut sent, &mut peer_fwd, true);
    assert!(sent < TOTAL, "the guest must have been blocked");
    assert!(sent >= peer_alloc, "at least buf_alloc accepted");
    assert!(sent - peer_fwd as usize <= peer_alloc);

    // Now the client reads everything; credit updates let the guest finish.
    let reader = std::thread::spawn(move || {
        let got = read_n(&mut c, TOTAL);
        assert!(got == pattern(0, TOTAL), "data intact and in order");
        c
    });
    send_some(&mut h, &mut sent, &mut peer_fwd, false);
    let _c = reader.join().expect("reader");
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(1024, 65536);
    let chunk = vec![0x5au8; 64 * 1024];
    let mut reset = false;
    for _ in 0..200 {
        h.send(OP_RW, 1024, local, &chunk);
        h.pump();
        if h.stash.iter().any(|p| p.hdr.op == OP_RST && p.hdr.src_port == local) {
            reset = true;
            break;
        }
    }
    if !reset {
        h.wait_op(1024, local, OP_RST);
    }
    // The client gets what made it to the socket, then EOF.
    read_to_eof(&mut c);
}

#[test]
fn malformed_packets_reset_connections() {
    let mut h = Harness::new();
    // len says 100, only 10 bytes follow: the named connection is reset.
    let (mut c, local) = h.host_connect(1024, 65536);
    let mut hdr = guest_hdr(OP_RW, 1024, local);
    hdr.len = 100;
    let mut bytes = hdr.to_bytes().to_vec();
    bytes.extend_from_slice(&[0u8; 10]);
    h.g.queue_tx_raw(&bytes, &[], None);
    h.g.kick(TXQ_INDEX);
    h.wait_op(1024, local, OP_RST);
    assert!(read_to_eof(&mut c).is_empty());

    // Unknown op on a live connection.
    let (mut c, local) = h.host_connect(1025, 65536);
    h.send(0x42, 1025, local, b"");
    h.wait_op(1025, local, OP_RST);
    assert!(read_to_eof(&mut c).is_empty());

    // Header split across descriptors, data in a write-only one.
    let (mut c, local) = h.host_connect(1026, 65536);
    let mut hdr = guest_hdr(OP_RW, 1026, local);
    hdr.len = 4;
    let mut bytes = hdr.to_bytes().to_vec();
    bytes.extend_from_slice(b"data");
    h.g.queue_tx_raw(&bytes, &[7, 30, PKT_HDR_SIZE], Some(3));
    h.g.kick(TXQ_INDEX);
    h.wait_op(1026, local, OP_RST);
    assert!(read_to_eof(&mut c).is_empty());

    // Data for no connection: RST with the ports swapped.
    h.send(OP_RW, 9000, 9001, b"stray");
    h.wait_op(9000, 9001, OP_RST);
    // Not a stream socket: RST.
    let mut seq = guest_hdr(OP_REQUEST, 9002, 9003);
    seq.type_ = 2;
    h.g.send(seq, b"");
    h.wait_op(9002, 9003, OP_RST);
    // Wrong source CID: dropped without an answer, no connection made.
    let listener = UnixListener::bind(h.sub_path(9005)).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let mut spoof = guest_hdr(OP_REQUEST, 9004, 9005);
    spoof.src_cid = 42;
    h.g.send(spoof, b"");
    // A marker packet behind it: once its answer is in, the spoof was handled.
    h.send(OP_RW, 9006, 9007, b"");
    h.wait_op(9006, 9007, OP_RST);
    assert!(!h.stash.iter().any(|p| p.hdr.dst_port == 9004));
    assert_eq!(listener.accept().map(|_| ()).unwrap_err().kind(), ErrorKind::WouldBlock);
    // A too-short descriptor: dropped, the device carries on.
    h.g.queue_tx_raw(&guest_hdr(OP_REQUEST, 1, 2).to_bytes()[..30], &[], None);
    h.g.kick(TXQ_INDEX);
    let (_c, _) = h.host_connect(1027, 65536);
    let m = h.dev.metrics();
    assert_eq!(m.conn_resets.load(Ordering::Relaxed), 3);
    assert_eq!(m.host_connections.load(Ordering::Relaxed), 4);
    assert!(m.tx_malformed.load(Ordering::Relaxed) >= 3);
}

#[test]
fn many_concurrent_connections() {
    const N: u32 = 40;
    let mut h = Harness::new();

    // Host-initiated: all clients connect at once.
    let mut clients: Vec<UnixStream> = (0..N).map(|i| h.client(&format!("CONNECT {}\n", 3000 + i))).collect();
    let mut locals = vec![0u32; N as usize];
    for _ in 0..N {
        let req = h.wait_pkt("REQUEST", |p| p.hdr.op == OP_REQUEST);
        let i = (req.hdr.dst_port - 3000) as usize;
        locals[i] = req.hdr.src_port;
        h.send(OP_RESPONSE, req.hdr.dst_port, req.hdr.src_port, b"");
    }
    let mut uniq = locals.clone();
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(uniq.len(), N as usize, "local ports are unique");
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(read_line(c), format!("OK {}", locals[i]));
        c.write_all(format!("hello {i:03}").as_bytes()).expect("write");
    }

    // Guest-initiated: N connections to one host listener.
    let listener = UnixListener::bind(h.sub_path(6000)).expect("bind");
    for i in 0..N {
        h.send(OP_REQUEST, 8000 + i, 6000, b"");
    }
    for i in 0..N {
        h.wait_op(8000 + i, 6000, OP_RESPONSE);
    }
    let mut accepted: Vec<UnixStream> = (0..N)
        .map(|_| {
            let (s, _) = listener.accept().expect("accept");
            s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            s
        })
        .collect();
    for i in 0..N {
        h.send(OP_RW, 8000 + i, 6000, format!("g{i:03}").as_bytes());
    }

    // Data both ways on every connection.
    for i in 0..N {
        let got = h.recv_data(3000 + i, locals[i as usize], 9);
        assert_eq!(got, format!("hello {i:03}").as_bytes());
        h.send(OP_RW, 3000 + i, locals[i as usize], format!("reply {i:03}").as_bytes());
    }
    for s in &mut accepted {
        let msg = read_n(s, 4);
        s.write_all(&[b"ack:".as_slice(), &msg].concat()).expect("write");
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(read_n(c, 9), format!("reply {i:03}").as_bytes());
    }
    for i in 0..N {
        assert_eq!(h.recv_data(8000 + i, 6000, 8), format!("ack:g{i:03}").as_bytes());
    }

    // Tear everything down from the guest side.
    for i in 0..N {
        h.shutdown(3000 + i, locals[i as usize], SHUTDOWN_BOTH);
        h.shutdown(8000 + i, 6000, SHUTDOWN_BOTH);
    }
    for i in 0..N {
        h.wait_op(3000 + i, locals[i as usize], OP_RST);
        h.wait_op(8000 + i, 6000, OP_RST);
    }
    for c in &mut clients {
        assert!(read_to_eof(c).is_empty());
    }
    for s in &mut accepted {
        assert!(read_to_eof(s).is_empty());
    }
}

#[test]
fn packets_queued_before_activation_are_handled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("v.sock");
    let mut dev = Vsock::new(TEST_GUEST_CID, uds.clone()).expect("vsock");
    // A client connects before the guest driver is up.
    let mut c = UnixStream::connect(&uds).expect("connect");
    c.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    c.write_all(b"CONNECT 1024\n").expect("write");
    let (mut g, queues) = TestGuest::new();
    g.post_rx(8, 4096);
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
    dev.activate(g.mem.clone(), irq, queues).expect("activate");
    let req = wait_for("REQUEST", || g.recv(true).into_iter().find(|p| p.hdr.op == OP_REQUEST));
    g.send(guest_hdr(OP_RESPONSE, 1024, req.hdr.src_port), b"");
    assert_eq!(read_line(&mut c), format!("OK {}", req.hdr.src_port));
    // Device reset drops the connection; the client sees EOF.
    assert!(dev.reset());
    assert!(read_to_eof(&mut c).is_empty());
    let _: Option<VsockHeader> = None;
}

/// Random guest traffic against the real backend, single-threaded (a poor
/// man's fuzzer): nothing panics, and the device still works afterwards.
#[test]
fn random_guest_traffic_never_panics() {
    use super::device::VsockWorker;
    use super::{VsockBackend, VsockUnixBackend};

    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("v.sock");
    let backend = VsockUnixBackend::new(TEST_GUEST_CID, uds.clone()).expect("backend");
    let listeners: Vec<UnixListener> = (0..3)
        .map(|p| {
            let l = UnixListener::bind(format!("{}_{p}", uds.display())).expect("bind");
            l.set_nonblocking(true).expect("nonblocking");
            l
        })
        .collect();
    let (mut g, queues) = TestGuest::new();
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
    let metrics = backend.metrics().clone();
    let mut w = VsockWorker::new(g.mem.clone(), irq, queues, backend, metrics);
    g.post_rx(64, 4096);
    let mut clients = Vec::new();
    let mut accepted = Vec::new();

    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..3000 {
        let r = next();
        let ops = [OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST, 0, 99];
        let mut hdr = guest_hdr(ops[(r % 9) as usize], (r >> 8) as u32 % 4, (r >> 16) as u32 % 4);
        if r & (1 << 30) != 0 {
            // Answer one of the device's host-initiated connections.
            hdr.dst_port = LOCAL_PORT_START + (r >> 20) as u32 % 8;
        }
        hdr.flags = (r >> 24) as u32 % 4;
        hdr.buf_alloc = [0, 1, 4096, u32::MAX][(r >> 40) as usize % 4];
        hdr.fwd_cnt = (next() % 70_000) as u32;
        if (r >> 33) % 8 == 0 {
            hdr.src_cid = r >> 50;
        }
        if (r >> 36) % 8 == 0 {
            hdr.type_ = 2;
        }
        let data = vec![0xa5u8; (next() % 9000) as usize];
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(&data);
        let mut h2 = hdr;
        h2.len = if (r >> 39) % 8 == 0 { (next() % 100_000) as u32 } else { data.len() as u32 };
        bytes[..PKT_HDR_SIZE].copy_from_slice(&h2.to_bytes());
        let cut = (next() % (bytes.len() as u64 + 1)) as usize;
        let wo = if (r >> 42) % 8 == 0 { Some((r >> 37) as usize % 3) } else { None };
        g.queue_tx_raw(&bytes, &[cut, cut + 3], wo);

        // Host side: new clients, client traffic, accepts, hang-ups.
        match (r >> 44) % 16 {
            0 => {
                if let Ok(mut c) = UnixStream::connect(&uds) {
                    c.set_nonblocking(true).expect("nonblocking");
                    let _ = c.write_all(format!("CONNECT {}\n", r % 4).as_bytes());
                    clients.push(c);
                }
            }
            1 if !clients.is_empty() => {
                let i = (r >> 48) as usize % clients.len();
                let _ = clients[i].write(&[1u8; 3000]);
            }
            2 if !clients.is_empty() => {
                let i = (r >> 48) as usize % clients.len();
                drop(clients.swap_remove(i));
            }
            3 => {
                for l in &listeners {
                    if let Ok((s, _)) = l.accept() {
                        s.set_nonblocking(true).expect("nonblocking");
                        accepted.push(s);
                    }
                }
            }
            4 if !accepted.is_empty() => {
                let i = (r >> 48) as usize % accepted.len();
                let _ = accepted[i].write(&[2u8; 5000]);
                let mut sink = [0u8; 8192];
                let _ = accepted[i].read(&mut sink);
            }
            5 if !accepted.is_empty() => {
                let i = (r >> 48) as usize % accepted.len();
                drop(accepted.swap_remove(i));
            }
            _ => {}
        }
        w.process_tx();
        w.backend.process_host_events();
        let later = Instant::now() + Duration::from_secs((r >> 52) % 20);
        if round % 50 == 0 {
            w.backend.process_timeouts(later);
        }
        w.process_rx();
        g.recv(true);
    }

    // The traffic reached the interesting places.
    let m = &w.metrics;
    for (what, c) in [
        ("tx packets", &m.tx_packets),
        ("malformed", &m.tx_malformed),
        ("host connections", &m.host_connections),
        ("guest connections", &m.guest_connections),
        ("resets", &m.conn_resets),
    ] {
        assert!(c.load(Ordering::Relaxed) > 0, "no {what}: {m:?}");
    }
    // Still alive: a clean host connection goes through.
    let mut c = UnixStream::connect(&uds).expect("connect");
    c.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    c.write_all(b"CONNECT 4242\n").expect("write");
    let req = wait_for("REQUEST", || {
        w.backend.process_host_events();
        w.process_rx();
        g.recv(true).into_iter().find(|p| p.hdr.op == OP_REQUEST && p.hdr.dst_port == 4242)
    });
    g.send(guest_hdr(OP_RESPONSE, 4242, req.hdr.src_port), b"");
    w.process_tx();
    assert_eq!(read_line(&mut c), format!("OK {}", req.hdr.src_port));
}

/// A guest flooding the device with connection requests gets at most the
/// connection limit; every request beyond it is answered with RST, and
/// host clients beyond it are closed. RSTs for unknown connections queue up
/// to a bound while the guest posts no rx buffers, and nothing else grows.
#[test]
fn connection_flood_is_bounded() {
    use super::device::VsockWorker;
    use super::{VsockBackend, VsockUnixBackend};

    const LIMIT: usize = 8;
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("v.sock");
    let mut backend = VsockUnixBackend::new(TEST_GUEST_CID, uds.clone()).expect("backend");
    backend.set_max_connections(LIMIT);
    let listener = UnixListener::bind(format!("{}_700", uds.display())).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let (mut g, queues) = TestGuest::new();
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
    let metrics = backend.metrics().clone();
    let mut w = VsockWorker::new(g.mem.clone(), irq, queues, backend, metrics);

    // Twice the limit of REQUESTs, no rx buffers yet.
    for port in 0..2 * LIMIT as u32 {
        g.send(guest_hdr(OP_REQUEST, 5000 + port, 700), b"");
    }
    w.process_tx();
    assert_eq!(w.backend.connection_count(), LIMIT);
    // A host client beyond the limit is closed after its CONNECT line.
    let mut c = UnixStream::connect(&uds).expect("connect");
    c.set_read_timeout(Some(Duration::from_millis(5))).expect("timeout");
    c.write_all(b"CONNECT 1024\n").expect("write");
    wait_for("client closed", || {
        w.backend.process_host_events();
        let mut b = [0u8; 1];
        match c.read(&mut b) {
            Ok(0) => Some(()),
            _ => None,
        }
    });
    assert_eq!(w.backend.connection_count(), LIMIT);

    // RSTs for packets on unknown connections are bounded too.
    for i in 0..(MAX_PENDING_RSTS as u32 + 300) {
        w.backend.send_pkt(&VsockPacket { hdr: guest_hdr(OP_RW, 20_000 + i, 9), data: Vec::new() });
    }
    assert!(w.backend.pending_rsts() <= MAX_PENDING_RSTS);

    // Buffers arrive: LIMIT RESPONSEs, then RST for every refused request.
    let mut got = Vec::new();
    while got.len() < 2 * LIMIT + MAX_PENDING_RSTS {
        g.post_rx(64, 4096);
        w.process_rx();
        let new = g.recv(false);
        if new.is_empty() {
            break;
        }
        got.extend(new);
    }
    let to_flood: Vec<_> = got.iter().filter(|p| p.hdr.src_port == 700).collect();
    let responses = to_flood.iter().filter(|p| p.hdr.op == OP_RESPONSE).count();
    let rsts = to_flood.iter().filter(|p| p.hdr.op == OP_RST).count();
    assert_eq!((responses, rsts), (LIMIT, LIMIT), "{to_flood:?}");
    assert_eq!(w.backend.pending_rsts(), 0);

    // Closing one makes room for the next.
    g.send(guest_hdr(OP_RST, 5000, 700), b"");
    g.send(guest_hdr(OP_REQUEST, 6000, 700), b"");
    w.process_tx();
    g.post_rx(4, 4096);
    w.process_rx();
    let ok = g.recv(false);
    assert!(ok.iter().any(|p| p.hdr.op == OP_RESPONSE && p.hdr.dst_port == 6000), "{ok:?}");
    assert_eq!(w.backend.connection_count(), LIMIT);
}

/// Credit lies: a guest claiming a huge buffer, or a `fwd_cnt` that goes
/// backwards or runs ahead of what it was sent. The device never reads the
/// host stream faster than rx buffers arrive (host memory does not grow with
/// the lie), and a lie that leaves no credit stalls only that connection,
/// without spinning, until an honest update.
#[test]
fn credit_lies_only_hurt_the_liar() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(1024, u32::MAX);
    // Huge buf_alloc: the host writes 1 MiB; the device forwards it in
    // packets no larger than the rx buffers.
    let blob = pattern(0, 1 << 20);
    let writer = {
        let mut c2 = c.try_clone().expect("clone");
        std::thread::spawn(move || c2.write_all(&blob).expect("write"))
    };
    let got = h.recv_data(1024, local, 1 << 20);
    writer.join().expect("writer");
    assert_eq!(got, pattern(0, 1 << 20));

    // fwd_cnt far ahead of what was sent: the in-flight count wraps, which
    // must read as "no credit", not as a huge credit.
    let mut lie = guest_hdr(OP_CREDIT_UPDATE, 1024, local);
    lie.buf_alloc = 4096;
    lie.fwd_cnt = (1 << 20) + 100_000;
    h.g.send(lie, b"");
    c.write_all(b"stalled").expect("write");
    assert!(h.quiet_for(1024, local, Duration::from_millis(300)), "no data without credit");
    // fwd_cnt going backwards: still no credit.
    lie.fwd_cnt = 5;
    h.g.send(lie, b"");
    assert!(h.quiet_for(1024, local, Duration::from_millis(300)));
    // The device is not spinning: other connections are served meanwhile.
    let (mut c2, local2) = h.host_connect(1025, 65536);
    c2.write_all(b"other").expect("write");
    assert_eq!(h.recv_data(1025, local2, 5), b"other");
    // An honest update resumes the stalled connection.
    let mut honest = guest_hdr(OP_CREDIT_UPDATE, 1024, local);
    honest.buf_alloc = 65536;
    honest.fwd_cnt = 1 << 20;
    h.g.send(honest, b"");
    assert_eq!(h.recv_data(1024, local, 7), b"stalled");
}
