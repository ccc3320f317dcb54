//! Address-range dispatch of vCPU exits: one [`Bus`] for port I/O, one for
//! MMIO. Devices implement [`BusDevice`] and receive offsets into their range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tracing::error;

use crate::devices::bus::BusDevice;

/// A device shared between the bus and whoever else needs it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors inserting into a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range at {base:#x} has zero length or wraps")]
    BadRange { base: u64 },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    dev: SharedDevice,
}

/// A set of non-overlapping `[base, base + len)` ranges, each with a device.
/// Built before the vCPUs start, then shared read-only.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ranges.iter().map(|(b, e)| (b, e.len))).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `dev` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::BadRange { base })?;
        if let Some((&b, e)) = self.ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Entry { len, dev });
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` in its range.
    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let (&base, e) = self.ranges.range(..=addr).next_back()?;
        let off = addr - base;
        (off < e.len).then_some((e, off))
    }

    /// Dispatches a read; false if no device covers `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((e, off)) = self.find(addr) else { return false };
        match e.dev.lock() {
            Ok(mut d) => d.read(off, data),
            Err(_) => error!("bus: device at {addr:#x} is poisoned (a vCPU panicked in it)"),
        }
        true
    }

    /// Dispatches a write; false if no device covers `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((e, off)) = self.find(addr) else { return false };
        match e.dev.lock() {
            Ok(mut d) => d.write(off, data),
            Err(_) => error!("bus: device at {addr:#x} is poisoned (a vCPU panicked in it)"),
        }
        true
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether the bus has no device.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xff));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x60, 5, b.clone()).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert!(!bus.read(0x400, &mut d));
        assert!(!bus.read(0x3f7, &mut d));
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(b.lock().unwrap().writes, vec![(4, vec![0xfe])]);
        assert!(a.lock().unwrap().writes.is_empty());
        assert!(!bus.write(0x65, &[0]));
    }

    #[test]
    fn rejects_overlaps() {
        let mut bus = Bus::new();
        let d = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x1000, 0x1000, d.clone()).unwrap();
        assert!(bus.insert(0x1fff, 1, d.clone()).is_err());
        assert!(bus.insert(0x800, 0x801, d.clone()).is_err());
        assert!(bus.insert(0x800, 0x800, d.clone()).is_ok());
        assert!(bus.insert(0x2000, 0x1000, d.clone()).is_ok());
        assert!(bus.insert(0x5000, 0, d.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, d).is_err());
        assert_eq!(bus.len(), 3);
    }
}
