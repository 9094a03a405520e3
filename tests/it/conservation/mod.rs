//! Money conservation under a seeded, concurrent, mixed workload.
//!
//! 16 workers share one server and 40 users: charges (some with idempotency keys, some retried
//! with the same key, one after the other or at the same moment), coupon issues (four kinds,
//! limited stock, fixed and percent), orders of 1-3 lines over 10 products of limited stock, with
//! and without coupons, cancels, payments (some retried with their key, some sent three times at
//! once), refunds of paid orders (partial and full, restocked or not, retried with their key or
//! sent twice at once), orders left to expire (ORDER_TTL_SECS=2), buyers' order lists walked page
//! by page, the admin's reads (GetOrder, ListOrders, ListProducts, ListCoupons), coupon totals
//! raised and lowered while they are issued (UpdateCoupon), and keyed AdjustStock calls
//! retried and sent twice at once on a product set aside for them. Every answer is recorded.
//! Afterwards the books must balance, on a consistent snapshot right after the workload and again
//! once the expiry job and the outbox have settled: every balance equals its ledger and what the
//! RPCs reported (charges counted once per idempotency key, minus payments, plus refunds); every
//! unit of stock is on the shelf, in an open order, kept by a buyer who paid or refunded without
//! a restock; coupons are never over-issued, are RESERVED exactly for open orders and USED
//! exactly for paid ones not given back; every paid order has exactly one payment and one outbox
//! event, every other order none; refunds never give back more than their order paid; every list
//! shows only what its filter keeps, newest first, none twice, and once settled every buyer's list
//! (with and without a statuses filter) and the admin's are exactly the orders placed; the
//! adjusted product moved once per key.
//!
//! The default run takes 20-40 s here. To run it long, or with another seed:
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!   CONSERVATION_OPS=100000 CONSERVATION_SEED=7 cargo test --test it conservation -- --nocapture
//! ```
//!
//! `shop` opens the shop the workload trades in, `workload` is what each worker does, `record`
//! what the RPCs reported, and `books` checks the database against the rules and the record.

mod books;
mod coupon_admin;
mod lists;
mod record;
mod shop;
mod workload;

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use self::{
    books::{audit, check_books, check_rpc_views, snapshot},
    record::{Record, Shared},
    shop::open_shop,
    workload::worker,
};
use crate::support::{TestApp, assert_no_violations, eventually, spawn_app_with};

const DEFAULT_SEED: u64 = 20_261_125;
/// 20-30 s on two shared cores with the debug build.
const DEFAULT_OPS: usize = 10_000;
const WORKERS: usize = 16;
const USERS: i64 = 40;
const ORDER_TTL: Duration = Duration::from_secs(2);

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pg).await.unwrap()
}

#[sqlx::test(migrations = false)]
async fn money_stock_and_coupons_are_conserved_under_a_concurrent_workload(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let seed: u64 = std::env::var("CONSERVATION_SEED")
        .ok()
        .map(|s| s.parse().expect("CONSERVATION_SEED is a u64"))
        .unwrap_or(DEFAULT_SEED);
    let ops: usize = std::env::var("CONSERVATION_OPS")
        .ok()
        .map(|s| s.parse().expect("CONSERVATION_OPS is a count"))
        .unwrap_or(DEFAULT_OPS);
    let app = spawn_app_with(db, |s| {
        s.set("ORDER_TTL_SECS", ORDER_TTL.as_secs())
            .set("ORDER_EXPIRY_INTERVAL_SECS", 1)
            .set("OUTBOX_INTERVAL_SECS", 1)
            // Workers and their duplicate calls wait on row locks; a connection for each
            // keeps them waiting in Postgres, not failing to get a connection.
            .set("DATABASE_MAX_CONNECTIONS", 24)
            .set("DATABASE_ACQUIRE_TIMEOUT_MS", 30_000);
    })
    .await;
    let shop = open_shop(&app, ops.div_ceil(DEFAULT_OPS) as i64).await;
    let shared = Shared {
        record: Mutex::new(Record::default()),
    };

    let started = Instant::now();
    let per_worker = ops.div_ceil(WORKERS);
    let done = AtomicBool::new(false);
    let workers = async {
        join_all((0..WORKERS).map(|w| worker(&app, &shop, &shared, w, per_worker, seed))).await;
        done.store(true, Ordering::Relaxed);
    };
    // Audits snapshots while the workers run: a rule broken for a moment is caught too.
    let auditor = async {
        let (mut audits, mut checked, mut violations) = (0, 0, Vec::new());
        while !done.load(Ordering::Relaxed) {
            let mut tx = snapshot(&app).await;
            checked += audit(&mut tx, &shop, &mut violations, "during the workload").await;
            tx.rollback().await.unwrap();
            audits += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        (audits, checked, violations)
    };
    let ((), (audits, mut checked, mut violations)) = futures::join!(workers, auditor);
    let workload = started.elapsed();

    let record = shared.record.into_inner().unwrap();
    violations.extend(record.violations.iter().cloned());
    checked += check_books(&app, &shop, &record, &mut violations, "after the workload").await;
    let open_after_workload = count(
        &app,
        "SELECT count(*) FROM orders WHERE status = 'PENDING_PAYMENT'",
    )
    .await;

    // Settle: the expiry job closes what is left open, the outbox delivers every payment.
    let settled = eventually(Duration::from_secs(60), || async {
        count(
            &app,
            "SELECT count(*) FROM orders WHERE status = 'PENDING_PAYMENT'",
        )
        .await
            == 0
            && count(
                &app,
                "SELECT count(*) FROM outbox_events WHERE status <> 'DELIVERED'",
            )
            .await
                == 0
    })
    .await;
    checked += 1;
    if !settled {
        violations.push("open orders or undelivered events remain after 60 s".into());
    }
    checked += check_books(&app, &shop, &record, &mut violations, "settled").await;
    checked += check_rpc_views(&app, &shop, &mut violations).await;
    violations.extend(lists::check_lists(&app, &shop, &record).await);
    checked += 3 * USERS as usize + 2;

    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM orders GROUP BY status ORDER BY status")
            .fetch_all(&app.pg)
            .await
            .unwrap();
    let calls: usize = record.outcomes.values().sum();
    eprintln!(
        "conservation (seed {seed}): {ops} operations, {calls} calls by {WORKERS} workers in {workload:.1?}"
    );
    let mut by_op: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((op, outcome), n) in &record.outcomes {
        by_op.entry(op).or_default().push(format!("{outcome} {n}"));
    }
    for (op, outcomes) in by_op {
        eprintln!("  {op:<28} {}", outcomes.join(", "));
    }
    let charged: i64 = record.charges.values().map(|c| c.1).sum();
    let paid: i64 = record.payments.values().map(|p| p.2).sum();
    let refunded: i64 = record.refunds.values().map(|r| r.amount).sum();
    eprintln!(
        "  orders by final status: {statuses:?} ({open_after_workload} still open when the workload ended)"
    );
    eprintln!(
        "  money: {} charges for {charged} won, {} payments for {paid} won, {} refunds for \
         {refunded} won; {} coupons issued",
        record.charges.len(),
        record.payments.len(),
        record.refunds.len(),
        record.issued.len()
    );
    eprintln!(
        "  invariants checked: {checked} ({audits} snapshots audited during the workload, \
         the books after it and once settled), violations: {}",
        violations.len()
    );
    assert_no_violations(&violations);
    app.stop().await;
}
