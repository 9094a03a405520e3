//! Integration tests: each starts the real server on port 0 with its own database
//! (`#[sqlx::test]`) and its own Redis key prefix, and talks gRPC to it over TCP.

mod support;

mod admin;
mod balance;
mod conservation;
mod coupon_retries;
mod coupons;
mod faults;
mod health;
mod hostile;
mod loadgen;
mod orders;
mod outbox;
mod popular;
mod production;
mod products;
mod reconcile;
mod replay;
mod replicas;
mod stock;
