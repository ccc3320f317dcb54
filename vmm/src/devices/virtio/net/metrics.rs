//! Counters for one net device, bumped beside the warnings at failure sites
//! (logged at info level when the worker stops).

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters (relaxed atomics).
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames the guest sent that the backend took.
    pub tx_frames: AtomicU64,
    /// Their bytes (virtio-net header excluded).
    pub tx_bytes: AtomicU64,
    /// Malformed tx chains (returned unused, frame dropped).
    pub tx_malformed: AtomicU64,
    /// Frames the backend refused with an error (dropped).
    pub tx_errors: AtomicU64,
    /// Times the backend could not take a frame yet (retried later).
    pub tx_blocked: AtomicU64,
    /// Frames written into guest rx buffers.
    pub rx_frames: AtomicU64,
    /// Their bytes (virtio-net header excluded).
    pub rx_bytes: AtomicU64,
    /// Unusable rx chains (returned empty).
    pub rx_bad_buffers: AtomicU64,
    /// Host frames dropped: larger than the guest's buffer, or unusable.
    pub rx_dropped: AtomicU64,
    /// Backend read errors.
    pub rx_errors: AtomicU64,
    /// Times reading stopped because the guest had no rx buffer.
    pub rx_starved: AtomicU64,
    /// Virtqueue errors (bad indices, rings outside memory).
    pub queue_errors: AtomicU64,
}

impl NetMetrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// A counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
