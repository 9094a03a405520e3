//! Use cases, one module per flow. Each takes validated domain values, runs the flow against
//! the stores, and returns domain values or an [`AppError`](crate::error::AppError).
//! Nothing here knows about gRPC.

mod balance;
mod coupon_recorder;
mod coupons;
mod demo;
mod idempotency;
mod orders;
mod outbox;
mod payments;
mod popular;
mod products;
mod sold_out;

pub use balance::ChargeCommand;
pub use coupons::{CouponGateStats, CouponStock, ReconcileReport, RepairReason};
pub use orders::PlaceOrderCommand;
pub use outbox::DeliveryReport;
pub use payments::PayCommand;
pub use popular::{MAX_POPULAR, PopularDays, PopularLimit, PopularProduct, RankingSettings};

pub use crate::store::postgres::{
    coupons::NewCoupon,
    products::{NewProduct, ProductChanges},
};

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use tokio::sync::Notify;

use crate::{
    config::Config,
    domain::Won,
    store::{
        data_platform::Sink,
        redis::{Redis, coupon_gate::CouponGate, ranking::Ranking, sold_out::SoldOutMarkers},
    },
};

/// Settings the use cases read.
#[derive(Clone, Debug)]
pub struct Settings {
    pub max_balance: Won,
    pub order_ttl: Duration,
    pub sold_out_marker_ttl: Duration,
    /// A coupon win with no row for this long is an orphan, not an insert in flight.
    pub coupon_orphan_grace: Duration,
    pub outbox: OutboxSettings,
    pub ranking: RankingSettings,
}

#[derive(Clone, Debug)]
pub struct OutboxSettings {
    pub batch_size: usize,
    pub max_attempts: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
}

impl Settings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            max_balance: config.max_balance,
            order_ttl: config.order_ttl,
            sold_out_marker_ttl: config.sold_out_marker_ttl,
            coupon_orphan_grace: config.coupon_orphan_grace,
            outbox: OutboxSettings {
                batch_size: config.outbox_batch_size as usize,
                max_attempts: config.outbox_max_attempts,
                retry_base: config.outbox_retry_base,
                retry_max: config.outbox_retry_max,
            },
            ranking: RankingSettings {
                timezone: config.ranking_timezone,
                retention_days: config.ranking_retention_days,
                cache_ttl: config.popular_cache_ttl,
            },
        }
    }
}

/// The use cases and what they need. Cheap to clone: handlers each hold one.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

struct Inner {
    pg: PgPool,
    redis: Redis,
    settings: Settings,
    sink: Sink,
    coupon_gate: CouponGate,
    coupon_recorder: coupon_recorder::CouponRecorder,
    rebuilds: coupons::Rebuilds,
    coupon_gate_stats: Arc<CouponGateStats>,
    ranking: Ranking,
    popular_cache: popular::PopularCache,
    sold_out: sold_out::SoldOutCache<crate::domain::ProductId>,
    sold_out_markers: SoldOutMarkers,
    coupons_sold_out: sold_out::SoldOutCache<crate::domain::CouponId>,
    outbox_nudge: Notify,
}

impl App {
    pub fn new(pg: PgPool, redis: Redis, settings: Settings, sink: Sink) -> Self {
        // A win's insert must finish well within the orphan grace, or a retry could release a
        // seat whose row is about to commit.
        let coupon_recorder =
            coupon_recorder::CouponRecorder::start(pg.clone(), settings.coupon_orphan_grace / 2);
        Self {
            inner: Arc::new(Inner {
                coupon_recorder,
                rebuilds: coupons::Rebuilds::default(),
                coupon_gate_stats: Arc::default(),
                coupon_gate: CouponGate::new(redis.clone()),
                sold_out_markers: SoldOutMarkers::new(redis.clone()),
                pg,
                redis,
                settings,
                sink,
                ranking: Ranking::default(),
                popular_cache: popular::PopularCache::default(),
                sold_out: sold_out::SoldOutCache::default(),
                coupons_sold_out: sold_out::SoldOutCache::default(),
                outbox_nudge: Notify::new(),
            }),
        }
    }

    pub fn pg(&self) -> &PgPool {
        &self.inner.pg
    }

    pub fn redis(&self) -> &Redis {
        &self.inner.redis
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    fn sink(&self) -> &Sink {
        &self.inner.sink
    }

    fn coupon_gate(&self) -> &CouponGate {
        &self.inner.coupon_gate
    }

    fn coupon_recorder(&self) -> &coupon_recorder::CouponRecorder {
        &self.inner.coupon_recorder
    }

    fn inner_rebuilds(&self) -> &coupons::Rebuilds {
        &self.inner.rebuilds
    }

    /// What this server did to its coupon gates.
    pub fn coupon_gate_stats(&self) -> &Arc<CouponGateStats> {
        &self.inner.coupon_gate_stats
    }

    fn ranking(&self) -> &Ranking {
        &self.inner.ranking
    }

    fn popular_cache(&self) -> &popular::PopularCache {
        &self.inner.popular_cache
    }

    fn sold_out_cache(&self) -> &sold_out::SoldOutCache<crate::domain::ProductId> {
        &self.inner.sold_out
    }

    fn sold_out_markers(&self) -> &SoldOutMarkers {
        &self.inner.sold_out_markers
    }

    fn coupons_sold_out(&self) -> &sold_out::SoldOutCache<crate::domain::CouponId> {
        &self.inner.coupons_sold_out
    }

    /// Asks the outbox job to deliver now (a payment just committed).
    fn nudge_outbox(&self) {
        self.inner.outbox_nudge.notify_one();
    }

    /// Resolves when a payment asked for a delivery since the last call.
    pub async fn outbox_nudged(&self) {
        self.inner.outbox_nudge.notified().await;
    }
}
