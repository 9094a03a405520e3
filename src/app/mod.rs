//! Use cases, one service per flow. Each service owns the adapters it needs (a Postgres pool,
//! the Redis adapters of its flow) and is built once at start-up; the gRPC handlers and the
//! jobs each hold only the services they call. Services take validated domain values and
//! return domain values or an [`AppError`](crate::error::AppError); nothing here knows gRPC.

mod balance;
mod cart;
mod catalog;
mod coupons;
mod demo;
mod events;
mod group_commit;
mod idempotency;
mod orders;
mod outbox;
mod payments;
mod popular;
mod rate_limit;
mod refunds;
mod retention;
mod sold_out;

pub use balance::{Balances, ChargeCommand};
pub use cart::{Carts, CheckoutCommand};
pub use catalog::Catalog;
pub use coupons::{CouponGateStats, CouponStock, Coupons, RepairReason};
pub use demo::seed_demo;
pub use group_commit::WriteBatches;
pub use orders::{Orders, PlaceOrderCommand};
pub use outbox::{Outbox, OutboxSettings};
pub use payments::{PayCommand, Payments};
pub use popular::{Popular, PopularDays, PopularLimit, PopularProduct, RankingSettings};
pub use rate_limit::UserRateLimit;
pub use refunds::{RefundCommand, Refunds};
pub use retention::{Retention, RetentionSettings};
pub use sold_out::SoldOut;
