//! The address-space bus a vCPU exit is dispatched on.

/// A device that answers MMIO or port I/O accesses at offsets inside its range.
///
/// Called from vCPU threads; implementations keep their own locking.
pub trait BusDevice: Send {
    /// Fills `data` for a read of `data.len()` bytes at `offset` within the range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data` at `offset` within the range.
    fn write(&mut self, offset: u64, data: &[u8]);
}
