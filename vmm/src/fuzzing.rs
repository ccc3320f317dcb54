//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`;
//! never in a production build).
//!
//! Each function takes arbitrary bytes, lays them out as a guest would (a
//! virtqueue and its buffers in guest memory), runs the real device code
//! on them, and checks what must hold whatever the guest wrote. It returns
//! normally for any input: a panic is a finding.
//!
//! - [`virtio_queue`]: descriptor tables, available rings and buffers as
//!   raw bytes, walked by the vsock device's rx and tx processing;
//! - [`vsock_packets`]: a stream of vsock packets against the real
//!   hybrid-vsock backend and its connection state machine;
//! - [`fuse_request`]: one FUSE request against the virtio-fs server over a
//!   scratch share.

#![allow(clippy::cast_possible_truncation)]

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, GuestAddress, GuestMemoryMmap};

pub use crate::devices::virtio::fs::fuzz::fuse_request;
pub use crate::devices::virtio::vsock::fuzz::{virtio_queue, vsock_packets};

/// Reads fuzz input front to back; past the end every read is zero.
#[derive(Debug)]
pub(crate) struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub(crate) fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }

    pub(crate) fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub(crate) fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Where a split queue of `size` entries lives when it starts at `base`:
/// (descriptor table, available ring, used ring).
pub(crate) fn queue_layout(base: u64, size: u16) -> (GuestAddress, GuestAddress, GuestAddress) {
    let size = u64::from(size);
    let desc = GuestAddress(base);
    let avail = desc.unchecked_add(16 * size);
    let used = GuestAddress((avail.0 + 6 + 2 * size + 3) & !3);
    (desc, avail, used)
}

/// A ready queue of `size` entries at `base`, as the transport hands it to
/// a device. `None` if it would not pass the transport's checks.
pub(crate) fn ready_queue(mem: &GuestMemoryMmap, base: u64, size: u16, event_idx: bool) -> Option<Queue> {
    let (desc, avail, used) = queue_layout(base, size);
    let mut q = Queue::new(size).ok()?;
    q.set_size(size);
    q.set_desc_table_address(Some(desc.0 as u32), Some((desc.0 >> 32) as u32));
    q.set_avail_ring_address(Some(avail.0 as u32), Some((avail.0 >> 32) as u32));
    q.set_used_ring_address(Some(used.0 as u32), Some((used.0 >> 32) as u32));
    q.set_ready(true);
    q.set_event_idx(event_idx);
    q.is_valid(mem).then_some(q)
}
