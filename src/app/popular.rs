//! Popular products: the best sellers of the last days.
//!
//! Every payment adds its quantities to the day's Redis bucket after it commits, keyed by its
//! payment and transaction ids, and every refund takes its units away again from the bucket of
//! the day they were paid, keyed by its refund and transaction ids; reads union the buckets of
//! the window. A job rebuilds the buckets from Postgres (paid units less refunded ones), which
//! heals lost bumps, drift and a wiped Redis. Only paid, unrefunded units ever count.
//!
//! Invariant: the ranking a read returns counts every payment whose Pay call answered on this
//! replica before the read began, each exactly once, whenever the job runs
//! (`store::redis::ranking` says how bumps and rebuilds meet). The top of each window is cached
//! in memory (with product details) for `POPULAR_CACHE_TTL_MS`, so a burst of reads costs one
//! union and one product query; a bump or rebuild on this replica makes every cached window
//! stale for the reads that begin after it. A payment answered by another replica shows here
//! within the cache's TTL at most.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Days, NaiveDate, Utc};
use sqlx::PgPool;
use tokio::{sync::Mutex, time::Instant};

use crate::{
    domain::{
        Calendar, OrderItem, PaymentId, Product, ProductId, RefundId, RefundedLine, TxId,
        ValidationError,
    },
    error::AppError,
    metrics,
    store::{
        postgres::{products, replica::Reads, sales},
        redis::ranking::{Counted, Ranking},
    },
};

/// How many of the top sellers are kept per window; `limit` can ask for at most this many.
pub const MAX_POPULAR: usize = 100;

/// The window: the last `days` days, today included (1..=30, default 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PopularDays(u8);

impl PopularDays {
    pub fn parse(raw: i32) -> Result<Self, ValidationError> {
        match raw {
            0 => Ok(Self(3)),
            1..=30 => Ok(Self(raw as u8)),
            _ => Err(ValidationError::new("days", "must be between 1 and 30")),
        }
    }
}

/// How many products to return (1..=100, default 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PopularLimit(u8);

impl PopularLimit {
    pub fn parse(raw: i32) -> Result<Self, ValidationError> {
        match raw {
            0 => Ok(Self(5)),
            1..=100 => Ok(Self(raw as u8)),
            _ => Err(ValidationError::new("limit", "must be between 1 and 100")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PopularProduct {
    pub rank: u32,
    pub product: Product,
    pub sold: i64,
}

/// A committed payment, as the ranking counts it.
pub struct Sale {
    pub payment_id: PaymentId,
    /// The payment's transaction: the ranking's rebuild snapshots tell by it whether they
    /// counted the payment.
    pub tx: TxId,
    pub paid_at: DateTime<Utc>,
    pub items: Vec<OrderItem>,
}

/// A committed refund, as the ranking takes it away.
pub struct Unsold {
    pub refund_id: RefundId,
    /// The refund's transaction (see [`Sale::tx`]).
    pub tx: TxId,
    /// When the refunded order was paid: its units leave that day's bucket.
    pub paid_at: DateTime<Utc>,
    pub lines: Vec<RefundedLine>,
}

/// The cached top of each window. Reads take a shared lock for a moment; a stale window is
/// refreshed by one caller while the others wait for it (no stampede on Redis or Postgres),
/// and every waiter that began before that refresh read Redis takes its result.
#[derive(Default)]
struct PopularCache {
    fresh: RwLock<HashMap<PopularDays, Cached>>,
    refresh: Mutex<()>,
    /// Changes this replica made to the buckets, counted once each is in Redis.
    changes: AtomicU64,
}

struct Cached {
    at: Instant,
    /// `changes` when the buckets were read: the entry holds every change up to there.
    changes: u64,
    top: Arc<Vec<PopularProduct>>,
}

/// Sorts by quantity (descending), then product id (ascending), and keeps the top `n`.
fn top_sellers(mut totals: Vec<(i64, i64)>, n: usize) -> Vec<(i64, i64)> {
    totals.retain(|(_, sold)| *sold > 0);
    totals.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    totals.truncate(n);
    totals
}

/// The days of a window ending today.
fn window(today: NaiveDate, days: PopularDays) -> Vec<NaiveDate> {
    (0..u64::from(days.0))
        .filter_map(|back| today.checked_sub_days(Days::new(back)))
        .collect()
}

/// The ranking flows: counting sales, reading the best sellers, rebuilding from Postgres.
pub struct Popular {
    pg: PgPool,
    /// For the product details, which may be `READ_MAX_LAG_MS` stale.
    reads: Arc<Reads>,
    ranking: Ranking,
    cache: PopularCache,
    settings: RankingSettings,
}

impl Popular {
    pub fn new(pg: PgPool, reads: Arc<Reads>, ranking: Ranking, settings: RankingSettings) -> Self {
        Self {
            pg,
            reads,
            ranking,
            cache: PopularCache::default(),
            settings,
        }
    }

    /// Counts a committed payment's items in its day's bucket, once however often it is
    /// called. Best effort: if Redis misses it, the ranking job puts it back from Postgres.
    pub(super) async fn record_sale(&self, sale: &Sale) {
        let sold: Vec<(ProductId, i64)> = sale
            .items
            .iter()
            .map(|i| (i.product_id, i64::from(i.quantity)))
            .collect();
        let counted = Counted::Payment(sale.payment_id);
        self.bump(counted, sale.tx, sale.paid_at, &sold).await;
    }

    /// Takes a committed refund's units away from the day they were paid, once however often
    /// it is called. Best effort, as for sales. A refund of units paid before the retention
    /// window has nothing to take them from.
    pub(super) async fn record_refund(&self, unsold: &Unsold) {
        let window = self
            .settings
            .calendar
            .window(Utc::now(), self.settings.retention_days);
        if unsold.paid_at < window.start() {
            return;
        }
        let units: Vec<(ProductId, i64)> = unsold
            .lines
            .iter()
            .map(|l| (l.product_id, -i64::from(l.quantity)))
            .collect();
        let counted = Counted::Refund(unsold.refund_id);
        self.bump(counted, unsold.tx, unsold.paid_at, &units).await;
    }

    async fn bump(
        &self,
        counted: Counted,
        tx: TxId,
        paid_at: DateTime<Utc>,
        units: &[(ProductId, i64)],
    ) {
        let day = self.settings.calendar.day_of(paid_at);
        let retention = self.settings.bucket_ttl();
        match self.ranking.count(day, counted, tx, units, retention).await {
            Ok(true) => self.changed(),
            Ok(false) => metrics::ranking_bump_already_counted(),
            Err(e) => {
                // A timed-out call may still have been applied.
                self.changed();
                tracing::warn!(error = %e, "ranking bump lost; the ranking job will restore it");
            }
        }
    }

    /// Makes the cached windows stale for every read that begins from now on.
    fn changed(&self) {
        self.cache.changes.fetch_add(1, Ordering::SeqCst);
    }

    pub async fn top(
        &self,
        days: PopularDays,
        limit: PopularLimit,
    ) -> Result<Vec<PopularProduct>, AppError> {
        let take =
            |top: &[PopularProduct]| top.iter().take(usize::from(limit.0)).cloned().collect();
        let cache = &self.cache;
        let ttl = self.settings.cache_ttl;
        // Changes made before this read began: the answer must include them.
        let must_include = cache.changes.load(Ordering::SeqCst);
        let fresh = |cache: &PopularCache| -> Option<Arc<Vec<PopularProduct>>> {
            let windows = cache.fresh.read().unwrap_or_else(|e| e.into_inner());
            windows
                .get(&days)
                .filter(|c| c.at.elapsed() < ttl && c.changes >= must_include)
                .map(|c| c.top.clone())
        };
        if let Some(top) = fresh(cache) {
            return Ok(take(&top));
        }
        let _refreshing = cache.refresh.lock().await;
        if let Some(top) = fresh(cache) {
            return Ok(take(&top));
        }
        let changes = cache.changes.load(Ordering::SeqCst);
        let at = Instant::now();
        let top = Arc::new(self.compute_popular(days).await?);
        cache
            .fresh
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                days,
                Cached {
                    at,
                    changes,
                    top: top.clone(),
                },
            );
        Ok(take(&top))
    }

    async fn compute_popular(&self, days: PopularDays) -> Result<Vec<PopularProduct>, AppError> {
        let window = window(self.settings.calendar.day_of(Utc::now()), days);
        let totals = self.ranking.totals(&window).await?;
        let top = top_sellers(totals, MAX_POPULAR);
        let ids: Vec<i64> = top.iter().map(|(id, _)| *id).collect();
        let mut conn = super::catalog::stale_ok_read(&self.reads).await?;
        let mut details: HashMap<i64, Product> = products::get_many(&mut *conn, &ids)
            .await?
            .into_iter()
            .map(|p| (p.id.get(), p))
            .collect();
        Ok(top
            .into_iter()
            .filter_map(|(id, sold)| details.remove(&id).map(|product| (product, sold)))
            .zip(1..)
            .map(|((product, sold), rank)| PopularProduct {
                rank,
                product,
                sold,
            })
            .collect())
    }

    /// Rebuilds every day bucket of the retention window from Postgres, keeping the bumps
    /// of payments that committed after the rebuild's snapshot. Returns how many buckets hold
    /// sales.
    pub async fn reconcile(&self) -> Result<usize, AppError> {
        let ranking = &self.settings;
        let window = ranking.calendar.window(Utc::now(), ranking.retention_days);
        let (snapshot, rows) = sales::daily_with_snapshot(&self.pg, &window).await?;
        let mut by_day: HashMap<NaiveDate, Vec<(ProductId, i64)>> = HashMap::new();
        for row in rows {
            by_day
                .entry(row.day)
                .or_default()
                .push((row.product_id, row.quantity));
        }
        for (day, _) in &window.days {
            let sold = by_day.get(day).map(Vec::as_slice).unwrap_or_default();
            let rebuilt = self
                .ranking
                .rebuild(*day, &snapshot, sold, ranking.bucket_ttl())
                .await?;
            match rebuilt {
                Some(carried) => metrics::ranking_bumps_carried(carried),
                None => {
                    tracing::debug!(%day, "ranking bucket already rebuilt from a later snapshot");
                }
            }
        }
        self.changed();
        Ok(by_day.len())
    }
}

/// Settings of the ranking.
#[derive(Clone, Debug)]
pub struct RankingSettings {
    /// The days of `RANKING_TIMEZONE`.
    pub calendar: Calendar,
    pub retention_days: u32,
    pub cache_ttl: Duration,
}

impl RankingSettings {
    /// Buckets live through the retention window (plus a day of slack for time zones).
    pub fn bucket_ttl(&self) -> Duration {
        Duration::from_secs((u64::from(self.retention_days) + 1) * 86_400)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_limit_defaults_and_bounds() {
        assert_eq!(PopularDays::parse(0).unwrap(), PopularDays(3));
        assert_eq!(PopularDays::parse(30).unwrap(), PopularDays(30));
        assert!(PopularDays::parse(31).is_err());
        assert!(PopularDays::parse(-1).is_err());
        assert_eq!(PopularLimit::parse(0).unwrap(), PopularLimit(5));
        assert_eq!(PopularLimit::parse(100).unwrap(), PopularLimit(100));
        assert!(PopularLimit::parse(101).is_err());
    }

    #[test]
    fn top_sellers_rank_by_quantity_then_id() {
        let totals = vec![(5, 10), (3, 30), (9, 10), (1, 0), (2, 30), (7, 20)];
        assert_eq!(
            top_sellers(totals.clone(), 10),
            vec![(2, 30), (3, 30), (7, 20), (5, 10), (9, 10)]
        );
        assert_eq!(top_sellers(totals, 2), vec![(2, 30), (3, 30)]);
    }

    #[test]
    fn window_counts_back_from_today() {
        let today = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
        assert_eq!(
            window(today, PopularDays(3)),
            vec![
                today,
                NaiveDate::from_ymd_opt(2026, 2, 28).unwrap(),
                NaiveDate::from_ymd_opt(2026, 2, 27).unwrap()
            ]
        );
    }
}
