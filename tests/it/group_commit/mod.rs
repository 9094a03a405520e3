//! Group commit: orders and payments placed together in one transaction each get the answer
//! they get when run alone, and the books add up.
//!
//! The reference is not a model: a second server on a second database, prepared by the same
//! calls, runs the same requests one by one with batching off. Every request is chosen so that
//! its answer does not depend on the order the requests run in (stock is ample or never enough,
//! each coupon is named by one request), so any difference is the batch's doing.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ecommerce::proto::{CreateCouponRequest, Order, PlaceOrderRequest, ProductStatus};
use futures::future::join_all;
use sqlx::{
    AssertSqlSafe, Connection, PgConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use tonic::Code;

use crate::support::{
    TestApp,
    coupons::{coupon_request, create_coupon, create_coupon_with, issue},
    eventually,
    private::PrivatePostgres,
    reason,
    shop::{
        self, assert_ledger_matches, charge, create_product, create_product_with_status, lines,
        pay, place, place_with, stock,
    },
    spawn_app_with,
};

mod charge;
mod coupons;
mod pay;

const CALLS: i64 = 256;
const PRICE: i64 = 1_000;

/// A call's answer as a test compares it between two servers: what an OK answer says without
/// its ids and times (`T`), or the refusal's code and reason.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer<T> {
    Ok(T),
    Refused(tonic::Code, String),
}

pub(super) fn answer<R, T>(
    result: &Result<R, tonic::Status>,
    ok: impl FnOnce(&R) -> T,
) -> Answer<T> {
    match result {
        Ok(r) => Answer::Ok(ok(r)),
        Err(status) => {
            let (code, reason) = reason(status);
            Answer::Refused(code, reason)
        }
    }
}

/// An order placed: user, items (product, quantity, unit price), total, discount, final amount,
/// coupon, status.
type Placed = (i64, Vec<(i64, i32, i64)>, i64, i64, i64, i64, i32);

fn placed(o: &Order) -> Placed {
    (
        o.user_id,
        o.items
            .iter()
            .map(|i| (i.product_id, i.quantity, i.unit_price))
            .collect(),
        o.total_amount,
        o.discount_amount,
        o.final_amount,
        o.user_coupon_id,
        o.status,
    )
}

/// The state both servers start from; returns the requests of the test, one per user.
/// Ids come out the same on both, since each database is fresh and set up by the same calls.
async fn prepare(app: &TestApp) -> Vec<PlaceOrderRequest> {
    let hot = create_product(app, "hot", PRICE, 100_000).await;
    let stopped =
        create_product_with_status(app, "stopped", PRICE, 10, ProductStatus::Stopped).await;
    // Each order naming one of these is refused whatever ran before it.
    let scarce = create_product(app, "scarce", PRICE, 3).await;
    let empty = create_product(app, "empty", PRICE, 0).await;
    let coupon = create_coupon(app, CALLS).await;
    let above_orders = create_coupon_with(
        app,
        CreateCouponRequest {
            min_order_amount: 10 * PRICE,
            ..coupon_request(CALLS)
        },
    )
    .await;
    let mut requests = Vec::new();
    for user in 1..=CALLS {
        let mut request = PlaceOrderRequest {
            user_id: user,
            items: lines(&[(hot, 1 + (user % 3) as i32)]),
            ..Default::default()
        };
        match user % 32 {
            // Insufficient balance: never charged.
            0 => {}
            // An unknown product beside the hot one.
            1 => {
                charge(app, user, 100_000).await;
                request.items = lines(&[(hot, 1), (9_999_999, 1)]);
            }
            // A coupon already used by a paid order.
            2 => {
                charge(app, user, 100_000).await;
                let uc = issue(app, coupon, user).await.unwrap();
                let first = place_with(
                    app,
                    PlaceOrderRequest {
                        user_id: user,
                        items: lines(&[(hot, 1)]),
                        user_coupon_id: uc,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
                pay(app, user, first.id).await.unwrap();
                request.user_coupon_id = uc;
            }
            // A replayed key: the same request already succeeded.
            3 => {
                charge(app, user, 100_000).await;
                request.idempotency_key = format!("key-{user}");
                place_with(app, request.clone()).await.unwrap();
            }
            // A key already used for another request.
            4 => {
                charge(app, user, 100_000).await;
                request.idempotency_key = format!("key-{user}");
                let mut other = request.clone();
                other.items = lines(&[(hot, 7)]);
                place_with(app, other).await.unwrap();
            }
            // A product not on sale.
            5 => {
                charge(app, user, 100_000).await;
                request.items = lines(&[(hot, 1), (stopped, 1)]);
            }
            // A fresh coupon, and a fresh key.
            6 => {
                charge(app, user, 100_000).await;
                request.user_coupon_id = issue(app, coupon, user).await.unwrap();
                request.idempotency_key = format!("fresh-{user}");
            }
            // A balance just short of the order.
            7 => charge(app, user, PRICE * i64::from(request.items[0].quantity) - 1).await,
            // Another buyer's coupon.
            8 => {
                charge(app, user, 100_000).await;
                request.user_coupon_id = issue(app, coupon, CALLS + user).await.unwrap();
            }
            // A coupon reserved by an open order.
            9 => {
                charge(app, user, 100_000).await;
                let uc = issue(app, coupon, user).await.unwrap();
                let mut first = request.clone();
                first.user_coupon_id = uc;
                place_with(app, first).await.unwrap();
                request.user_coupon_id = uc;
            }
            // All the scarce product's stock, then an unknown product: the stock each of these
            // takes in a batch must be back for the next, or it is refused OUT_OF_STOCK.
            10 => {
                charge(app, user, 100_000).await;
                request.items = lines(&[(scarce, 3), (9_999_999, 1)]);
            }
            // More than there is, and none at all (a sold-out marker follows).
            11 | 12 => {
                charge(app, user, 100_000).await;
                let short = if user % 32 == 11 {
                    (scarce, 4)
                } else {
                    (empty, 1)
                };
                request.items = lines(&[(hot, 1), short]);
            }
            // An order below the coupon's minimum.
            13 => {
                charge(app, user, 100_000).await;
                request.user_coupon_id = issue(app, above_orders, user).await.unwrap();
            }
            // A plain order that goes through.
            _ => charge(app, user, 100_000).await,
        }
        requests.push(request);
    }
    requests
}

pub(super) async fn second_database(db: &PgConnectOptions) -> (PgConnectOptions, String) {
    // Short and lowercase: Postgres folds unquoted names and cuts them at 63 bytes.
    let name = format!("group_commit_alone_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect_with(&db.clone().database("postgres"))
        .await
        .unwrap();
    sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}")))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap();
    (db.clone().database(&name), name)
}

pub(super) async fn drop_database(db: &PgConnectOptions, name: &str) {
    let mut admin = PgConnection::connect_with(&db.clone().database("postgres"))
        .await
        .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
}

/// Asserts that the rows `ids` were written by fewer than half as many commits: `commits`
/// counts the distinct transaction timestamps among them (rows committed together share it).
pub(super) async fn assert_batched(app: &TestApp, commits: &'static str, ids: &[i64]) {
    let commits: i64 = sqlx::query_scalar(commits)
        .bind(ids)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert!(
        (commits as usize) < ids.len() / 2,
        "{} rows took {commits} commits: no batching",
        ids.len()
    );
}

/// The result stored under a buyer's idempotency key.
pub(super) async fn key_result(app: &TestApp, user: i64, key: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT result_id FROM idempotency_keys WHERE user_id = $1 AND idempotency_key = $2",
    )
    .bind(user)
    .bind(key)
    .fetch_one(&app.pg)
    .await
    .unwrap()
}

type Keys = Vec<(i64, String, String, String, bool)>;

/// Every idempotency key with its request and whether it holds a result.
pub(super) async fn keys(app: &TestApp) -> Keys {
    sqlx::query_as(
        "SELECT user_id, operation, idempotency_key, request_fingerprint, result_id IS NOT NULL
         FROM idempotency_keys ORDER BY 1, 2, 3",
    )
    .fetch_all(&app.pg)
    .await
    .unwrap()
}

type Books = (
    Vec<(i64, i64)>,
    BTreeMap<(i64, i64), String>,
    Vec<i64>,
    i64,
    Keys,
);

/// What the books say after the calls: every product's stock, coupon states, every balance and
/// its ledger, the idempotency keys (a refused call must leave another call's key alone).
async fn books(app: &TestApp, users: i64) -> Books {
    let stock = sqlx::query_as("SELECT id, stock FROM products ORDER BY id")
        .fetch_all(&app.pg)
        .await
        .unwrap();
    let coupons: Vec<(i64, i64, String)> =
        sqlx::query_as("SELECT user_id, coupon_id, status FROM user_coupons")
            .fetch_all(&app.pg)
            .await
            .unwrap();
    let mut balances = Vec::new();
    for user in 1..=users {
        balances.push(assert_ledger_matches(app, user).await);
    }
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    let keys = keys(app).await;
    let coupons = coupons.into_iter().map(|(u, c, s)| ((u, c), s)).collect();
    (stock, coupons, balances, orders, keys)
}

#[sqlx::test(migrations = false)]
async fn orders_in_one_batch_get_the_answers_they_get_alone(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let (alone_db, alone_name) = second_database(&db).await;
    let batched = spawn_app_with(db, |s| {
        s.set("WRITE_BATCH_MAX", 128);
    })
    .await;
    let alone = spawn_app_with(alone_db.clone(), |s| {
        s.set("WRITE_BATCH_MAX", 1);
    })
    .await;
    let requests = prepare(&batched).await;
    assert_eq!(prepare(&alone).await, requests);

    let together = join_all(requests.iter().map(|r| place_with(&batched, r.clone()))).await;
    let mut one_by_one = Vec::new();
    for request in &requests {
        one_by_one.push(place_with(&alone, request.clone()).await);
    }
    for ((request, batched), alone) in requests.iter().zip(&together).zip(&one_by_one) {
        assert_eq!(
            answer(batched, placed),
            answer(alone, placed),
            "user {}: batched {batched:?}, alone {alone:?}",
            request.user_id
        );
    }
    let new: Vec<i64> = together
        .iter()
        .zip(&requests)
        .filter(|(_, r)| !r.idempotency_key.starts_with("key-"))
        .filter_map(|(o, _)| o.as_ref().ok().map(|o| o.id))
        .collect();
    assert!(new.len() >= 64, "only {} orders placed", new.len());
    assert_batched(
        &batched,
        "SELECT count(DISTINCT created_at) FROM orders WHERE id = ANY($1)",
        &new,
    )
    .await;
    let after_orders = books(&batched, CALLS).await;
    assert_eq!(after_orders, books(&alone, CALLS).await);
    // Replayed, reused and fresh keys (8 users each) all still hold their first result.
    let keys = &after_orders.4;
    assert_eq!(keys.len(), 24, "{keys:?}");
    assert!(keys.iter().all(|k| k.4), "{keys:?}");

    // The orders placed together are paid together, and the books still agree.
    let to_pay = |orders: &[Result<Order, tonic::Status>]| -> Vec<(i64, i64)> {
        orders
            .iter()
            .filter_map(|o| o.as_ref().ok())
            .map(|o| (o.user_id, o.id))
            .collect()
    };
    let paid_together = join_all(
        to_pay(&together)
            .into_iter()
            .map(|(user, order)| pay(&batched, user, order)),
    )
    .await;
    let mut paid_alone = Vec::new();
    for (user, order) in to_pay(&one_by_one) {
        paid_alone.push(pay(&alone, user, order).await);
    }
    let outcome = |r: &Result<_, tonic::Status>| r.as_ref().map(|_| ()).map_err(reason);
    assert_eq!(
        paid_together.iter().map(outcome).collect::<Vec<_>>(),
        paid_alone.iter().map(outcome).collect::<Vec<_>>()
    );
    assert_eq!(books(&batched, CALLS).await, books(&alone, CALLS).await);
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM payments p
         JOIN outbox_events e ON e.aggregate_id = p.id AND e.event_type = 'PaymentCompleted'",
    )
    .fetch_one(&batched.pg)
    .await
    .unwrap();
    let paid: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
        .fetch_one(&batched.pg)
        .await
        .unwrap();
    assert_eq!(events, paid, "every payment has its event");

    batched.stop().await;
    alone.stop().await;
    drop_database(&alone_db, &alone_name).await;
}

#[sqlx::test(migrations = false)]
async fn concurrent_duplicates_of_a_key_place_one_order(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, |_| {}).await;
    let product = create_product(&app, "hot", PRICE, 1_000).await;
    charge(&app, 1, 1_000_000).await;
    let request = PlaceOrderRequest {
        user_id: 1,
        items: lines(&[(product, 1)]),
        idempotency_key: "same".into(),
        ..Default::default()
    };
    let shared = &app;
    let unkeyed = (2..=40).map(|user| async move {
        charge(shared, user, 1_000_000).await;
        place(shared, user, &[(product, 1)]).await
    });
    let (keyed, others) = tokio::join!(
        join_all((0..40).map(|_| place_with(shared, request.clone()))),
        join_all(unkeyed)
    );
    let ids: Vec<i64> = keyed.into_iter().map(|r| r.unwrap().id).collect();
    assert!(ids.iter().all(|&id| id == ids[0]), "{ids:?}");
    assert!(others.iter().all(|r| r.is_ok()));
    assert_eq!(stock(&app, product).await, 1_000 - 40);
    app.stop().await;
}

/// A batch waiting for a row lock held elsewhere keeps its flow's turn to decide: the next
/// batch waits for it only `WRITE_BATCH_STALL_MS`, then starts beside it. With the turn kept
/// for good (or `WRITE_BATCHES_IN_FLIGHT=1`) the second order would wait for the lock too.
#[sqlx::test(migrations = false)]
async fn a_batch_stuck_on_a_lock_holds_up_its_flow_no_longer_than_the_stall(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app_with(db.clone(), |s| {
        s.set("WRITE_BATCH_STALL_MS", 50);
    })
    .await;
    let (locked, free) = (
        create_product(&app, "locked", PRICE, 10).await,
        create_product(&app, "free", PRICE, 10).await,
    );
    charge(&app, 1, 1_000_000).await;
    let lock = shop::lock_product(&db, locked).await;
    let stuck = {
        let mut orders = app.orders();
        let request = PlaceOrderRequest {
            user_id: 1,
            items: lines(&[(locked, 1)]),
            ..Default::default()
        };
        tokio::spawn(async move { orders.place_order(request).await })
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&app.pg)
            .await
            .unwrap()
                > 0
        })
        .await,
        "the first order's batch waits for the product's lock"
    );
    let order = tokio::time::timeout(Duration::from_secs(10), place(&app, 1, &[(free, 1)]))
        .await
        .expect("the next batch waited for the stuck one past the stall")
        .unwrap();
    assert_eq!(order.items[0].product_id, free);
    assert!(
        !stuck.is_finished(),
        "the first order still waits for the lock"
    );
    drop(lock);
    let first = stuck.await.unwrap().unwrap().into_inner().order.unwrap();
    assert_eq!(first.items[0].product_id, locked);
    app.stop().await;
}

/// What the workers of the crash test heard OK.
#[derive(Default)]
struct Heard {
    orders: Vec<(i64, i64)>,
    payments: Vec<(i64, i64)>,
    refused: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_under_batched_orders_and_payments_loses_no_ok_answer() {
    let postgres = PrivatePostgres::start().await;
    let app = spawn_app_with(postgres.options(), |s| {
        s.set("DATABASE_ACQUIRE_TIMEOUT_MS", 500)
            .set("DEFAULT_DEADLINE_MS", 3000)
            .set("WRITE_BATCH_MAX", 64);
    })
    .await;
    const STOCK: i64 = 100_000;
    const USERS: i64 = 48;
    let product = create_product(&app, "hot", PRICE, STOCK).await;
    for user in 1..=USERS {
        charge(&app, user, 100_000_000).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let heard = Arc::new(Mutex::new(Heard::default()));
    let workers = (1..=USERS).map(|user| {
        let (stop, heard, app) = (stop.clone(), heard.clone(), &app);
        async move {
            while !stop.load(Ordering::Relaxed) {
                let placed = place(app, user, &[(product, 1)]).await;
                let Ok(order) = placed else {
                    heard.lock().unwrap().refused += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                heard.lock().unwrap().orders.push((order.id, user));
                match pay(app, user, order.id).await {
                    Ok(payment) => heard.lock().unwrap().payments.push((payment.id, order.id)),
                    Err(status) => {
                        assert!(
                            matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
                            "only outage errors expected: {status:?}"
                        );
                        heard.lock().unwrap().refused += 1;
                    }
                }
            }
        }
    });
    let fault = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = heard.lock().unwrap().payments.len();
        assert!(before > 0, "payments went through before the kill");
        postgres.sigkill().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        postgres.start_again().await;
        let recovered = eventually(Duration::from_secs(30), || async {
            heard.lock().unwrap().payments.len() > before + 20
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        assert!(recovered, "payments go through again after the restart");
    };
    let (_, ()) = tokio::join!(join_all(workers), fault);

    let heard = std::mem::take(&mut *heard.lock().unwrap());
    assert!(heard.refused > 0, "the kill interrupted some calls");
    let pg = &app.pg;
    let scalar = |sql: &'static str| async move {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(pg)
            .await
            .unwrap()
    };
    // Every OK answer is durable.
    let order_ids: Vec<i64> = heard.orders.iter().map(|o| o.0).collect();
    let found: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = ANY($1)")
        .bind(&order_ids)
        .fetch_one(pg)
        .await
        .unwrap();
    assert_eq!(
        found as usize,
        order_ids.len(),
        "an order answered OK was lost"
    );
    let payment_ids: Vec<i64> = heard.payments.iter().map(|p| p.0).collect();
    let found: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM payments p JOIN orders o ON o.id = p.order_id
         WHERE p.id = ANY($1) AND o.status = 'PAID'",
    )
    .bind(&payment_ids)
    .fetch_one(pg)
    .await
    .unwrap();
    assert_eq!(
        found as usize,
        payment_ids.len(),
        "a payment answered OK was lost"
    );
    // No partial order, no payment without its ledger entry and its event.
    let partial = scalar(
        "SELECT count(*) FROM orders o
         WHERE NOT EXISTS (SELECT 1 FROM order_items i WHERE i.order_id = o.id)",
    )
    .await;
    assert_eq!(partial, 0, "an order without its items");
    let unledgered = scalar(
        "SELECT count(*) FROM payments p
         WHERE NOT EXISTS (SELECT 1 FROM balance_history h
                           WHERE h.id = p.balance_history_id AND h.kind = 'USE'
                               AND h.order_id = p.order_id AND h.amount = p.amount)
            OR NOT EXISTS (SELECT 1 FROM outbox_events e
                           WHERE e.aggregate_id = p.id AND e.event_type = 'PaymentCompleted')",
    )
    .await;
    assert_eq!(unledgered, 0, "a payment without its ledger entry or event");
    let unpaid = scalar(
        "SELECT count(*) FROM orders o
         WHERE (o.status = 'PAID') <> EXISTS (SELECT 1 FROM payments p WHERE p.order_id = o.id)",
    )
    .await;
    assert_eq!(unpaid, 0, "paid orders and payments match");
    let sold = scalar("SELECT coalesce(sum(quantity), 0)::bigint FROM order_items").await;
    let left = scalar("SELECT stock FROM products").await;
    assert_eq!(left + sold, STOCK, "stock adds up");
    for user in 1..=USERS {
        assert_ledger_matches(&app, user).await;
    }
    eprintln!(
        "kill under batches: {} orders, {} payments heard OK, {} refused",
        heard.orders.len(),
        heard.payments.len(),
        heard.refused
    );
    app.stop().await;
}
