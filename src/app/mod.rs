//! Use cases, one module per flow. Each takes validated domain values, runs the flow against
//! the stores, and returns domain values or an [`AppError`](crate::error::AppError).
//! Nothing here knows about gRPC.

mod balance;
mod coupons;
mod demo;
mod products;

pub use crate::store::postgres::coupons::NewCoupon;
pub use crate::store::postgres::products::{NewProduct, ProductChanges};
pub use balance::ChargeCommand;
pub use coupons::{CouponStock, ReconcileReport};

use std::sync::Arc;

use sqlx::PgPool;

use crate::{
    config::Config,
    domain::Won,
    store::redis::{Redis, coupon_gate::CouponGate},
};

/// Settings the use cases read.
#[derive(Clone, Debug)]
pub struct Settings {
    pub max_balance: Won,
}

impl Settings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            max_balance: config.max_balance,
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
    coupon_gate: CouponGate,
}

impl App {
    pub fn new(pg: PgPool, redis: Redis, settings: Settings) -> Self {
        Self {
            inner: Arc::new(Inner {
                pg,
                redis,
                settings,
                coupon_gate: CouponGate::default(),
            }),
        }
    }

    pub fn pg(&self) -> &PgPool {
        &self.inner.pg
    }

    pub fn redis(&self) -> &Redis {
        &self.inner.redis
    }

    pub fn coupon_gate(&self) -> &CouponGate {
        &self.inner.coupon_gate
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }
}
