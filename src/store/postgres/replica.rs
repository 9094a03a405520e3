//! Reads a standby may serve, within a bound of staleness.
//!
//! Invariant: a connection [`Reads::acquire`] hands out from the standby pool
//! (`DATABASE_READ_URL`) is to a server that has replayed every write the primary had
//! committed `max_lag` before (give or take one sampling interval); otherwise the caller gets a
//! primary connection. Only reads that may be that stale use it (the catalog and the product
//! details of the popular list): money, stock decisions, coupons, orders, carts and idempotency
//! read from the primary pool alone.
//!
//! How: a task samples the primary's WAL position every [`SAMPLE_EVERY`] (when, and where the
//! WAL ended then). Each standby connection handed out is first asked how far it has replayed
//! (that query replaces the pool's liveness ping, so it costs no extra round trip); it is fresh
//! enough when it has replayed the position the primary had at some sample no older than
//! `max_lag`. A standby that lags, or is not a standby, is not used; one that does not answer
//! is not tried again for [`STANDBY_BACKOFF`]. Behind
//! HAProxy's replica port each connection may lead to another standby, so each is checked.
//!
//! Cancel-safety: a dropped [`Reads::acquire`] returns its connection to its pool; the sampler
//! holds nothing across its awaits but a pooled connection for one statement.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use sqlx::{
    PgPool, Postgres,
    pool::PoolConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::time::Instant;

use super::session;
use crate::store::StoreError;

/// How often the primary's WAL position is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// A standby connection not handed out within this is given up for the primary.
const STANDBY_ACQUIRE: Duration = Duration::from_millis(250);
/// After the standby failed to answer, reads go to the primary this long before it is tried
/// again, so an outage of the standby costs the reads no waiting.
const STANDBY_BACKOFF: Duration = Duration::from_secs(1);

/// Where a read was served from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Standby,
    Primary,
}

/// The primary pool, and the standby pool when `DATABASE_READ_URL` is set.
pub struct Reads {
    primary: PgPool,
    standby: Option<Standby>,
}

struct Standby {
    pool: PgPool,
    max_lag: Duration,
    /// Not tried before this, after a failure.
    resting_until: Mutex<Option<Instant>>,
    /// The primary's WAL position at the start of each sample, oldest first.
    samples: Arc<Mutex<VecDeque<(Instant, i64)>>>,
}

impl Reads {
    /// Every read from the primary.
    pub fn primary_only(primary: PgPool) -> Arc<Self> {
        Arc::new(Self {
            primary,
            standby: None,
        })
    }

    /// Reads from `standby` while it lags at most `max_lag`; starts the sampler, which stops
    /// when this is dropped.
    pub fn with_standby(
        primary: PgPool,
        standby: PgConnectOptions,
        max_connections: u32,
        max_lag: Duration,
    ) -> Arc<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(0)
            .acquire_timeout(STANDBY_ACQUIRE)
            .idle_timeout(Some(Duration::from_secs(60)))
            // The replay position query below checks the connection anyway.
            .test_before_acquire(false)
            .connect_lazy_with(session(standby, "ecommerce-reads"));
        let samples = Arc::new(Mutex::new(VecDeque::new()));
        let reads = Arc::new(Self {
            primary: primary.clone(),
            standby: Some(Standby {
                pool,
                max_lag,
                resting_until: Mutex::new(None),
                samples: samples.clone(),
            }),
        });
        tokio::spawn(sample(Arc::downgrade(&reads), primary, samples, max_lag));
        reads
    }

    /// A connection for a read that may be `max_lag` stale: a standby's when one is fresh
    /// enough, the primary's otherwise.
    pub async fn acquire(&self) -> Result<(PoolConnection<Postgres>, Source), StoreError> {
        if let Some(standby) = &self.standby
            && let Some(conn) = standby.fresh().await
        {
            return Ok((conn, Source::Standby));
        }
        Ok((self.primary.acquire().await?, Source::Primary))
    }
}

impl Standby {
    async fn fresh(&self) -> Option<PoolConnection<Postgres>> {
        let now = Instant::now();
        let resting_until = *self.resting_until.lock().expect("backoff lock");
        if resting_until.is_some_and(|until| now < until) {
            return None;
        }
        let rest = || {
            *self.resting_until.lock().expect("backoff lock") = Some(now + STANDBY_BACKOFF);
        };
        let Ok(mut conn) = self.pool.acquire().await else {
            rest();
            return None;
        };
        let asked = Instant::now();
        // NULL on a server that is not a standby: not one to read from here.
        let replayed: Option<i64> =
            match sqlx::query_scalar("SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint")
                .fetch_one(&mut *conn)
                .await
            {
                Ok(replayed) => replayed,
                Err(_) => {
                    // A broken connection must not go back to the pool.
                    conn.close_on_drop();
                    rest();
                    return None;
                }
            };
        let samples = self.samples.lock().expect("samples lock");
        fresh_enough(&samples, replayed?, asked, self.max_lag).then_some(conn)
    }
}

/// Whether a standby that had replayed up to `replayed` at `now` has every write the primary
/// had committed `max_lag` before: some sample no older than that is at or below `replayed`.
fn fresh_enough(
    samples: &VecDeque<(Instant, i64)>,
    replayed: i64,
    now: Instant,
    max_lag: Duration,
) -> bool {
    let horizon = now.checked_sub(max_lag);
    samples
        .iter()
        .find(|(at, _)| horizon.is_none_or(|h| *at >= h))
        .is_some_and(|(_, position)| *position <= replayed)
}

async fn sample(
    reads: std::sync::Weak<Reads>,
    primary: PgPool,
    samples: Arc<Mutex<VecDeque<(Instant, i64)>>>,
    max_lag: Duration,
) {
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let keep = max_lag + Duration::from_secs(1);
    while reads.strong_count() > 0 {
        ticker.tick().await;
        let at = Instant::now();
        let position = tokio::time::timeout(
            max_lag.max(SAMPLE_EVERY),
            sqlx::query_scalar::<_, i64>("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
                .fetch_one(&primary),
        )
        .await;
        let mut samples = samples.lock().expect("samples lock");
        if let Ok(Ok(position)) = position {
            samples.push_back((at, position));
        }
        while samples
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) > keep)
        {
            samples.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_is_fresh_when_it_replayed_where_the_primary_was_max_lag_ago() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let samples: VecDeque<(Instant, i64)> = [(0, 100), (100, 200), (200, 300), (300, 400)]
            .into_iter()
            .map(|(t, p)| (start + ms(t), p))
            .collect();
        let now = start + ms(350);
        // 150 ms allowed: the sample at 200 ms (position 300) must be replayed.
        assert!(fresh_enough(&samples, 300, now, ms(150)));
        assert!(!fresh_enough(&samples, 299, now, ms(150)));
        // 1 s allowed: the oldest sample is within it.
        assert!(fresh_enough(&samples, 100, now, ms(1000)));
        // No sample recent enough (the sampler is stuck): not fresh.
        assert!(!fresh_enough(&samples, 1_000, start + ms(2000), ms(150)));
        assert!(!fresh_enough(&VecDeque::new(), 1_000, now, ms(150)));
    }
}
