//! The connection state machine: one vsock stream between a guest port and a
//! host Unix stream, with virtio-vsock credit accounting in both directions.
//!
//! Guest to host: bytes the Unix stream cannot take at once are buffered, up
//! to our advertised `buf_alloc`. `fwd_cnt` only counts bytes actually
//! written to the stream, so a guest that respects its credit can never
//! overrun the buffer: it simply stops sending on this connection until we
//! forward its data and tell it (CREDIT_UPDATE). A guest that overruns it is
//! reset.
//!
//! Host to guest: we never send more than the guest's credit
//! (`peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`); with no credit left we stop
//! polling the stream for input until a packet from the guest grants more.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use tracing::debug;
use vmm_sys_util::epoll::EventSet;

use super::defs::*;
use super::packet::{VsockHeader, VsockPacket};

/// Where the connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Host-initiated: our REQUEST is pending or sent, no RESPONSE yet.
    LocalInit { request_sent: bool },
    /// Connected (possibly half-closed in either direction).
    Established,
    /// Broken: an RST to the guest is pending, then the connection goes.
    Killing,
    /// Done: the multiplexer drops it.
    Closed,
}

// Packets the connection wants to send to the guest.
const P_REQUEST: u8 = 1 << 0;
const P_RESPONSE: u8 = 1 << 1;
const P_RST: u8 = 1 << 2;
const P_DATA: u8 = 1 << 3;
const P_CREDIT_UPDATE: u8 = 1 << 4;
const P_CREDIT_REQUEST: u8 = 1 << 5;
const P_SHUTDOWN: u8 = 1 << 6;

/// One vsock connection backed by a Unix stream.
#[derive(Debug)]
pub(crate) struct Connection {
    stream: UnixStream,
    pub(crate) local_port: u32,
    pub(crate) peer_port: u32,
    guest_cid: u64,
    pub(crate) state: ConnState,
    /// Whether the host side initiated it (the local port is ours to free).
    pub(crate) host_initiated: bool,

    // Guest-to-host direction (our receive credit).
    buf_alloc: u32,
    fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    tx_buf: VecDeque<u8>,
    /// Bytes at the front of `tx_buf` that are not guest data (the `OK` line).
    tx_buf_prefix: usize,

    // Host-to-guest direction (the guest's receive credit).
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,

    pending: u8,
    shutdown_flags: u32,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// SHUTDOWN flags we sent.
    sent_shutdown: u32,
    /// The stream returned end-of-file.
    stream_eof: bool,
    /// The stream hung up (both directions) or failed; it is out of epoll.
    pub(crate) stream_hup: bool,
    /// We shut down the stream's write side.
    write_shut: bool,
    expiry: Option<Instant>,

    /// The multiplexer's bookkeeping: the interest registered with epoll.
    pub(crate) registered: Option<EventSet>,
    /// The multiplexer's bookkeeping: whether it sits in the rx queue.
    pub(crate) queued: bool,
}

impl Connection {
    fn new(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32, state: ConnState) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            guest_cid,
            state,
            host_initiated: false,
            buf_alloc: CONN_TX_BUF_SIZE,
            fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_buf: VecDeque::new(),
            tx_buf_prefix: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            pending: 0,
            shutdown_flags: 0,
            peer_shutdown: 0,
            sent_shutdown: 0,
            stream_eof: false,
            stream_hup: false,
            write_shut: false,
            expiry: None,
            registered: None,
            queued: false,
        }
    }

    /// A host client asked for guest port `peer_port`: a REQUEST is pending.
    pub(crate) fn new_local(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(stream, guest_cid, local_port, peer_port, ConnState::LocalInit { request_sent: false });
        c.host_initiated = true;
        c.pending = P_REQUEST;
        c
    }

    /// The guest's REQUEST (`hdr`) was connected to a host stream: a RESPONSE
    /// is pending.
    pub(crate) fn new_peer(stream: UnixStream, guest_cid: u64, hdr: &VsockHeader) -> Self {
        let mut c = Self::new(stream, guest_cid, hdr.dst_port, hdr.src_port, ConnState::Established);
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        c.pending = P_RESPONSE;
        c
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Bytes we may still send the guest.
    pub(crate) fn peer_avail_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes we hold that the stream has not taken yet.
    pub(crate) fn tx_buffered(&self) -> usize {
        self.tx_buf.len() - self.tx_buf_prefix
    }

    pub(crate) fn has_pending_rx(&self) -> bool {
        self.pending != 0
    }

    pub(crate) fn expiry(&self) -> Option<Instant> {
        self.expiry
    }

    /// Whether input from the stream may be forwarded to the guest now.
    fn can_read(&self) -> bool {
        self.state == ConnState::Established && !self.stream_eof && self.peer_shutdown & SHUTDOWN_RCV == 0 && self.peer_avail_credit() > 0
    }

    /// The epoll events the multiplexer should wait for (empty: none, but
    /// keep the stream registered to hear of a hang-up). `None`: the stream
    /// must not be polled any more.
    pub(crate) fn interest(&self) -> Option<EventSet> {
        if self.stream_hup || matches!(self.state, ConnState::Killing | ConnState::Closed) {
            return None;
        }
        let mut ev = EventSet::empty();
        if self.can_read() && self.pending & P_DATA == 0 {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        Some(ev)
    }

    /// Resets the connection: an RST goes to the guest and the stream closes.
    pub(crate) fn kill(&mut self) {
        if matches!(self.state, ConnState::Killing | ConnState::Closed) {
            return;
        }
        debug!(local = self.local_port, peer = self.peer_port, "vsock: resetting connection");
        // A REQUEST the guest never saw needs no RST.
        self.state = match self.state {
            ConnState::LocalInit { request_sent: false } => ConnState::Closed,
            _ => ConnState::Killing,
        };
        self.pending = if self.state == ConnState::Killing { P_RST } else { 0 };
        self.close_stream();
    }

    /// Forgets the connection without telling the guest (it sent RST).
    fn close(&mut self) {
        self.state = ConnState::Closed;
        self.pending = 0;
        self.close_stream();
    }

    fn close_stream(&mut self) {
        self.tx_buf.clear();
        self.tx_buf_prefix = 0;
        self.expiry = None;
        // The client sees EOF now even if the connection lingers for its RST.
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// The stream is readable.
    pub(crate) fn notify_readable(&mut self) {
        if self.can_read() {
            self.pending |= P_DATA;
        }
    }

    /// The stream hung up or failed (EPOLLHUP / EPOLLERR): it can take no
    /// more bytes, though unread input may remain.
    pub(crate) fn notify_hup(&mut self, now: Instant) {
        self.stream_hup = true;
        match self.state {
            ConnState::LocalInit { .. } => self.kill(),
            ConnState::Established => {
                if self.stream_eof && self.sent_shutdown != SHUTDOWN_BOTH {
                    self.queue_shutdown(SHUTDOWN_BOTH, now);
                }
                self.refresh();
            }
            ConnState::Killing | ConnState::Closed => {}
        }
    }

    /// The stream is writable: forward buffered guest bytes.
    pub(crate) fn notify_writable(&mut self) {
        self.flush_tx();
        self.refresh();
    }

    /// The deadline passed.
    pub(crate) fn expire(&mut self, now: Instant) {
        if self.expiry.is_some_and(|t| t <= now) {
            crate::guest_warn!(local = self.local_port, peer = self.peer_port, state = ?self.state, "vsock: connection timed out");
            self.expiry = None;
            self.kill();
        }
    }

    fn refresh(&mut self) {
        if self.state != ConnState::Established {
            return;
        }
        // A hung-up stream is out of epoll: poll it ourselves while the guest
        // can take its remaining input.
        if self.stream_hup && self.can_read() {
            self.pending |= P_DATA;
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CONN_CREDIT_UPDATE_THRESHOLD {
            self.pending |= P_CREDIT_UPDATE;
        }
    }

    fn queue_shutdown(&mut self, flags: u32, now: Instant) {
        self.shutdown_flags |= flags;
        self.pending |= P_SHUTDOWN;
        if self.shutdown_flags == SHUTDOWN_BOTH {
            // The guest should answer with RST; don't wait forever.
            self.expiry = Some(now + CONN_SHUTDOWN_TIMEOUT);
        }
    }

    /// Handles a packet the guest sent on this connection.
    pub(crate) fn on_guest_pkt(&mut self, pkt: &VsockPacket, now: Instant) {
        let hdr = &pkt.hdr;
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match self.state {
            ConnState::Killing | ConnState::Closed => return,
            ConnState::LocalInit { .. } => match hdr.op {
                OP_RESPONSE => {
                    self.state = ConnState::Established;
                    self.expiry = None;
                    let line = format!("OK {}\n", self.local_port);
                    self.tx_buf_prefix = line.len();
                    self.tx_buf.extend(line.as_bytes());
                    self.flush_tx();
                }
                OP_RST => self.close(),
                op => {
                    crate::guest_warn!(op, "vsock: unexpected packet while connecting");
                    self.kill();
                }
            },
            ConnState::Established => match hdr.op {
                OP_RW => self.on_guest_data(&pkt.data),
                OP_CREDIT_UPDATE => {}
                OP_CREDIT_REQUEST => self.pending |= P_CREDIT_UPDATE,
                OP_SHUTDOWN => {
                    self.peer_shutdown |= hdr.flags & SHUTDOWN_BOTH;
                    if self.peer_shutdown == SHUTDOWN_BOTH && self.expiry.is_none() {
                        self.expiry = Some(now + CONN_SHUTDOWN_TIMEOUT);
                    }
                    // Half-close the stream, or finish, once buffered bytes are out.
                    self.flush_tx();
                }
                OP_RST => self.close(),
                op => {
                    crate::guest_warn!(op, "vsock: unexpected packet on an established connection");
                    self.kill();
                }
            },
        }
        self.refresh();
    }

    fn on_guest_data(&mut self, data: &[u8]) {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            crate::guest_warn!("vsock: guest sent data after SHUTDOWN(SEND)");
            self.kill();
            return;
        }
        let len = data.len();
        if self.tx_buffered() + len > self.buf_alloc as usize {
            crate::guest_warn!(
                local = self.local_port,
                peer = self.peer_port,
                len,
                buffered = self.tx_buffered(),
                "vsock: guest exceeded its credit"
            );
            self.kill();
            return;
        }
        self.rx_cnt += Wrapping(u32::try_from(len).unwrap_or(u32::MAX));
        if self.write_shut {
            self.kill();
            return;
        }
        if self.tx_buf.is_empty() {
            // Fast path: straight to the stream, buffer only the remainder.
            match send_nosignal(self.stream.as_raw_fd(), data) {
                Ok(n) => {
                    self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                    self.tx_buf.extend(&data[n..]);
                }
                Err(e) if is_transient(&e) => self.tx_buf.extend(data),
                Err(e) => {
                    debug!("vsock: stream write failed: {e}");
                    self.kill();
                }
            }
        } else {
            self.tx_buf.extend(data);
        }
        self.after_flush();
    }

    /// Writes as much of `tx_buf` to the stream as it takes.
    fn flush_tx(&mut self) {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match send_nosignal(self.stream.as_raw_fd(), front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let prefix = n.min(self.tx_buf_prefix);
                    self.tx_buf_prefix -= prefix;
                    self.fwd_cnt += Wrapping(u32::try_from(n - prefix).unwrap_or(u32::MAX));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_transient(&e) => break,
                Err(e) => {
                    debug!("vsock: stream write failed: {e}");
                    self.kill();
                    return;
                }
            }
        }
        self.after_flush();
    }

    fn after_flush(&mut self) {
        if self.state != ConnState::Established || !self.tx_buf.is_empty() {
            return;
        }
        if self.peer_shutdown == SHUTDOWN_BOTH {
            // The guest closed and everything it sent is out: done.
            self.kill();
            return;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.write_shut {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.write_shut = true;
        }
    }

    fn fill_hdr(&mut self, hdr: &mut VsockHeader, op: u16) {
        *hdr = VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt.0,
        };
        // Every packet tells the guest our fwd_cnt.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !P_CREDIT_UPDATE;
    }

    /// Produces the next packet for the guest, if any, with at most
    /// `max_data` bytes of payload.
    pub(crate) fn next_rx_pkt(&mut self, pkt: &mut VsockPacket, max_data: usize, now: Instant) -> bool {
        pkt.data.clear();
        if self.pending & P_RST != 0 {
            self.fill_hdr(&mut pkt.hdr, OP_RST);
            self.pending = 0;
            self.state = ConnState::Closed;
            return true;
        }
        if self.pending & P_REQUEST != 0 {
            self.pending &= !P_REQUEST;
            self.fill_hdr(&mut pkt.hdr, OP_REQUEST);
            self.state = ConnState::LocalInit { request_sent: true };
            self.expiry = Some(now + CONN_REQUEST_TIMEOUT);
            return true;
        }
        if self.pending & P_RESPONSE != 0 {
            self.pending &= !P_RESPONSE;
            self.fill_hdr(&mut pkt.hdr, OP_RESPONSE);
            return true;
        }
        if self.pending & P_DATA != 0 {
            if self.read_data(pkt, max_data, now) {
                return true;
            }
            if self.pending & P_RST != 0 {
                return self.next_rx_pkt(pkt, max_data, now);
            }
        }
        if self.pending & P_CREDIT_UPDATE != 0 {
            self.fill_hdr(&mut pkt.hdr, OP_CREDIT_UPDATE);
            return true;
        }
        if self.pending & P_CREDIT_REQUEST != 0 {
            self.pending &= !P_CREDIT_REQUEST;
            self.fill_hdr(&mut pkt.hdr, OP_CREDIT_REQUEST);
            return true;
        }
        if self.pending & P_SHUTDOWN != 0 {
            self.pending &= !P_SHUTDOWN;
            self.fill_hdr(&mut pkt.hdr, OP_SHUTDOWN);
            pkt.hdr.flags = self.shutdown_flags;
            self.sent_shutdown |= self.shutdown_flags;
            return true;
        }
        false
    }

    /// Reads stream input into an RW packet; false if there was none.
    fn read_data(&mut self, pkt: &mut VsockPacket, max_data: usize, now: Instant) -> bool {
        if !self.can_read() || max_data == 0 {
            self.pending &= !P_DATA;
            return false;
        }
        let want = max_data.min(self.peer_avail_credit() as usize);
        pkt.data.resize(want, 0);
        loop {
            match self.stream.read(&mut pkt.data[..want]) {
                Ok(0) => {
                    pkt.data.clear();
                    self.pending &= !P_DATA;
                    self.stream_eof = true;
                    // The client shut its write side; if it also hung up, the
                    // connection is over once the guest hears of it.
                    let flags = if self.stream_hup { SHUTDOWN_BOTH } else { SHUTDOWN_SEND };
                    self.queue_shutdown(flags, now);
                    return false;
                }
                Ok(n) => {
                    pkt.data.truncate(n);
                    self.fill_hdr(&mut pkt.hdr, OP_RW);
                    pkt.hdr.len = u32::try_from(n).unwrap_or(u32::MAX);
                    self.tx_cnt += Wrapping(pkt.hdr.len);
                    // Keep P_DATA: the next attempt finds more or EAGAIN.
                    if self.peer_avail_credit() == 0 {
                        self.pending &= !P_DATA;
                        self.pending |= P_CREDIT_REQUEST;
                    }
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_transient(&e) => {
                    pkt.data.clear();
                    self.pending &= !P_DATA;
                    return false;
                }
                Err(e) => {
                    debug!("vsock: stream read failed: {e}");
                    pkt.data.clear();
                    self.kill();
                    return false;
                }
            }
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// `send(2)` without SIGPIPE (the peer may be gone) and without blocking.
pub(crate) fn send_nosignal(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live slice valid for reads of `buf.len()` bytes, and
    // `send` does not keep the pointer; `fd` is a socket the caller owns.
    let r = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::io::Write;

    fn guest_hdr(op: u16, local: u32, peer: u32) -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: peer,
            dst_port: local,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 65536,
            ..Default::default()
        }
    }

    fn pkt(op: u16, data: &[u8]) -> VsockPacket {
        let mut hdr = guest_hdr(op, 1024, 5000);
        hdr.len = data.len() as u32;
        VsockPacket { hdr, data: data.to_vec() }
    }

    fn established() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        let mut c = Connection::new_peer(a, 3, &guest_hdr(OP_REQUEST, 1024, 5000));
        let mut out = VsockPacket::default();
        let now = Instant::now();
        assert!(c.next_rx_pkt(&mut out, 4096, now));
        assert_eq!(out.hdr.op, OP_RESPONSE);
        assert_eq!((out.hdr.src_port, out.hdr.dst_port), (1024, 5000));
        (c, b)
    }

    #[test]
    fn data_and_credit_both_ways() {
        let (mut c, mut host) = established();
        let now = Instant::now();
        c.on_guest_pkt(&pkt(OP_RW, b"hello"), now);
        let mut buf = [0u8; 5];
        host.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hello");
        assert_eq!(c.fwd_cnt.0, 5);

        host.write_all(b"world!").expect("write");
        assert_eq!(c.interest(), Some(EventSet::IN));
        c.notify_readable();
        let mut out = VsockPacket::default();
        assert!(c.next_rx_pkt(&mut out, 4, now));
        assert_eq!((out.hdr.op, out.hdr.len, &out.data[..]), (OP_RW, 4, &b"worl"[..]));
        assert_eq!(out.hdr.fwd_cnt, 5);
        assert!(c.next_rx_pkt(&mut out, 4096, now));
        assert_eq!(&out.data[..], b"d!");
        // EAGAIN: nothing more, poll again.
        assert!(!c.next_rx_pkt(&mut out, 4096, now));
        assert_eq!(c.interest(), Some(EventSet::IN));
        assert_eq!(c.tx_cnt.0, 6);
    }

    #[test]
    fn guest_credit_limits_reads() {
        let (mut c, mut host) = established();
        let now = Instant::now();
        let mut p = pkt(OP_CREDIT_UPDATE, b"");
        p.hdr.buf_alloc = 3;
        c.on_guest_pkt(&p, now);
        host.write_all(b"abcdef").expect("write");
        c.notify_readable();
        let mut out = VsockPacket::default();
        assert!(c.next_rx_pkt(&mut out, 4096, now));
        assert_eq!(&out.data[..], b"abc");
        // Out of credit: ask for more, stop polling input.
        assert!(c.next_rx_pkt(&mut out, 4096, now));
        assert_eq!(out.hdr.op, OP_CREDIT_REQUEST);
        assert!(!c.has_pending_rx());
        assert_eq!(c.interest(), Some(EventSet::empty()));
        // The guest consumed 3 bytes.
        p.hdr.fwd_cnt = 3;
        c.on_guest_pkt(&p, now);
        assert_eq!(c.interest(), Some(EventSet::IN));
        c.notify_readable();
        assert!(c.next_rx_pkt(&mut out, 4096, now));
        assert_eq!(&out.data[..], b"def");
    }

    #[test]
    fn credit_update_after_threshold_and_on_request() {
        let (mut c, mut host) = established();
        let now = Instant::now();
        let mut out = VsockPacket::default();
        c.on_guest_pkt(&pkt(OP_CREDIT_REQUEST, b""), now);
        assert!(c.next_rx_pkt(&mut out, 4096, now));
        assert_eq!(out.hdr.op, OP_CREDIT_UPDATE);
        assert_eq!(out.hdr.buf_alloc, CONN_TX_BUF_SIZE);

        let chunk = vec![7u8; 16 * 1024];
        let mut drained = 0;
        let mut sink = vec![0u8; 64 * 1024];
        while (c.fwd_cnt.0) < CONN_CREDIT_UPDATE_THRESHOLD {
            c.on_guest_pkt(&pkt(OP_RW, &chunk), now);
            while c.tx_buffered() > 0 || drained < c.rx_cnt.0 as usize {
                drained += host.read(&mut sink).expect("read");
                c.notify_writable();
            }
        }
        assert!(c.has_pending_rx());
        assert!(c.next_rx_pkt(&mut out, 4096, now));
        assert_eq!(out.hdr.op, OP_CREDIT_UPDATE);
        assert_eq!(out.hdr.fwd_cnt, c.fwd_cnt.0);
    }

    #[test]
    fn buffers_when_stream_full_and_resets_on_overrun() {
        let (mut c, mut host) = established();
        let now = Instant::now();
        let chunk = vec![1u8; 64 * 1024];
        // Fill the socket buffer; the rest stays with us, within buf_alloc.
        let mut sent = 0usize;
        while c.tx_buffered() == 0 {
            c.on_guest_pkt(&pkt(OP_RW, &chunk), now);
            sent += chunk.len();
        }
        assert_eq!(c.interest(), Some(EventSet::IN | EventSet::OUT));
        assert!((c.fwd_cnt.0 as usize) < sent);
        // Drain on the host side; EPOLLOUT flushes.
        let mut got = 0usize;
        let mut sink = vec![0u8; 64 * 1024];
        while got < sent {
            got += host.read(&mut sink).expect("read");
            c.notify_writable();
        }
        assert_eq!(c.tx_buffered(), 0);
        assert_eq!(c.fwd_cnt.0 as usize, sent);

        // A guest ignoring its credit is reset.
        while c.state == ConnState::Established {
            c.on_guest_pkt(&pkt(OP_RW, &chunk), now);
        }
        assert_eq!(c.state, ConnState::Killing);
        let mut out = VsockPacket::default();
        assert!(c.next_rx_pkt(&mut out, 4096, now));
        assert_eq!(out.hdr.op, OP_RST);
        assert_eq!(c.state, ConnState::Closed);
    }

    #[test]
    fn host_half_close_then_hangup() {
        let (mut c, host) = established();
        let now = Instant::now();
        host.shutdown(Shutdown::Write).expect("shutdown");
        c.notify_readable();
        let mut out = VsockPacket::default();
        assert!(c.next_rx_pkt(&mut out, 4096, now));
        assert_eq!((out.hdr.op, out.hdr.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        assert_eq!(c.interest(), Some(EventSet::empty()));
        // The guest may still send.
        c.on_guest_pkt(&pkt(OP_RW, b"late"), now);
        assert_eq!(c.state, ConnState::Established);
        drop(host);
        c.notify_hup(now);
        assert!(c.next_rx_pkt(&mut out, 4096, now));
        assert_eq!((out.hdr.op, out.hdr.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
        assert_eq!(c.interest(), None);
        // No RST from the guest in time: we reset.
        c.expire(now + CONN_SHUTDOWN_TIMEOUT);
        assert!(c.next_rx_pkt(&mut out, 4096, now));
        assert_eq!(out.hdr.op, OP_RST);
    }

    #[test]
    fn guest_shutdown_send_half_closes_stream() {
        let (mut c, mut host) = established();
        let now = Instant::now();
        c.on_guest_pkt(&pkt(OP_RW, b"bye"), now);
        let mut s = pkt(OP_SHUTDOWN, b"");
        s.hdr.flags = SHUTDOWN_SEND;
        c.on_guest_pkt(&s, now);
        let mut all = Vec::new();
        host.read_to_end(&mut all).expect("read to EOF");
        assert_eq!(all, b"bye");
        // Host can still answer.
        host.write_all(b"ack").expect("write");
        c.notify_readable();
        let mut out = VsockPacket::default();
        assert!(c.next_rx_pkt(&mut out, 4096, now));
        assert_eq!(&out.data[..], b"ack");
        // Full shutdown: RST once flushed.
        s.hdr.flags = SHUTDOWN_BOTH;
        c.on_guest_pkt(&s, now);
        assert_eq!(c.state, ConnState::Killing);
        assert!(c.next_rx_pkt(&mut out, 4096, now));
        assert_eq!(out.hdr.op, OP_RST);
    }

    #[test]
    fn local_init_handshake() {
        let (a, mut client) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        let mut c = Connection::new_local(a, 3, LOCAL_PORT_START, 52);
        let now = Instant::now();
        let mut out = VsockPacket::default();
        assert!(c.next_rx_pkt(&mut out, 4096, now));
        assert_eq!((out.hdr.op, out.hdr.dst_port, out.hdr.src_port), (OP_REQUEST, 52, LOCAL_PORT_START));
        assert!(c.expiry().is_some());
        let mut resp = pkt(OP_RESPONSE, b"");
        resp.hdr.src_port = 52;
        resp.hdr.dst_port = LOCAL_PORT_START;
        c.on_guest_pkt(&resp, now);
        assert_eq!(c.state, ConnState::Established);
        let mut line = [0u8; 14];
        client.read_exact(&mut line).expect("read");
        assert_eq!(&line, format!("OK {}\n", LOCAL_PORT_START).as_bytes());
        // The OK line is not guest data.
        assert_eq!(c.fwd_cnt.0, 0);

        // A second handshake that the guest refuses.
        let (a, mut client) = UnixStream::pair().expect("pair");
        let mut c = Connection::new_local(a, 3, LOCAL_PORT_START + 1, 52);
        assert!(c.next_rx_pkt(&mut out, 4096, now));
        c.on_guest_pkt(&pkt(OP_RST, b""), now);
        assert_eq!(c.state, ConnState::Closed);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).expect("EOF");
        assert!(rest.is_empty());
    }

    #[test]
    fn protocol_errors_reset() {
        let (mut c, _host) = established();
        c.on_guest_pkt(&pkt(0x99, b""), Instant::now());
        assert_eq!(c.state, ConnState::Killing);
        let (mut c, _host) = established();
        c.on_guest_pkt(&pkt(OP_REQUEST, b""), Instant::now());
        assert_eq!(c.state, ConnState::Killing);
        let (mut c, _host) = established();
        c.on_guest_pkt(&pkt(OP_RST, b""), Instant::now());
        assert_eq!(c.state, ConnState::Closed);
        assert!(!c.has_pending_rx());
    }
}
