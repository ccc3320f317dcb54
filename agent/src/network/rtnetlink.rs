//! A blocking rtnetlink socket that makes few system calls: requests are
//! sent many to one `send`, and answers read many to one `recvmmsg`.
//!
//! rtnetlink handles a request inside the `send` that carries it, so when
//! `send` returns, every acknowledgement of the batch is already queued on
//! the socket; `recvmmsg` with MSG_WAITFORONE then takes them all at once.
//! A link dump works the same way: the kernel fills the next part of it
//! while the previous one is being received.

use std::io;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, RawFd};

use netlink_packet_core::{
    ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_route::link::{LinkFlags, LinkMessage, LinkMessageBuffer};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use nix::errno::Errno;
use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, NetlinkAddr};

use super::plan::{Link, Request};
use super::NetworkError;

/// From linux/if_link.h (the libc crate has them only for Android).
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
/// From linux/rtnetlink.h.
const RTM_NEWLINK: u16 = 16;

/// Receive slots for a link dump. A part of a dump is at most as big as
/// the largest buffer offered before (the kernel sizes them on it), and
/// a link takes ~1.5 KiB: a guest's few links come in one or two parts.
const DUMP_SLOTS: usize = 4;
const DUMP_SLOT_SIZE: usize = 8192;
/// How often a dump that the kernel says changed underway is retried.
const DUMP_ATTEMPTS: usize = 3;

/// Requests per send. Each acknowledgement takes a receive-buffer slot
/// (~1 KiB of the default ~208 KiB): far fewer than would overflow it.
const BATCH: usize = 32;
/// An acknowledgement is a header, an errno and, for a refusal, our
/// request echoed back (a few hundred bytes at most).
const ACK_SLOT_SIZE: usize = 2048;

/// A NETLINK_ROUTE socket, and the sequence number of its last request.
#[derive(Debug)]
pub(crate) struct Rtnetlink {
    socket: Socket,
    seq: u32,
}

impl Rtnetlink {
    pub(crate) fn open() -> Result<Self, NetworkError> {
        // Unbound: the kernel binds it at the first send, and answers
        // come back to it.
        let socket = Socket::new(NETLINK_ROUTE).map_err(|source| NetworkError::Socket { op: "socket", cause: source })?;
        Ok(Self { socket, seq: 0 })
    }

    /// Every link of the network namespace.
    pub(crate) fn links(&mut self) -> Result<Vec<Link>, NetworkError> {
        for _ in 0..DUMP_ATTEMPTS {
            if let Some(links) = self.dump_links()? {
                return Ok(links);
            }
            tracing::debug!("the link dump was interrupted by a change; again");
        }
        Err(NetworkError::Reply(format!("the link dump was interrupted {DUMP_ATTEMPTS} times")))
    }

    /// One RTM_GETLINK dump; None if the kernel flags it inconsistent.
    fn dump_links(&mut self) -> Result<Option<Vec<Link>>, NetworkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut buf = Vec::new();
        append(&mut buf, seq, NLM_F_REQUEST | NLM_F_DUMP, RouteNetlinkMessage::GetLink(LinkMessage::default()));
        self.send(&buf)?;

        let mut slots = Slots::new(DUMP_SLOTS, DUMP_SLOT_SIZE);
        let mut links = Vec::new();
        let mut consistent = true;
        loop {
            for datagram in slots.receive(self.socket.as_raw_fd())? {
                for message in messages(datagram)? {
                    if message.seq != seq {
                        continue;
                    }
                    if message.flags & NLM_F_DUMP_INTR != 0 {
                        consistent = false;
                    }
                    match message.kind {
                        NLMSG_DONE => {
                            // A dump that failed ends with its errno.
                            let code = message.payload.get(..4).and_then(|b| b.try_into().ok()).map(i32::from_ne_bytes);
                            return match code {
                                Some(code) if code < 0 => {
                                    Err(NetworkError::Refused { item: "listing the links".into(), errno: Errno::from_raw(-code) })
                                }
                                _ => Ok(consistent.then_some(links)),
                            };
                        }
                        NLMSG_ERROR => {
                            return Err(match error_code(message.payload)? {
                                0 => NetworkError::Reply("the link dump was acknowledged, not answered".into()),
                                code => NetworkError::Refused { item: "listing the links".into(), errno: Errno::from_raw(-code) },
                            })
                        }
                        RTM_NEWLINK => links.push(parse_link(message.payload)?),
                        _ => {}
                    }
                }
            }
        }
    }

    /// Makes the requests, in order, and checks every acknowledgement.
    /// The kernel goes on after a refusal within a batch; the first
    /// refusal is returned (the others are logged), and later batches are
    /// not sent.
    pub(crate) fn execute(&mut self, requests: &[Request]) -> Result<(), NetworkError> {
        for batch in requests.chunks(BATCH) {
            let first = self.seq.wrapping_add(1);
            let mut buf = Vec::new();
            for request in batch {
                self.seq = self.seq.wrapping_add(1);
                append(&mut buf, self.seq, NLM_F_REQUEST | NLM_F_ACK | request.flags, request.message.clone());
            }
            self.send(&buf)?;

            let mut codes: Vec<Option<i32>> = vec![None; batch.len()];
            let mut missing = batch.len();
            let mut slots = Slots::new(batch.len(), ACK_SLOT_SIZE);
            while missing > 0 {
                for datagram in slots.receive(self.socket.as_raw_fd())? {
                    for message in messages(datagram)? {
                        if message.kind != NLMSG_ERROR {
                            continue;
                        }
                        let k = message.seq.wrapping_sub(first) as usize;
                        if let Some(slot @ None) = codes.get_mut(k) {
                            *slot = Some(error_code(message.payload)?);
                            missing -= 1;
                        }
                    }
                }
            }

            let mut refused = batch.iter().zip(&codes).filter_map(|(request, code)| match code {
                Some(code) if *code < 0 => Some(NetworkError::Refused { item: request.item.clone(), errno: Errno::from_raw(-code) }),
                _ => None,
            });
            if let Some(first) = refused.next() {
                for other in refused {
                    tracing::warn!("also refused: {other}");
                }
                return Err(first);
            }
        }
        Ok(())
    }

    fn send(&self, buf: &[u8]) -> Result<(), NetworkError> {
        let sent = self.socket.send(buf, 0).map_err(|source| NetworkError::Socket { op: "send", cause: source })?;
        if sent != buf.len() {
            return Err(NetworkError::Socket {
                op: "send",
                cause: io::Error::new(io::ErrorKind::WriteZero, format!("{sent} of {} bytes sent", buf.len())),
            });
        }
        Ok(())
    }
}

/// Appends a request to a batch.
fn append(buf: &mut Vec<u8>, seq: u32, flags: u16, message: RouteNetlinkMessage) {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
    message.finalize();
    let start = buf.len();
    // Messages in a batch start on 4-byte boundaries.
    let len = message.buffer_len().next_multiple_of(4);
    buf.resize(start + len, 0);
    message.serialize(&mut buf[start..]);
}

/// One netlink message of a datagram.
#[derive(Debug)]
struct Message<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

/// The messages of a datagram.
fn messages(mut datagram: &[u8]) -> Result<Vec<Message<'_>>, NetworkError> {
    let mut out = Vec::new();
    while !datagram.is_empty() {
        let buf = NetlinkBuffer::new_checked(datagram).map_err(|e| NetworkError::Reply(format!("a malformed message: {e}")))?;
        let len = buf.length() as usize;
        out.push(Message { kind: buf.message_type(), flags: buf.flags(), seq: buf.sequence_number(), payload: buf.payload() });
        datagram = datagram.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(out)
}

/// The (negative) errno of an NLMSG_ERROR, 0 for an acknowledgement.
fn error_code(payload: &[u8]) -> Result<i32, NetworkError> {
    let buf = ErrorBuffer::new_checked(&payload).map_err(|e| NetworkError::Reply(format!("a malformed error message: {e}")))?;
    Ok(buf.code().map_or(0, |c| c.get()))
}

/// The index, name, MAC and state of an RTM_NEWLINK; the other attributes
/// (statistics, per-protocol settings) are not parsed at all.
fn parse_link(payload: &[u8]) -> Result<Link, NetworkError> {
    let bad = |e: netlink_packet_core::DecodeError| NetworkError::Reply(format!("a malformed link: {e}"));
    let buf = LinkMessageBuffer::new_checked(&payload).map_err(bad)?;
    let mut link = Link {
        index: buf.link_index(),
        name: String::new(),
        mac: None,
        up: LinkFlags::from_bits_retain(buf.flags()).contains(LinkFlags::Up),
    };
    for nla in buf.attributes() {
        let nla = nla.map_err(bad)?;
        match nla.kind() {
            IFLA_IFNAME => {
                let value = nla.value();
                let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
                link.name = String::from_utf8_lossy(&value[..end]).into_owned();
            }
            IFLA_ADDRESS => link.mac = nla.value().try_into().ok(),
            _ => {}
        }
    }
    Ok(link)
}

/// Receive buffers for `recvmmsg`, one datagram each.
struct Slots {
    buf: Vec<u8>,
    size: usize,
    lens: Vec<usize>,
}

impl Slots {
    fn new(count: usize, size: usize) -> Self {
        Self { buf: vec![0; count * size], size, lens: Vec::with_capacity(count) }
    }

    /// Waits for a datagram, then takes as many more as are queued and fit;
    /// returns them.
    fn receive(&mut self, fd: RawFd) -> Result<impl Iterator<Item = &[u8]>, NetworkError> {
        self.lens.clear();
        loop {
            let mut headers = MultiHeaders::<NetlinkAddr>::preallocate(self.buf.len() / self.size, None);
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> = self.buf.chunks_mut(self.size).map(|c| [IoSliceMut::new(c)]).collect();
            match recvmmsg(fd, &mut headers, iovs.iter_mut(), MsgFlags::MSG_WAITFORONE, None) {
                Ok(received) => {
                    for datagram in received {
                        if datagram.flags.contains(MsgFlags::MSG_TRUNC) {
                            return Err(NetworkError::Reply(format!("an answer was longer than {} bytes", self.size)));
                        }
                        self.lens.push(datagram.bytes);
                    }
                    break;
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(NetworkError::Socket { op: "recvmmsg", cause: e.into() }),
            }
        }
        Ok(self.buf.chunks(self.size).zip(&self.lens).map(|(slot, len)| &slot[..*len]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_aligned_and_numbered() {
        let mut buf = Vec::new();
        let mut link = LinkMessage::default();
        link.header.index = 7;
        // A 3-byte name makes the message's length not a multiple of 4.
        link.attributes.push(netlink_packet_route::link::LinkAttribute::IfName("ab".into()));
        append(&mut buf, 5, NLM_F_REQUEST | NLM_F_ACK, RouteNetlinkMessage::SetLink(link));
        append(&mut buf, 6, NLM_F_REQUEST, RouteNetlinkMessage::GetLink(LinkMessage::default()));
        let parsed = messages(&buf).expect("messages");
        assert_eq!(parsed.len(), 2);
        assert_eq!((parsed[0].seq, parsed[0].flags), (5, NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!((parsed[1].seq, parsed[1].kind), (6, 18)); // RTM_GETLINK
        assert_eq!(buf.len() % 4, 0);
    }

    #[test]
    fn links_and_errors_parse() {
        // An RTM_NEWLINK as the kernel sends it: header, then attributes.
        let mut payload = vec![0u8; 16];
        payload[4..8].copy_from_slice(&3u32.to_ne_bytes());
        payload[8..12].copy_from_slice(&LinkFlags::Up.bits().to_ne_bytes());
        let mut nla = |kind: u16, value: &[u8]| {
            let len = 4 + value.len();
            payload.extend_from_slice(&u16::try_from(len).expect("len").to_ne_bytes());
            payload.extend_from_slice(&kind.to_ne_bytes());
            payload.extend_from_slice(value);
            payload.resize(payload.len().next_multiple_of(4), 0);
        };
        nla(IFLA_IFNAME, b"eth0\0");
        nla(13, &1500u32.to_ne_bytes()); // IFLA_MTU: skipped
        nla(IFLA_ADDRESS, &[2, 0, 0, 0, 0, 1]);
        let link = parse_link(&payload).expect("link");
        assert_eq!(link, Link { index: 3, name: "eth0".into(), mac: Some([2, 0, 0, 0, 0, 1]), up: true });
        assert!(parse_link(&payload[..10]).is_err());

        let mut error = (-17i32).to_ne_bytes().to_vec();
        error.extend_from_slice(&[0; 16]);
        assert_eq!(error_code(&error).expect("code"), -17);
        assert_eq!(error_code(&[0; 20]).expect("ack"), 0);
        assert!(error_code(&[0; 2]).is_err());
    }

    #[test]
    fn a_truncated_datagram_is_an_error() {
        let mut buf = Vec::new();
        append(&mut buf, 1, NLM_F_REQUEST, RouteNetlinkMessage::GetLink(LinkMessage::default()));
        assert!(messages(&buf[..buf.len() - 4]).is_err());
    }
}
