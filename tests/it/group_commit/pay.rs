//! Group commit of payments: payments made together in one batch get the answers they get one
//! by one, for every way a payment can be refused, and the books agree.

use std::collections::BTreeMap;

use ecommerce::proto::{CancelOrderRequest, Payment};
use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::{
    Answer, Keys, answer, assert_batched, drop_database, key_result, keys, second_database,
};
use crate::support::{
    TestApp,
    coupons::{create_coupon, issue},
    shop::{
        assert_ledger_matches, charge, create_product, make_overdue, pay_with_key, place,
        place_with,
    },
    spawn_app_with,
};

const USERS: i64 = 200;
const PRICE: i64 = 1_000;
/// Places the orders that another user tries to pay.
const OTHER: i64 = USERS + 1;

/// A payment request: user, order, key.
type Request = (i64, i64, String);

/// A payment made: order, user, amount, balance after (its id and time differ between servers).
type Paid = (i64, i64, i64, i64);

fn paid(p: &Payment) -> Paid {
    (p.order_id, p.user_id, p.amount, p.balance_after)
}

/// The state both servers start from, made by the same calls (so ids agree); returns the
/// payment requests of the test, one per user, and the orders to expire just before them.
async fn prepare(app: &TestApp) -> (Vec<Request>, Vec<i64>) {
    let hot = create_product(app, "hot", PRICE, 100_000).await;
    let coupon = create_coupon(app, USERS).await;
    charge(app, OTHER, 100_000).await;
    let mut requests = Vec::new();
    let mut to_expire = Vec::new();
    for user in 1..=USERS {
        let quantity = 1 + (user % 3) as i32;
        let amount = PRICE * i64::from(quantity);
        // Insufficient balance: enough for the order when placed, then spent on another.
        if user % 12 == 0 {
            charge(app, user, amount).await;
        } else if user % 12 != 1 {
            charge(app, user, 100_000).await;
        }
        let order = place(app, user, &[(hot, quantity)]).await;
        if user % 12 == 0 {
            let other = place(app, user, &[(hot, 1)]).await.unwrap().id;
            pay_with_key(app, user, other, "").await.unwrap();
        }
        let key = format!("pay-{user}");
        let request = match user % 12 {
            // Never charged: no order placed (no balance), the payment names none.
            1 => (user, order.map_or(9_999_999, |o| o.id), String::new()),
            // A replayed key: the same payment already succeeded.
            2 => {
                let order = order.unwrap().id;
                pay_with_key(app, user, order, &key).await.unwrap();
                (user, order, key)
            }
            // A key already used to pay another order.
            3 => {
                let first = place(app, user, &[(hot, 1)]).await.unwrap().id;
                pay_with_key(app, user, first, &key).await.unwrap();
                (user, order.unwrap().id, key)
            }
            // Another user's order.
            4 => {
                let theirs = place(app, OTHER, &[(hot, 1)]).await.unwrap().id;
                (user, theirs, String::new())
            }
            // Expired (its deadline is moved into the past just before the payments).
            5 => {
                let order = order.unwrap().id;
                to_expire.push(order);
                (user, order, key)
            }
            // Cancelled.
            6 => {
                let order = order.unwrap().id;
                app.orders()
                    .cancel_order(CancelOrderRequest {
                        order_id: order,
                        user_id: user,
                    })
                    .await
                    .unwrap();
                (user, order, key)
            }
            // Already paid.
            7 => {
                let order = order.unwrap().id;
                pay_with_key(app, user, order, "").await.unwrap();
                (user, order, String::new())
            }
            // An unknown order.
            8 => (user, 9_999_999, key),
            // A coupon, and a fresh key.
            9 => {
                let uc = issue(app, coupon, user).await.unwrap();
                let mut request = ecommerce::proto::PlaceOrderRequest {
                    user_id: user,
                    items: crate::support::shop::lines(&[(hot, 1)]),
                    user_coupon_id: uc,
                    ..Default::default()
                };
                request.idempotency_key = format!("order-{user}");
                let with_coupon = place_with(app, request).await.unwrap().id;
                (user, with_coupon, key)
            }
            // A plain payment that goes through, with a fresh key or without one.
            10 => (user, order.unwrap().id, key),
            _ => (user, order.unwrap().id, String::new()),
        };
        requests.push(request);
    }
    (requests, to_expire)
}

/// What the books say after the payments: every balance and its ledger, the orders' states,
/// the coupons', the payments with their events, the idempotency keys.
async fn books(
    app: &TestApp,
) -> (
    Vec<i64>,
    BTreeMap<i64, String>,
    Vec<(i64, String)>,
    i64,
    Keys,
) {
    let mut balances = Vec::new();
    for user in 1..=OTHER {
        balances.push(assert_ledger_matches(app, user).await);
    }
    let orders: Vec<(i64, String)> = sqlx::query_as("SELECT id, status FROM orders ORDER BY id")
        .fetch_all(&app.pg)
        .await
        .unwrap();
    let coupons: Vec<(i64, String)> =
        sqlx::query_as("SELECT user_id, status FROM user_coupons ORDER BY user_id")
            .fetch_all(&app.pg)
            .await
            .unwrap();
    // Every payment has its ledger entry and exactly one event, numbered after its order's
    // placing: counted as payments whose books are whole.
    let whole: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM payments p
         JOIN balance_history h ON h.id = p.balance_history_id AND h.kind = 'USE'
             AND h.order_id = p.order_id AND h.amount = p.amount
         WHERE (SELECT count(*) FROM outbox_events e
                WHERE e.aggregate_id = p.id AND e.event_type = 'PaymentCompleted'
                    AND (e.payload->>'sequence')::int = 2) = 1",
    )
    .fetch_one(&app.pg)
    .await
    .unwrap();
    let payments: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(
        whole, payments,
        "a payment without its ledger entry or event"
    );
    let keys = keys(app).await;
    (
        balances,
        coupons.into_iter().collect(),
        orders,
        payments,
        keys,
    )
}

#[sqlx::test(migrations = false)]
async fn payments_in_one_batch_get_the_answers_they_get_alone(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let (alone_db, alone_name) = second_database(&db).await;
    // The expiry job stays away: an order past its deadline is refused by the payment itself.
    let batched = spawn_app_with(db, |s| {
        s.set("WRITE_BATCH_MAX", 128)
            .set("ORDER_EXPIRY_INTERVAL_SECS", 86_400);
    })
    .await;
    let alone = spawn_app_with(alone_db.clone(), |s| {
        s.set("WRITE_BATCH_MAX", 1)
            .set("ORDER_EXPIRY_INTERVAL_SECS", 86_400);
    })
    .await;
    let (requests, to_expire) = prepare(&batched).await;
    assert_eq!(prepare(&alone).await, (requests.clone(), to_expire.clone()));
    make_overdue(&batched, &to_expire).await;
    make_overdue(&alone, &to_expire).await;

    let together = join_all(
        requests
            .iter()
            .map(|(user, order, key)| pay_with_key(&batched, *user, *order, key)),
    )
    .await;
    let mut one_by_one = Vec::new();
    for (user, order, key) in &requests {
        one_by_one.push(pay_with_key(&alone, *user, *order, key).await);
    }
    let mut reasons = std::collections::BTreeSet::new();
    for ((request, batched), alone) in requests.iter().zip(&together).zip(&one_by_one) {
        assert_eq!(
            answer(batched, paid),
            answer(alone, paid),
            "{request:?}: batched {batched:?}, alone {alone:?}"
        );
        if let Answer::Refused(_, reason) = answer(batched, paid) {
            reasons.insert(reason);
        }
    }
    for expected in [
        "IDEMPOTENCY_KEY_REUSED",
        "NOT_ORDER_OWNER",
        "ORDER_EXPIRED",
        "ORDER_CLOSED",
        "ORDER_ALREADY_PAID",
        "INSUFFICIENT_BALANCE",
        "ORDER_NOT_FOUND",
    ] {
        assert!(
            reasons.contains(expected),
            "no {expected} among {reasons:?}"
        );
    }
    // A replay answers with the payment the key first made.
    for ((user, _, key), paid) in requests.iter().zip(&together) {
        if user % 12 == 2 {
            let first = key_result(&batched, *user, key).await;
            assert_eq!(paid.as_ref().unwrap().id, first);
        }
    }
    // Payments made together share their transaction's timestamp.
    let made: Vec<i64> = together
        .iter()
        .zip(&requests)
        .filter(|(_, (user, ..))| user % 12 != 2)
        .filter_map(|(p, _)| p.as_ref().ok().map(|p| p.id))
        .collect();
    assert!(made.len() >= 40, "only {} payments made", made.len());
    assert_batched(
        &batched,
        "SELECT count(DISTINCT paid_at) FROM payments WHERE id = ANY($1)",
        &made,
    )
    .await;
    assert_eq!(books(&batched).await, books(&alone).await);

    batched.stop().await;
    alone.stop().await;
    drop_database(&alone_db, &alone_name).await;
}
