//! ecommerce: a gRPC backend for an online shop that stays correct and fast during flash sales.
//!
//! Layers, outside in: [`grpc`] (thin handlers) -> [`app`] (one use case per flow) ->
//! [`domain`] (pure rules) -> [`store`] (Postgres, the record; Redis, the fast gate).
//! [`startup`] wires them and [`connections`] serves the gRPC port; [`health`] reports
//! readiness from the dependencies and [`liveness`] from the runtime. The load generator is
//! the `loadgen/` member crate.

mod app;
pub mod config;
mod connections;
mod domain;
mod error;
mod grpc;
mod health;
mod jobs;
mod liveness;
mod metrics;
pub mod proto;
pub mod startup;
mod store;
pub mod telemetry;

// The surface the binaries and the tests use besides the server itself: what a test counts or
// checks, the contract's code names, and the Redis markers one test drives directly.
pub use app::{CouponGateStats, RepairReason};
pub use domain::{MAX_STOCK, ProductId, Restock};
pub use error::code_name;
pub use health::LIVENESS;
// The job lock, which tests drive with bodies that panic, stall or race.
pub use jobs::{Exclusive, exclusive};
pub use store::redis::{Redis, sold_out::SoldOutMarkers};
