//! ecommerce: a gRPC backend for an online shop that stays correct and fast during flash sales.
//!
//! Layers, outside in: [`grpc`] (thin handlers) -> [`app`] (one use case per flow) ->
//! [`domain`] (pure rules) -> [`store`] (Postgres, the record; Redis, the fast gate).
//! [`startup`] wires them and [`connections`] serves the gRPC port; [`health`] reports
//! readiness from the dependencies and [`liveness`] from the runtime. The load generator is
//! the `loadgen/` member crate.

pub mod app;
pub mod config;
pub mod connections;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod health;
pub mod jobs;
pub mod liveness;
pub mod metrics;
pub mod proto;
pub mod startup;
pub mod store;
pub mod telemetry;
