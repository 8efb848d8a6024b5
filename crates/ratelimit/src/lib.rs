//! Token-bucket rate limiting for device I/O: an operations-per-second and a bytes-per-second
//! bucket, each with a steady rate and a burst, as block (and later net) devices need for
//! `iops=`/`bw=` limits.
//!
//! Time is passed in (`Instant`), so the arithmetic is testable without sleeping; the device
//! asks [`RateLimiter::wait_time`] how long to wait when a request does not fit and re-arms its
//! own timer.
//!
//! [`log`] rate-limits log messages a guest can trigger repeatedly ([`warn_limited!`]).

use std::time::{Duration, Instant};

pub mod log;

#[doc(hidden)]
pub use tracing as __tracing;

/// A bucket of `capacity` tokens refilled at `rate` tokens per second.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenBucket {
    capacity: u64,
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilled at `rate` tokens/s holding at most `burst` tokens; a `burst` of
    /// 0 means a tenth of a second's worth (at least one token), as QEMU's throttling does.
    /// `None` for a zero rate (no limit).
    pub fn new(rate: u64, burst: u64, now: Instant) -> Option<Self> {
        if rate == 0 {
            return None;
        }
        let capacity = if burst == 0 {
            (rate / 10).max(1)
        } else {
            burst
        };
        Some(TokenBucket {
            capacity,
            rate,
            tokens: capacity as f64,
            last: now,
        })
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.capacity as f64);
        self.last = now;
    }

    /// Takes `n` tokens if they are there. A request larger than the whole bucket is let
    /// through when the bucket is full (and drives it negative), so it cannot starve forever.
    pub fn try_take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        let n_f = n as f64;
        if self.tokens >= n_f || (n > self.capacity && self.tokens >= self.capacity as f64) {
            self.tokens -= n_f;
            true
        } else {
            false
        }
    }

    /// How long until `n` tokens (or a full bucket, for oversized requests) are available.
    pub fn wait_time(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        let need = (n.min(self.capacity) as f64 - self.tokens).max(0.0);
        Duration::from_secs_f64(need / self.rate as f64)
    }

    /// Tokens currently available (may be negative after an oversized request).
    pub fn available(&self) -> f64 {
        self.tokens
    }
}

/// Limits on a device's I/O; a missing bucket means no limit on that dimension.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RateLimiter {
    ops: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl RateLimiter {
    /// `ops`/`bytes`: (rate per second, burst); a rate of 0 disables that limit.
    pub fn new(ops: (u64, u64), bytes: (u64, u64), now: Instant) -> Self {
        RateLimiter {
            ops: TokenBucket::new(ops.0, ops.1, now),
            bytes: TokenBucket::new(bytes.0, bytes.1, now),
        }
    }

    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.ops.is_some() || self.bytes.is_some()
    }

    /// Admits one operation of `len` bytes if both buckets allow it (taking from neither
    /// otherwise).
    pub fn try_admit(&mut self, len: u64, now: Instant) -> bool {
        if let Some(b) = &mut self.bytes {
            b.refill(now);
        }
        if let Some(o) = &mut self.ops {
            o.refill(now);
        }
        let ops_ok = self.ops.as_ref().is_none_or(|o| o.tokens >= 1.0);
        let bytes_ok = self.bytes.as_ref().is_none_or(|b| {
            b.tokens >= len as f64 || (len > b.capacity && b.tokens >= b.capacity as f64)
        });
        if !(ops_ok && bytes_ok) {
            return false;
        }
        if let Some(o) = &mut self.ops {
            o.tokens -= 1.0;
        }
        if let Some(b) = &mut self.bytes {
            b.tokens -= len as f64;
        }
        true
    }

    /// How long until an operation of `len` bytes would be admitted.
    pub fn wait_time(&mut self, len: u64, now: Instant) -> Duration {
        let o = self
            .ops
            .as_mut()
            .map_or(Duration::ZERO, |o| o.wait_time(1, now));
        let b = self
            .bytes
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_time(len, now));
        o.max(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t: Instant, n: u64) -> Instant {
        t + Duration::from_millis(n)
    }

    #[test]
    fn zero_rate_means_unlimited() {
        let t = Instant::now();
        assert!(TokenBucket::new(0, 100, t).is_none());
        let mut r = RateLimiter::new((0, 0), (0, 0), t);
        assert!(!r.is_limited());
        for _ in 0..10_000 {
            assert!(r.try_admit(1 << 20, t));
        }
        assert_eq!(r.wait_time(1 << 30, t), Duration::ZERO);
    }

    #[test]
    fn ops_bucket_rate_and_burst() {
        let t = Instant::now();
        // 100 ops/s with a burst of 150: 150 at once, then 100 per second.
        let mut r = RateLimiter::new((100, 150), (0, 0), t);
        let mut n = 0;
        while r.try_admit(512, t) {
            n += 1;
        }
        assert_eq!(n, 150);
        assert!(!r.try_admit(512, ms(t, 5)));
        let w = r.wait_time(512, ms(t, 5));
        assert!(
            w > Duration::from_millis(4) && w <= Duration::from_millis(5),
            "{w:?}"
        );
        assert!(r.try_admit(512, ms(t, 10)));
        // Over the next second about 100 more get through.
        let mut later = 0;
        for i in 1..=1000 {
            while r.try_admit(512, ms(t, 10 + i)) {
                later += 1;
            }
        }
        assert!((99..=101).contains(&later), "{later}");
    }

    #[test]
    fn bytes_bucket_and_oversized_requests() {
        let t = Instant::now();
        // 1 MiB/s, burst 1 MiB; a 4 MiB request goes through on a full bucket and leaves it
        // 3 MiB in debt, so the next 1 MiB request fits 4 s after the first.
        let mut r = RateLimiter::new((0, 0), (1 << 20, 1 << 20), t);
        assert!(r.try_admit(4 << 20, t));
        assert!(!r.try_admit(1 << 20, ms(t, 1000)));
        let w = r.wait_time(1 << 20, ms(t, 1000));
        assert!(
            w > Duration::from_millis(2990) && w <= Duration::from_millis(3000),
            "{w:?}"
        );
        assert!(r.try_admit(1 << 20, ms(t, 4001)));
    }

    #[test]
    fn both_buckets_must_allow_and_neither_is_charged_on_refusal() {
        let t = Instant::now();
        let mut r = RateLimiter::new((10, 10), (1000, 1000), t);
        assert!(r.try_admit(1000, t));
        // The ops bucket has 9 left but bytes are empty: refused, ops not charged.
        assert!(!r.try_admit(1, t));
        assert_eq!(r.ops.as_ref().unwrap().available(), 9.0);
        assert!(r.try_admit(500, ms(t, 500)));
    }

    #[test]
    fn default_burst_is_a_tenth_of_a_second() {
        let t = Instant::now();
        let mut b = TokenBucket::new(1000, 0, t).unwrap();
        assert!(b.try_take(100, t));
        assert!(!b.try_take(1, t));
        assert_eq!(TokenBucket::new(5, 0, t).unwrap().available(), 1.0);
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let t = Instant::now();
        let mut b = TokenBucket::new(10, 10, ms(t, 100)).unwrap();
        assert!(b.try_take(10, t));
        assert!(!b.try_take(1, t));
        assert!(b.try_take(1, ms(t, 200)));
    }
}
