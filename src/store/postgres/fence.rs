//! Retiring the pooled connections of a primary that is no longer one.
//!
//! Invariant: once a call has heard from Postgres that the server behind `DATABASE_URL` is not
//! a writable primary (25006 read-only, 57P0x shutting down or in recovery: a failover demoted
//! it, an operator made it read-only, the address led to a standby), no pooled connection
//! opened before that answer serves another call: each is closed at its next acquire or
//! release, and the pool opens a new one, which goes wherever the address leads now (HAProxy's
//! primary port, a DNS name moved to the new primary).
//!
//! The fence is one instant for the process, because an error does not know the pool it came
//! from; only the primary pool consults it. It rises at most once per [`MIN_INTERVAL`], so a
//! database that stays read-only makes each connection reconnect at most that often, not once
//! per refused call. Reading it costs one atomic load per acquire and release.

use std::{
    sync::{
        LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// The fence rises at most this often.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
/// Microseconds after [`EPOCH`] of the last rise; 0: never risen.
static RAISED_AT: AtomicU64 = AtomicU64::new(0);

fn micros_since_epoch(at: Instant) -> u64 {
    // At least 1, so that a rise is never mistaken for "never".
    (at.saturating_duration_since(*EPOCH).as_micros() as u64).max(1)
}

/// Every connection opened before now is to be retired (at most once per [`MIN_INTERVAL`]).
pub fn raise() {
    let now = micros_since_epoch(Instant::now());
    let last = RAISED_AT.load(Ordering::Relaxed);
    if last != 0 && now < last + MIN_INTERVAL.as_micros() as u64 {
        return;
    }
    if RAISED_AT
        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        tracing::warn!(
            "Postgres answered as a server that takes no writes: retiring the pooled connections"
        );
    }
}

/// Whether a pooled connection of this `age` was opened before the fence last rose.
pub fn retires(age: Duration) -> bool {
    let raised = RAISED_AT.load(Ordering::Relaxed);
    raised != 0 && opened_before(Instant::now(), age, raised)
}

fn opened_before(now: Instant, age: Duration, raised: u64) -> bool {
    let opened = now.checked_sub(age).map_or(0, |at| {
        at.saturating_duration_since(*EPOCH).as_micros() as u64
    });
    opened < raised
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connections_opened_before_the_rise_are_retired() {
        let raised_at = *EPOCH + Duration::from_secs(10);
        let raised = micros_since_epoch(raised_at);
        let later = raised_at + Duration::from_secs(5);
        assert!(opened_before(later, Duration::from_secs(6), raised));
        assert!(!opened_before(later, Duration::from_secs(4), raised));
        // Older than the process's clock: opened before any rise.
        assert!(opened_before(later, Duration::from_secs(100_000), raised));
    }
}
