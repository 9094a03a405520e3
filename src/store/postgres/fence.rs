//! Retiring the pooled connections of a primary that is no longer one.
//!
//! Invariant: once a call has heard from Postgres that the server behind `DATABASE_URL` is not
//! a writable primary (25006 read-only, 57P0x shutting down or in recovery: a failover demoted
//! it, an operator made it read-only, the address led to a standby), or has lost its
//! connection (a restart, a failover, a cut: the pool does not ping before use), a pooled
//! connection opened before that answer serves another call only after it showed, at its next
//! acquire, that its server takes writes; one that does not is closed, and the pool opens a new one,
//! which goes wherever the address leads now (HAProxy's primary port, a DNS name moved to the
//! new primary).
//!
//! The fence is one instant for the process, because an error does not know the pool it came
//! from; only primary pools consult it, and a pool whose server is fine pays one query per
//! connection acquired in the [`SUSPECT_FOR`] after a rise, not a reconnection (several
//! services in one process, as in the tests, do not reconnect each other's pools). It rises at
//! most once per [`MIN_INTERVAL`]. Reading it costs one atomic load per acquire. A connection
//! idle through the whole window and to a demoted server fails its next write with 25006,
//! which raises the fence again.

use std::{
    sync::{
        LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// The fence rises at most this often.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// How long after a rise older connections are checked before use.
pub const SUSPECT_FOR: Duration = Duration::from_secs(10);

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
            "a Postgres connection was lost or its server takes no writes: checking the pooled connections before use"
        );
    }
}

/// Whether a pooled connection of this `age` must show that its server takes writes before
/// it is used: it was opened before the fence last rose, and that was recently.
pub fn suspects(age: Duration) -> bool {
    let raised = RAISED_AT.load(Ordering::Relaxed);
    let now = Instant::now();
    raised != 0
        && micros_since_epoch(now).saturating_sub(raised) < SUSPECT_FOR.as_micros() as u64
        && opened_before(now, age, raised)
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
