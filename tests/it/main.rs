//! Integration tests: each starts the real server on port 0 with its own database
//! (`#[sqlx::test]`) and its own Redis key prefix, and talks gRPC to it over TCP.
//!
//! What tests share lives in `support`; every other module holds tests, so that a test file never
//! has to be read as a library. A test too big for one file is a folder whose `mod.rs` holds the
//! tests and whose other files hold its parts.

mod support;

mod abandoned;
mod admin;
mod admin_keys;
mod balance;
mod batch_plans;
mod cart;
mod closing_orders;
mod connections;
mod conservation;
mod coupon_controls;
mod coupon_retries;
mod coupons;
mod events;
mod failover;
mod faults;
mod field_behavior;
mod first_run;
mod group_commit;
mod health;
mod hostile;
mod job_locks;
mod loadgen;
mod operating;
mod order_lists;
mod orders;
mod outbox;
mod outbox_nats;
mod popular;
mod primary_faults;
mod production;
mod products;
mod rate_limits;
mod reconcile;
mod refund_allocation;
mod refund_effects;
mod refunds;
mod replay;
mod replicas;
mod standby_reads;
mod stock;
