//! Counters for one vsock device, bumped beside the warnings at failure sites.

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters (relaxed atomics).
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Packets taken from the tx queue and handed to the backend.
    pub tx_packets: AtomicU64,
    /// Malformed tx chains (dropped).
    pub tx_malformed: AtomicU64,
    /// Packets written into rx buffers.
    pub rx_packets: AtomicU64,
    /// Unusable rx chains (returned empty).
    pub rx_bad_buffers: AtomicU64,
    /// Virtqueue errors (bad indices, memory outside the guest).
    pub queue_errors: AtomicU64,
    /// Connections opened by host clients (`CONNECT`).
    pub host_connections: AtomicU64,
    /// Connections opened by the guest.
    pub guest_connections: AtomicU64,
    /// Guest connection requests that found no host listener.
    pub guest_connect_refused: AtomicU64,
    /// Connections reset by us (errors, timeouts, protocol violations).
    pub conn_resets: AtomicU64,
}

impl VsockMetrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
