//! Closing open orders: buyers' cancels racing the expiry job on the same orders, and expiry
//! runs longer than one batch. Each order must be closed once, by one of them, with its stock
//! and coupon given back once and one event numbered after its placing.

use std::{collections::BTreeMap, time::Duration};

use ecommerce::proto::{CancelOrderRequest, PlaceOrderRequest};
use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::support::{
    TestApp,
    coupons::{create_coupon, issue},
    eventually, reason, rules,
    shop::{charge, create_product, lines, make_overdue, place_with, stock},
    spawn_app_with,
};

const STOCK: i64 = 10_000;

/// A cancel's answer: OK, or its code and reason.
type Answer = Result<(), (Code, String)>;

/// A server whose expiry job runs every second, and `names` products of `STOCK` units at
/// `price`.
async fn shop(db: PgConnectOptions, names: &[&str], price: i64) -> (TestApp, Vec<i64>) {
    let app = spawn_app_with(db, |s| {
        s.set("ORDER_EXPIRY_INTERVAL_SECS", 1)
            .set("DATABASE_ACQUIRE_TIMEOUT_MS", 30_000);
    })
    .await;
    let mut products = Vec::new();
    for name in names {
        products.push(create_product(&app, name, price, STOCK).await);
    }
    (app, products)
}

/// Places `per_user` orders for each of `users` (charged first, and each issued one coupon),
/// each for some of `products`; the first order of each user with their coupon. Returns
/// (buyer, order id) pairs.
async fn place_orders(
    app: &TestApp,
    products: &[i64],
    users: std::ops::RangeInclusive<i64>,
    per_user: usize,
) -> Vec<(i64, i64)> {
    let coupon = create_coupon(app, 100).await;
    let mut coupons = BTreeMap::new();
    for user in users.clone() {
        charge(app, user, 10_000_000).await;
        coupons.insert(user, issue(app, coupon, user).await.unwrap());
    }
    let coupons = &coupons;
    let requests = users.flat_map(|user| {
        (0..per_user).map(move |n| {
            // Two lines of varied quantities, so that orders share products unevenly.
            let first = products[(user as usize + n) % products.len()];
            let second = products[(user as usize + n + 1) % products.len()];
            let quantity = 1 + (user as i32 + n as i32) % 3;
            (user, n, lines(&[(first, quantity), (second, 1)]))
        })
    });
    join_all(requests.map(|(user, n, items)| async move {
        let user_coupon_id = if n == 0 { coupons[&user] } else { 0 };
        let request = PlaceOrderRequest {
            user_id: user,
            items,
            user_coupon_id,
            ..Default::default()
        };
        let order = place_with(app, request).await.expect("place");
        (user, order.id)
    }))
    .await
}

async fn all_closed(app: &TestApp) -> bool {
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'PENDING_PAYMENT'")
            .fetch_one(&app.pg)
            .await
            .unwrap();
    open == 0
}

/// Every unit is back on the shelf, every coupon free, and the books hold.
async fn assert_all_given_back(app: &TestApp, products: &[i64]) {
    for &product in products {
        assert_eq!(stock(app, product).await, STOCK, "product {product}");
    }
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM user_coupons WHERE status <> 'AVAILABLE' OR order_id IS NOT NULL",
    )
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(held, 0, "every coupon is given back");
    assert_eq!(rules::broken(&app.pg).await, Vec::<String>::new());
}

#[sqlx::test(migrations = false)]
async fn cancels_racing_the_expiry_job_close_each_order_once(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let (app, products) = shop(db, &["kettle", "toaster", "blender"], 20_000).await;
    let placed = place_orders(&app, &products, 1..=40, 3).await;

    // Three rounds, each of 40 orders made overdue at once and cancelled twice each, the
    // cancels spread over 1.2 s: every round spans a run of the job (once a second), so some
    // cancels come before it, some wait for the rows it holds, some come after it.
    let mut outcomes: BTreeMap<i64, Vec<Answer>> = BTreeMap::new();
    for round in placed.chunks(40) {
        let ids: Vec<i64> = round.iter().map(|&(_, order)| order).collect();
        make_overdue(&app, &ids).await;
        let cancels = round.iter().enumerate().flat_map(|(i, &(user, order))| {
            let app = &app;
            [0, 1].map(move |twin| async move {
                let delay = (i as u64 * 30 + twin * 15) % 1_200;
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let result = app
                    .orders()
                    .cancel_order(CancelOrderRequest {
                        order_id: order,
                        user_id: user,
                    })
                    .await;
                (order, result.map(|_| ()).map_err(|s| reason(&s)))
            })
        });
        for (order, result) in join_all(cancels).await {
            outcomes.entry(order).or_default().push(result);
        }
    }
    assert!(
        eventually(Duration::from_secs(15), || all_closed(&app)).await,
        "the job closes what the cancels left"
    );

    let statuses: BTreeMap<i64, String> = sqlx::query_as("SELECT id, status FROM orders")
        .fetch_all(&app.pg)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let (mut cancelled, mut expired) = (0, 0);
    for (order, results) in &outcomes {
        let won = results.iter().filter(|r| r.is_ok()).count();
        for refused in results.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(
                refused,
                &(Code::FailedPrecondition, "ORDER_CLOSED".to_string())
            );
        }
        match (won, statuses[order].as_str()) {
            (1, "CANCELLED") => cancelled += 1,
            (0, "EXPIRED") => expired += 1,
            other => panic!("order {order}: {other:?} ({results:?})"),
        }
    }
    assert!(
        cancelled > 0 && expired > 0,
        "{cancelled} cancelled, {expired} expired: no race"
    );
    let events: BTreeMap<String, i64> = sqlx::query_as(
        "SELECT event_type, count(*) FROM outbox_events
         WHERE event_type IN ('OrderCancelled', 'OrderExpired') GROUP BY event_type",
    )
    .fetch_all(&app.pg)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(events.get("OrderCancelled"), Some(&cancelled));
    assert_eq!(events.get("OrderExpired"), Some(&expired));
    assert_all_given_back(&app, &products).await;
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn expiry_closes_every_overdue_order_in_batches_of_a_hundred(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let (app, products) = shop(db, &["lamp", "rug", "vase", "clock"], 10_000).await;
    let placed = place_orders(&app, &products, 1..=50, 5).await;
    let ids: Vec<i64> = placed.iter().map(|&(_, order)| order).collect();
    assert_eq!(ids.len(), 250);
    make_overdue(&app, &ids).await;

    assert!(
        eventually(Duration::from_secs(15), || all_closed(&app)).await,
        "the job closes every overdue order"
    );
    let got: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM orders GROUP BY status")
            .fetch_all(&app.pg)
            .await
            .unwrap();
    assert_eq!(got, vec![("EXPIRED".to_string(), 250)]);
    // One run of the job, three transactions: each closes up to a hundred orders at its time.
    let mut batches: Vec<i64> =
        sqlx::query_scalar("SELECT count(*) FROM orders GROUP BY cancelled_at")
            .fetch_all(&app.pg)
            .await
            .unwrap();
    batches.sort_unstable();
    assert_eq!(batches, vec![50, 100, 100]);
    let expired: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_events WHERE event_type = 'OrderExpired'")
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!(expired, 250);
    assert_all_given_back(&app, &products).await;
    app.stop().await;
}
