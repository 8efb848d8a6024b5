//! Rate-limited logging for messages a guest can trigger over and over (a malformed request,
//! a BAR move, a failed interrupt): without a limit a guest could fill the host's log.
//!
//! Each call site of [`warn_limited!`](crate::warn_limited) (or
//! [`info_limited!`](crate::info_limited)) has its own [`LogLimiter`]: a burst of
//! [`LOG_BURST`] messages, then one more every [`LOG_INTERVAL`]. The first message let through
//! after some were dropped says how many:
//! `virtio-blk: request 3 has no status byte (41 similar messages suppressed)`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Messages one call site may log in a row.
pub const LOG_BURST: u32 = 10;
/// Once the burst is spent, one message per this interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct State {
    /// Messages that may be logged now (refilled by one per [`LOG_INTERVAL`]).
    tokens: u32,
    /// When the last token was added (or the limiter first used).
    refilled: Instant,
    /// Messages dropped since the last one logged.
    suppressed: u64,
}

/// The limiter behind one call site of the logging macros.
#[derive(Debug)]
pub struct LogLimiter {
    state: Mutex<Option<State>>,
}

impl LogLimiter {
    /// A limiter that has not logged anything yet (usable in a `static`).
    pub const fn new() -> Self {
        LogLimiter {
            state: Mutex::new(None),
        }
    }

    /// Whether a message may be logged at `now`: `Some(n)` with the number of messages dropped
    /// since the last one logged, or `None` to drop this one.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let s = guard.get_or_insert(State {
            tokens: LOG_BURST,
            refilled: now,
            suppressed: 0,
        });
        let elapsed = now.saturating_duration_since(s.refilled);
        let new = elapsed.as_nanos() / LOG_INTERVAL.as_nanos();
        if new > 0 {
            s.tokens = u32::try_from(new)
                .unwrap_or(u32::MAX)
                .saturating_add(s.tokens)
                .min(LOG_BURST);
            // Keep the part of an interval already waited, unless the burst is full again.
            s.refilled = match u32::try_from(new) {
                Ok(n) if s.tokens < LOG_BURST => s.refilled + LOG_INTERVAL * n,
                _ => now,
            };
        }
        if s.tokens == 0 {
            s.suppressed = s.suppressed.saturating_add(1);
            return None;
        }
        s.tokens -= 1;
        Some(std::mem::take(&mut s.suppressed))
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs through `tracing` at `$level` unless this call site is over its limit.
#[doc(hidden)]
#[macro_export]
macro_rules! __log_limited {
    ($level:expr, $target:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::log::LogLimiter = $crate::log::LogLimiter::new();
        match LIMITER.admit(::std::time::Instant::now()) {
            None => {}
            Some(0) => $crate::__tracing::event!(target: $target, $level, $($arg)+),
            Some(n) => $crate::__tracing::event!(
                target: $target,
                $level,
                "{} ({} similar messages suppressed)",
                ::std::format_args!($($arg)+),
                n
            ),
        }
    }};
}

/// `tracing::warn!` with a per-call-site rate limit (see [the module](crate::log)); takes a
/// format string and its arguments, optionally after `target: "..."`.
#[macro_export]
macro_rules! warn_limited {
    (target: $target:expr, $($arg:tt)+) => {
        $crate::__log_limited!($crate::__tracing::Level::WARN, $target, $($arg)+)
    };
    ($($arg:tt)+) => {
        $crate::__log_limited!($crate::__tracing::Level::WARN, ::std::module_path!(), $($arg)+)
    };
}

/// `tracing::info!` with a per-call-site rate limit, like [`warn_limited!`](crate::warn_limited).
#[macro_export]
macro_rules! info_limited {
    (target: $target:expr, $($arg:tt)+) => {
        $crate::__log_limited!($crate::__tracing::Level::INFO, $target, $($arg)+)
    };
    ($($arg:tt)+) => {
        $crate::__log_limited!($crate::__tracing::Level::INFO, ::std::module_path!(), $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_interval_with_a_count_of_the_dropped() {
        let l = LogLimiter::new();
        let t0 = Instant::now();
        for _ in 0..LOG_BURST {
            assert_eq!(l.admit(t0), Some(0));
        }
        // A guest hammering the same path: nothing more gets through for a while.
        for _ in 0..10_000 {
            assert_eq!(l.admit(t0 + LOG_INTERVAL / 2), None);
        }
        // One interval later: one message, carrying the count.
        assert_eq!(l.admit(t0 + LOG_INTERVAL), Some(10_000));
        assert_eq!(l.admit(t0 + LOG_INTERVAL), None);
        assert_eq!(l.admit(t0 + LOG_INTERVAL * 2), Some(1));
        // A long quiet spell refills the burst, no more.
        let later = t0 + LOG_INTERVAL * 1000;
        for _ in 0..LOG_BURST {
            assert_eq!(l.admit(later), Some(0));
        }
        assert_eq!(l.admit(later), None);
    }

    /// Counts the events logged on this thread, and keeps the last message.
    #[derive(Default)]
    struct Count(std::sync::Mutex<(usize, String)>);

    impl tracing::Subscriber for Count {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, e: &tracing::Event<'_>) {
            struct Msg<'a>(&'a mut String);
            impl tracing::field::Visit for Msg<'_> {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    if f.name() == "message" {
                        *self.0 = format!("{v:?}");
                    }
                }
            }
            let mut c = self.0.lock().unwrap();
            c.0 += 1;
            e.record(&mut Msg(&mut c.1));
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn a_guest_hammering_a_warning_gets_a_burst_logged() {
        let count = std::sync::Arc::new(Count::default());
        tracing::subscriber::with_default(count.clone(), || {
            for i in 0..10_000 {
                crate::warn_limited!("virtio-test: bad request {i}");
            }
        });
        let c = count.0.lock().unwrap();
        assert_eq!(c.0, LOG_BURST as usize);
        assert_eq!(c.1, format!("virtio-test: bad request {}", LOG_BURST - 1));
    }

    #[test]
    fn the_macros_expand_with_captures_and_targets() {
        let e = "boom";
        for i in 0..3 * LOG_BURST {
            crate::warn_limited!("test: {e} {i}");
            crate::info_limited!(target: "tern::test", "test: {} {i}", e);
        }
    }
}
