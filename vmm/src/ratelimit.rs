//! Warnings a guest can trigger at will (bad register accesses, malformed
//! packets, protocol violations) are rate limited per call site: a hostile
//! guest must not be able to flood the VMM's log, and the disk under it.
//! [`guest_warn!`] is `tracing::warn!` that lets through at most
//! [`PER_SECOND`] messages a second from one place and reports how many it
//! held back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Messages let through per call site and second.
pub const PER_SECOND: u64 = 10;

/// The state of one call site.
#[derive(Debug)]
pub struct RateLimit {
    /// The second (since the first use of any limiter) being counted.
    window: AtomicU64,
    count: AtomicU64,
    suppressed: AtomicU64,
}

fn now_secs() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

impl RateLimit {
    /// A limiter with nothing counted.
    pub const fn new() -> Self {
        RateLimit { window: AtomicU64::new(0), count: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// Whether to log now: `Some(n)` if so, `n` being the number of
    /// messages held back since the last one let through.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(now_secs())
    }

    fn admit_at(&self, now: u64) -> Option<u64> {
        let window = self.window.load(Ordering::Relaxed);
        if now != window && self.window.compare_exchange(window, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < PER_SECOND {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` for messages a guest can cause, rate limited per call
/// site (see the [module](crate::ratelimit) docs).
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(suppressed) = LIMIT.admit() {
            if suppressed > 0 {
                tracing::warn!(suppressed, "similar warnings caused by the guest were held back");
            }
            tracing::warn!($($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_per_second_then_reports_what_it_held_back() {
        let l = RateLimit::new();
        let admitted = (0..1000).filter(|_| l.admit_at(5).is_some()).count();
        assert_eq!(admitted as u64, PER_SECOND);
        // The next second: let through again, with the count held back.
        assert_eq!(l.admit_at(6), Some(1000 - PER_SECOND));
        assert_eq!(l.admit_at(6), Some(0));
    }

    #[test]
    fn the_macro_compiles_with_fields() {
        for i in 0..100 {
            crate::guest_warn!(i, "test message {}", i);
        }
    }
}
