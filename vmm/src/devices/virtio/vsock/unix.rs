//! The hybrid-vsock backend: a multiplexer between guest vsock connections
//! and host Unix sockets.
//!
//! It owns the listener at `uds_path`, the clients still sending their
//! `CONNECT <port>\n` line, and every [`Connection`]. All their file
//! descriptors sit in the backend's own epoll set, whose descriptor the
//! device's worker polls (see [`VsockBackend::poll_fd`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tracing::debug;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::csm::{ConnState, Connection};
use super::defs::*;
use super::metrics::VsockMetrics;
use super::packet::{VsockHeader, VsockPacket};
use super::{VsockBackend, VsockError};

/// (local port, peer port): local is the host side, peer the guest side.
type ConnKey = (u32, u32);

const LISTENER_TOKEN: u64 = u64::MAX;

#[derive(Debug, Clone, Copy)]
enum FdOwner {
    Client,
    Conn(ConnKey),
}

/// A host client that has not finished its `CONNECT <port>\n` line.
#[derive(Debug)]
struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

#[derive(Debug)]
enum RxItem {
    Conn(ConnKey),
    Rst(VsockHeader),
}

/// The hybrid-vsock backend over Unix sockets.
#[derive(Debug)]
pub struct VsockUnixBackend {
    guest_cid: u64,
    path: PathBuf,
    /// (device, inode) of the socket file we created, to remove only ours.
    path_id: Option<(u64, u64)>,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    clients: HashMap<RawFd, PendingClient>,
    fds: HashMap<RawFd, FdOwner>,
    rxq: VecDeque<RxItem>,
    pending_rsts: usize,
    local_ports: HashSet<u32>,
    next_local_port: u32,
    /// The most connections at once ([`MAX_CONNECTIONS`]; lower in tests).
    max_connections: usize,
    metrics: Arc<VsockMetrics>,
}

impl VsockUnixBackend {
    /// Listens on `path` for host clients of a guest with CID `guest_cid`.
    ///
    /// A socket file nobody listens on any more is replaced; a live one is
    /// an error ([`VsockError::AddrInUse`]).
    pub fn new(guest_cid: u64, path: PathBuf) -> Result<Self, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let bind_err = |source| VsockError::Bind { path: path.clone(), source };
        match std::fs::symlink_metadata(&path) {
            Ok(md) if md.file_type().is_socket() => {
                if UnixStream::connect(&path).is_ok() {
                    return Err(VsockError::AddrInUse(path));
                }
                debug!(path = %path.display(), "vsock: removing stale socket");
                std::fs::remove_file(&path).map_err(bind_err)?;
            }
            Ok(_) => return Err(VsockError::NotASocket(path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(&path).map_err(bind_err)?;
        let path_id = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        listener.set_nonblocking(true).map_err(bind_err)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll.ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, LISTENER_TOKEN)).map_err(VsockError::Epoll)?;
        Ok(VsockUnixBackend {
            guest_cid,
            path,
            path_id,
            listener,
            epoll,
            conns: HashMap::new(),
            clients: HashMap::new(),
            fds: HashMap::new(),
            rxq: VecDeque::new(),
            pending_rsts: 0,
            local_ports: HashSet::new(),
            next_local_port: LOCAL_PORT_START,
            max_connections: MAX_CONNECTIONS,
            metrics: Arc::default(),
        })
    }

    /// The listener's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The backend's counters (shared with the device built on it).
    pub fn metrics(&self) -> &Arc<VsockMetrics> {
        &self.metrics
    }

    /// Number of live connections (including those being set up or torn down).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Lowers the connection limit (tests: a flood without 1024 sockets).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn set_max_connections(&mut self, n: usize) {
        self.max_connections = n.min(MAX_CONNECTIONS);
    }

    /// RSTs waiting for an rx buffer.
    #[cfg(test)]
    pub(crate) fn pending_rsts(&self) -> usize {
        self.pending_rsts
    }

    fn accept_clients(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ECONNABORTED, EMFILE...: try again on the next event.
                    crate::guest_warn!("vsock: accept failed: {e}");
                    return;
                }
            };
            if self.clients.len() >= MAX_PENDING_CLIENTS {
                crate::guest_warn!("vsock: too many clients in handshake, dropping one");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                crate::guest_warn!("vsock: cannot make client non-blocking: {e}");
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, fd_token(fd))) {
                crate::guest_warn!("vsock: cannot poll client: {e}");
                continue;
            }
            self.fds.insert(fd, FdOwner::Client);
            self.clients.insert(fd, PendingClient { stream, line: Vec::new(), deadline: Instant::now() + CONNECT_LINE_TIMEOUT });
        }
    }

    fn drop_client(&mut self, fd: RawFd) {
        if self.clients.remove(&fd).is_some() {
            self.fds.remove(&fd);
            // Closing the fd takes it out of the epoll set.
        }
    }

    /// Reads the `CONNECT <port>\n` line, byte by byte so nothing after it
    /// is consumed.
    fn client_readable(&mut self, fd: RawFd) {
        let Some(client) = self.clients.get_mut(&fd) else { return };
        let mut byte = [0u8; 1];
        let port = loop {
            match client.stream.read(&mut byte) {
                Ok(0) => return self.drop_client(fd),
                Ok(_) if byte[0] == b'\n' => match parse_connect(&client.line) {
                    Some(p) => break p,
                    None => {
                        crate::guest_warn!(line = %String::from_utf8_lossy(&client.line), "vsock: bad CONNECT line");
                        return self.drop_client(fd);
                    }
                },
                Ok(_) => {
                    client.line.push(byte[0]);
                    if client.line.len() > MAX_CONNECT_LINE {
                        crate::guest_warn!("vsock: CONNECT line too long");
                        return self.drop_client(fd);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.drop_client(fd),
            }
        };
        let Some(client) = self.clients.remove(&fd) else { return };
        self.fds.remove(&fd);
        if self.conns.len() >= self.max_connections {
            crate::guest_warn!("vsock: too many connections, refusing a host client");
            return;
        }
        let Some(local_port) = self.alloc_local_port(port) else {
            crate::guest_warn!("vsock: no free local port");
            return;
        };
        debug!(local_port, port, "vsock: host connect");
        VsockMetrics::inc(&self.metrics.host_connections);
        let mut conn = Connection::new_local(client.stream, self.guest_cid, local_port, port);
        // The fd is still in the epoll set; the connection takes it over.
        conn.registered = Some(EventSet::IN);
        let key = (local_port, port);
        self.local_ports.insert(local_port);
        self.fds.insert(conn.fd(), FdOwner::Conn(key));
        self.conns.insert(key, conn);
        self.after_conn_op(key);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=self.max_connections {
            let p = self.next_local_port;
            self.next_local_port = if p == u32::MAX { LOCAL_PORT_START } else { p + 1 };
            if !self.local_ports.contains(&p) && !self.conns.contains_key(&(p, peer_port)) {
                return Some(p);
            }
        }
        None
    }

    /// Brings epoll, the rx queue and the maps in line with the connection's
    /// state after something happened to it.
    fn after_conn_op(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if conn.state == ConnState::Closed {
            let conn = self.conns.remove(&key);
            if let Some(conn) = conn {
                if conn.registered.is_some() {
                    let _ = self.epoll.ctl(ControlOperation::Delete, conn.fd(), EpollEvent::default());
                }
                self.fds.remove(&conn.fd());
                if conn.host_initiated {
                    self.local_ports.remove(&conn.local_port);
                }
            }
            return;
        }
        let want = conn.interest();
        if want != conn.registered {
            let fd = conn.fd();
            let res = match (conn.registered, want) {
                (None, Some(ev)) => self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, fd_token(fd))),
                (Some(_), Some(ev)) => self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(ev, fd_token(fd))),
                (Some(_), None) => self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
                (None, None) => Ok(()),
            };
            match res {
                Ok(()) => conn.registered = want,
                Err(e) => {
                    crate::guest_warn!("vsock: epoll update failed: {e}");
                    conn.kill();
                    let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                    conn.registered = None;
                }
            }
        }
        if conn.has_pending_rx() && !conn.queued {
            conn.queued = true;
            self.rxq.push_back(RxItem::Conn(key));
        }
    }

    fn queue_rst_reply(&mut self, hdr: &VsockHeader) {
        if hdr.op == OP_RST {
            return;
        }
        if self.pending_rsts >= MAX_PENDING_RSTS {
            crate::guest_warn!("vsock: too many pending resets, dropping one");
            return;
        }
        self.pending_rsts += 1;
        self.rxq.push_back(RxItem::Rst(VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }));
    }

    /// A guest REQUEST for host port `hdr.dst_port`: connect to `<path>_<port>`.
    fn guest_connect(&mut self, hdr: &VsockHeader) {
        if self.conns.len() >= self.max_connections {
            crate::guest_warn!("vsock: too many connections, refusing a guest request");
            return self.queue_rst_reply(hdr);
        }
        let mut target = OsString::from(self.path.as_os_str());
        target.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(Path::new(&target)) {
            Ok(s) => s,
            Err(e) => {
                VsockMetrics::inc(&self.metrics.guest_connect_refused);
                debug!(port = hdr.dst_port, "vsock: guest connect to {} failed: {e}", Path::new(&target).display());
                return self.queue_rst_reply(hdr);
            }
        };
        debug!(port = hdr.dst_port, guest_port = hdr.src_port, "vsock: guest connect");
        VsockMetrics::inc(&self.metrics.guest_connections);
        let key = (hdr.dst_port, hdr.src_port);
        let conn = Connection::new_peer(stream, self.guest_cid, hdr);
        self.fds.insert(conn.fd(), FdOwner::Conn(key));
        self.conns.insert(key, conn);
        self.after_conn_op(key);
    }
}

fn fd_token(fd: RawFd) -> u64 {
    u64::from(fd.unsigned_abs())
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"CONNECT ")?;
    std::str::from_utf8(rest).ok()?.trim().parse().ok()
}

/// Connects to a Unix stream socket without blocking: a listener whose
/// backlog is full fails (EAGAIN) instead of stalling the device.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path too long"));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or_default();
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own; the UnixStream closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un, `len` does not exceed its size,
    // and `fd` is an open socket.
    let r = unsafe {
        libc::connect(fd, std::ptr::addr_of!(addr).cast::<libc::sockaddr>(), libc::socklen_t::try_from(len).unwrap_or(libc::socklen_t::MAX))
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

impl VsockBackend for VsockUnixBackend {
    fn send_pkt(&mut self, pkt: &VsockPacket) {
        let hdr = &pkt.hdr;
        if hdr.dst_cid != HOST_CID || hdr.src_cid != self.guest_cid {
            crate::guest_warn!(src = hdr.src_cid, dst = hdr.dst_cid, "vsock: dropping packet with wrong CIDs");
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            crate::guest_warn!(type_ = hdr.type_, "vsock: unsupported socket type");
            return self.queue_rst_reply(hdr);
        }
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.on_guest_pkt(pkt, Instant::now());
            return self.after_conn_op(key);
        }
        match hdr.op {
            OP_REQUEST => self.guest_connect(hdr),
            OP_RST => {}
            op => {
                debug!(op, port = hdr.dst_port, "vsock: packet for no connection");
                self.queue_rst_reply(hdr);
            }
        }
    }

    fn bad_pkt(&mut self, hdr: &VsockHeader) {
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.src_cid == self.guest_cid {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.kill();
                self.after_conn_op(key);
            }
        }
    }

    fn recv_pkt(&mut self, pkt: &mut VsockPacket, max_data: usize) -> bool {
        let now = Instant::now();
        while let Some(item) = self.rxq.pop_front() {
            match item {
                RxItem::Rst(hdr) => {
                    self.pending_rsts -= 1;
                    pkt.hdr = hdr;
                    pkt.data.clear();
                    return true;
                }
                RxItem::Conn(key) => {
                    let Some(conn) = self.conns.get_mut(&key) else { continue };
                    conn.queued = false;
                    let got = conn.next_rx_pkt(pkt, max_data, now);
                    if got && pkt.hdr.op == OP_RST {
                        VsockMetrics::inc(&self.metrics.conn_resets);
                    }
                    self.after_conn_op(key);
                    if got {
                        return true;
                    }
                }
            }
        }
        false
    }

    fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    crate::guest_warn!("vsock: backend epoll_wait: {e}");
                }
                return;
            }
        };
        let now = Instant::now();
        for ev in &events[..n] {
            if ev.data() == LISTENER_TOKEN {
                self.accept_clients();
                continue;
            }
            let Ok(fd) = RawFd::try_from(ev.data()) else { continue };
            let set = ev.event_set();
            match self.fds.get(&fd).copied() {
                Some(FdOwner::Client) => {
                    if set.intersects(EventSet::HANG_UP | EventSet::ERROR) && !set.contains(EventSet::IN) {
                        self.drop_client(fd);
                    } else {
                        self.client_readable(fd);
                    }
                }
                Some(FdOwner::Conn(key)) => {
                    let Some(conn) = self.conns.get_mut(&key) else { continue };
                    if set.contains(EventSet::OUT) {
                        conn.notify_writable();
                    }
                    if set.contains(EventSet::IN) {
                        conn.notify_readable();
                    }
                    if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                        conn.notify_hup(now);
                    }
                    self.after_conn_op(key);
                }
                None => {
                    // Stale event for an fd we already dropped.
                }
            }
        }
    }

    fn next_timeout(&self) -> Option<Instant> {
        let conns = self.conns.values().filter_map(Connection::expiry);
        let clients = self.clients.values().map(|c| c.deadline);
        conns.chain(clients).min()
    }

    fn process_timeouts(&mut self, now: Instant) {
        let expired: Vec<RawFd> = self.clients.iter().filter(|(_, c)| c.deadline <= now).map(|(fd, _)| *fd).collect();
        for fd in expired {
            crate::guest_warn!("vsock: client sent no CONNECT line in time");
            self.drop_client(fd);
        }
        let due: Vec<ConnKey> = self.conns.iter().filter(|(_, c)| c.expiry().is_some_and(|t| t <= now)).map(|(k, _)| *k).collect();
        for key in due {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.expire(now);
            }
            self.after_conn_op(key);
        }
    }

    fn reset(&mut self) {
        for (_, conn) in self.conns.drain() {
            if conn.registered.is_some() {
                let _ = self.epoll.ctl(ControlOperation::Delete, conn.fd(), EpollEvent::default());
            }
        }
        for (fd, _) in self.clients.drain() {
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.fds.clear();
        self.rxq.clear();
        self.pending_rsts = 0;
        self.local_ports.clear();
    }
}

impl Drop for VsockUnixBackend {
    fn drop(&mut self) {
        // Remove the socket file unless someone replaced it meanwhile.
        let ours = std::fs::metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.path_id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT x"), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
    }

    #[test]
    fn bind_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        assert!(matches!(VsockUnixBackend::new(2, path.clone()), Err(VsockError::InvalidCid(2))));
        assert!(matches!(VsockUnixBackend::new(u64::from(u32::MAX), path.clone()), Err(VsockError::InvalidCid(_))));

        let b = VsockUnixBackend::new(3, path.clone()).expect("bind");
        // Live listener: refused.
        assert!(matches!(VsockUnixBackend::new(3, path.clone()), Err(VsockError::AddrInUse(_))));
        drop(b);
        assert!(!path.exists(), "socket file removed on drop");

        // Stale socket file: replaced.
        let stale = UnixListener::bind(&path).expect("bind");
        drop(stale);
        assert!(path.exists());
        let b = VsockUnixBackend::new(3, path.clone()).expect("rebind over stale socket");
        drop(b);

        // A regular file is left alone.
        std::fs::write(&path, b"x").expect("write");
        assert!(matches!(VsockUnixBackend::new(3, path.clone()), Err(VsockError::NotASocket(_))));
        assert!(path.exists());
    }

    #[test]
    fn nonblocking_connect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t_5");
        assert!(connect_nonblocking(&path).is_err());
        let l = UnixListener::bind(&path).expect("bind");
        let s = connect_nonblocking(&path).expect("connect");
        let (mut a, _) = l.accept().expect("accept");
        let mut s2 = &s;
        std::io::Write::write_all(&mut s2, b"hi").expect("write");
        let mut buf = [0u8; 2];
        a.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hi");
    }
}
