//! The vsock packet: `struct virtio_vsock_hdr` and its payload, and how they
//! are read from a tx descriptor chain and written to an rx one.
//!
//! The header and the payload may share a descriptor or be split across any
//! number of them; every length is checked against the descriptors and
//! against [`MAX_PKT_BUF_SIZE`].

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::defs::{MAX_PKT_BUF_SIZE, PKT_HDR_SIZE};
use super::VsockError;

/// `struct virtio_vsock_hdr` (all fields little-endian on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl VsockHeader {
    /// Decodes the 44 wire bytes.
    pub fn from_bytes(b: &[u8; PKT_HDR_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        VsockHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header as its 44 wire bytes.
    pub fn to_bytes(&self) -> [u8; PKT_HDR_SIZE] {
        let mut b = [0u8; PKT_HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A header and its payload (`data.len() == hdr.len` once complete).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VsockPacket {
    pub hdr: VsockHeader,
    pub data: Vec<u8>,
}

/// Why a tx chain could not be turned into a packet.
#[derive(Debug)]
pub(crate) enum TxError {
    /// Not even the header could be read: nothing to answer.
    NoHeader(VsockError),
    /// The header was read but the rest is bad.
    BadBody(VsockHeader, VsockError),
}

/// Reads a packet from a driver-to-device (tx) chain into `pkt`, reusing its
/// buffer. Every descriptor must be device-readable.
pub(crate) fn read_tx_chain<M, I>(mem: &M, descs: I, pkt: &mut VsockPacket) -> Result<(), TxError>
where
    M: GuestMemory + ?Sized,
    I: Iterator<Item = Descriptor>,
{
    let mut hdr_buf = [0u8; PKT_HDR_SIZE];
    let mut hdr_got = 0usize;
    let mut hdr: Option<VsockHeader> = None;
    let mut data_len = 0usize;
    let mut err: Option<VsockError> = None;
    let mut total: u64 = 0;
    pkt.data.clear();

    for desc in descs {
        total = total.saturating_add(u64::from(desc.len()));
        if err.is_some() {
            continue;
        }
        if desc.is_write_only() {
            err = Some(VsockError::UnreadableDescriptor);
            continue;
        }
        let mut addr = desc.addr();
        let mut left = desc.len() as usize;
        if hdr.is_none() {
            let n = left.min(PKT_HDR_SIZE - hdr_got);
            if let Err(e) = mem.read_slice(&mut hdr_buf[hdr_got..hdr_got + n], addr) {
                err = Some(e.into());
                continue;
            }
            hdr_got += n;
            left -= n;
            addr = addr.unchecked_add(n as u64);
            if hdr_got == PKT_HDR_SIZE {
                let h = VsockHeader::from_bytes(&hdr_buf);
                if h.len as usize > MAX_PKT_BUF_SIZE {
                    err = Some(VsockError::InvalidPktLen(h.len));
                }
                data_len = h.len as usize;
                hdr = Some(h);
            }
        }
        if err.is_none() && hdr.is_some() && left > 0 && pkt.data.len() < data_len {
            let n = left.min(data_len - pkt.data.len());
            let start = pkt.data.len();
            pkt.data.resize(start + n, 0);
            if let Err(e) = read_guest(mem, &mut pkt.data[start..], addr) {
                err = Some(e);
            }
        }
    }

    let Some(h) = hdr else {
        return Err(TxError::NoHeader(err.unwrap_or(VsockError::DescChainTooShort(usize::try_from(total).unwrap_or(usize::MAX)))));
    };
    if let Some(e) = err {
        return Err(TxError::BadBody(h, e));
    }
    if pkt.data.len() < data_len {
        return Err(TxError::BadBody(h, VsockError::DescChainTooShort(PKT_HDR_SIZE + pkt.data.len())));
    }
    pkt.hdr = h;
    Ok(())
}

fn read_guest<M: GuestMemory + ?Sized>(mem: &M, buf: &mut [u8], addr: GuestAddress) -> Result<(), VsockError> {
    mem.read_slice(buf, addr).map_err(VsockError::from)
}

/// The device-writable buffers of an rx chain.
#[derive(Debug, Default)]
pub(crate) struct RxBuffers {
    bufs: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

impl RxBuffers {
    /// Collects the buffers of a device-to-driver (rx) chain; every
    /// descriptor must be device-writable and the chain must hold a header.
    pub(crate) fn parse<I: Iterator<Item = Descriptor>>(&mut self, descs: I) -> Result<(), VsockError> {
        self.bufs.clear();
        self.capacity = 0;
        let mut bad = false;
        for desc in descs {
            if !desc.is_write_only() {
                bad = true;
            }
            let len = desc.len() as usize;
            self.capacity = self.capacity.saturating_add(len);
            self.bufs.push((desc.addr(), len));
        }
        if bad {
            return Err(VsockError::UnwritableDescriptor);
        }
        if self.capacity < PKT_HDR_SIZE {
            return Err(VsockError::DescChainTooShort(self.capacity));
        }
        Ok(())
    }

    /// The largest payload that fits after the header.
    pub(crate) fn max_data(&self) -> usize {
        (self.capacity - PKT_HDR_SIZE).min(MAX_PKT_BUF_SIZE)
    }

    /// Writes `pkt` (header then payload) into the buffers; returns the
    /// number of bytes written.
    pub(crate) fn write<M: GuestMemory + ?Sized>(&self, mem: &M, pkt: &VsockPacket) -> Result<u32, VsockError> {
        let hdr = pkt.hdr.to_bytes();
        let mut srcs: [&[u8]; 2] = [&hdr, &pkt.data];
        let mut written = 0usize;
        for &(addr, len) in &self.bufs {
            let mut off = 0usize;
            while off < len {
                let Some(src) = srcs.iter_mut().find(|s| !s.is_empty()) else {
                    break;
                };
                let n = src.len().min(len - off);
                mem.write_slice(&src[..n], addr.unchecked_add(off as u64))?;
                *src = &src[n..];
                off += n;
                written += n;
            }
        }
        if srcs.iter().any(|s| !s.is_empty()) {
            return Err(VsockError::DescChainTooShort(self.capacity));
        }
        u32::try_from(written).map_err(|_| VsockError::DescChainTooShort(self.capacity))
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory")
    }

    fn desc(addr: u64, len: u32, write: bool) -> Descriptor {
        let flags = if write { VRING_DESC_F_WRITE } else { 0 } | VRING_DESC_F_NEXT;
        Descriptor::new(addr, len, flags as u16, 0)
    }

    fn sample_hdr(len: u32) -> VsockHeader {
        VsockHeader { src_cid: 3, dst_cid: 2, src_port: 1234, dst_port: 5678, len, type_: 1, op: 5, flags: 0, buf_alloc: 4096, fwd_cnt: 7 }
    }

    #[test]
    fn header_round_trip() {
        let h = sample_hdr(99);
        let b = h.to_bytes();
        assert_eq!(VsockHeader::from_bytes(&b), h);
        // Spot-check the wire layout.
        assert_eq!(&b[24..28], &99u32.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
    }

    #[test]
    fn tx_split_everywhere() {
        let m = mem();
        let h = sample_hdr(10);
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(b"0123456789");
        m.write_slice(&bytes, GuestAddress(0x1000)).expect("write");
        // Split the 54 bytes at 3, 44 (header/data boundary), 50.
        let cuts = [0u64, 3, 44, 50, 54];
        let descs: Vec<Descriptor> = cuts.windows(2).map(|w| desc(0x1000 + w[0], (w[1] - w[0]) as u32, false)).collect();
        let mut pkt = VsockPacket::default();
        read_tx_chain(&m, descs.into_iter(), &mut pkt).expect("parse");
        assert_eq!(pkt.hdr, h);
        assert_eq!(pkt.data, b"0123456789");
    }

    #[test]
    fn tx_errors() {
        let m = mem();
        let mut pkt = VsockPacket::default();
        m.write_slice(&sample_hdr(10).to_bytes(), GuestAddress(0x1000)).expect("write");

        // Header cut short.
        let r = read_tx_chain(&m, [desc(0x1000, 20, false)].into_iter(), &mut pkt);
        assert!(matches!(r, Err(TxError::NoHeader(VsockError::DescChainTooShort(20)))));
        // Write-only descriptor.
        let r = read_tx_chain(&m, [desc(0x1000, 44, true)].into_iter(), &mut pkt);
        assert!(matches!(r, Err(TxError::NoHeader(VsockError::UnreadableDescriptor))));
        // Data shorter than len.
        let r = read_tx_chain(&m, [desc(0x1000, 50, false)].into_iter(), &mut pkt);
        assert!(matches!(r, Err(TxError::BadBody(_, VsockError::DescChainTooShort(50)))));
        // Write-only data descriptor.
        let r = read_tx_chain(&m, [desc(0x1000, 44, false), desc(0x2000, 10, true)].into_iter(), &mut pkt);
        assert!(matches!(r, Err(TxError::BadBody(_, VsockError::UnreadableDescriptor))));
        // Out of guest memory.
        let r = read_tx_chain(&m, [desc(0x1000, 44, false), desc(0xff_ff00_0000, 10, false)].into_iter(), &mut pkt);
        assert!(matches!(r, Err(TxError::BadBody(_, VsockError::GuestMemory(_)))));
        // Length above the maximum.
        m.write_slice(&sample_hdr(1 << 20).to_bytes(), GuestAddress(0x1000)).expect("write");
        let r = read_tx_chain(&m, [desc(0x1000, 0x8000_0000, false)].into_iter(), &mut pkt);
        assert!(matches!(r, Err(TxError::BadBody(_, VsockError::InvalidPktLen(_)))));
    }

    #[test]
    fn rx_write_split() {
        let m = mem();
        let mut rx = RxBuffers::default();
        rx.parse([desc(0x1000, 10, true), desc(0x2000, 40, true), desc(0x3000, 100, true)].into_iter()).expect("parse");
        assert_eq!(rx.max_data(), 150 - 44);
        let pkt = VsockPacket { hdr: sample_hdr(20), data: vec![0xab; 20] };
        assert_eq!(rx.write(&m, &pkt).expect("write"), 64);
        let mut got = [0u8; 44];
        m.read_slice(&mut got[..10], GuestAddress(0x1000)).expect("read");
        m.read_slice(&mut got[10..], GuestAddress(0x2000)).expect("read");
        assert_eq!(VsockHeader::from_bytes(&got), pkt.hdr);
        let mut data = [0u8; 20];
        m.read_slice(&mut data[..6], GuestAddress(0x2000 + 34)).expect("read");
        m.read_slice(&mut data[6..], GuestAddress(0x3000)).expect("read");
        assert_eq!(data, [0xab; 20]);

        assert!(matches!(rx.parse([desc(0x1000, 100, false)].into_iter()), Err(VsockError::UnwritableDescriptor)));
        assert!(matches!(rx.parse([desc(0x1000, 43, true)].into_iter()), Err(VsockError::DescChainTooShort(43))));
    }
}
