//! AdminService/RefundOrder: what a refund gives back and where it shows, every refusal, the
//! coupon rule, idempotent retries, and 50 concurrent refunds of one order racing a cancel and
//! the expiry job without ever giving back more than was paid.

use std::collections::{BTreeMap, HashMap};

use ecommerce::proto::{
    BalanceHistoryType, CancelOrderRequest, CreateCouponRequest, ListBalanceHistoryRequest,
    ListUserCouponsRequest, OrderStatus, RefundOrderRequest, UserCouponStatus, refund::Line,
};
use futures::future::join_all;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::support::{
    TestApp, assert_error, assert_no_violations,
    coupons::{coupon_request, create_coupon_with, fixed, issue, percent},
    eventually, invalid_field, reason,
    refunds::{FUNDS, misallocated, paid_order, refund, refund_request, refund_with},
    rules,
    shop::{assert_ledger_matches, balance, charge, create_product, get_order, pay, place, stock},
    spawn_app, spawn_app_with,
};

async fn coupon_for(app: &TestApp, user: i64, request: CreateCouponRequest) -> i64 {
    let coupon = create_coupon_with(app, request).await;
    issue(app, coupon, user).await.expect("issue coupon")
}

async fn coupon_status(app: &TestApp, user_coupon: i64) -> UserCouponStatus {
    let coupons = app
        .coupons()
        .list_user_coupons(ListUserCouponsRequest {
            user_id: 1,
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .user_coupons;
    coupons
        .iter()
        .find(|c| c.id == user_coupon)
        .expect("the user's coupon")
        .status()
}

async fn ledger_rows(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM balance_history")
        .fetch_one(&app.pg)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn a_refund_gives_back_each_line_share_and_a_full_refund_the_coupon(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;
    let kettle = create_product(&app, "kettle", 30_000, 10).await;
    let mug = create_product(&app, "mug", 7_000, 10).await;
    // 10% off capped at 5,000: total 51,000, discount 5,000, final 46,000.
    let request = CreateCouponRequest {
        discount: percent(10, 5_000),
        ..coupon_request(5)
    };
    let coupon = coupon_for(&app, 1, request).await;
    let order = paid_order(&app, 1, &[(kettle, 1), (mug, 3)], coupon).await;
    assert_eq!(order.final_amount, 46_000);
    let funded = balance(&app, 1).await;

    // Shares: kettle 30,000 × 46,000 / 51,000 = 27,058.82, mug 18,941.18; the won left over
    // goes to the larger remainder (kettle): 27,059 and 18,941. Mug units: floor(u × 6,313.73).
    let (after, first) = refund(&app, order.id, &[(mug, 2)], true, "r1")
        .await
        .unwrap();
    assert_eq!(
        first.lines,
        vec![Line {
            product_id: mug,
            quantity: 2,
            amount: 12_627
        }]
    );
    assert_eq!(
        (first.amount, first.balance_after),
        (12_627, funded + 12_627)
    );
    assert!(first.restocked && !first.coupon_returned);
    assert_eq!(after.status(), OrderStatus::PartiallyRefunded);
    assert_eq!(after.refunded_amount, 12_627);
    let refunded: Vec<(i64, i32)> = after
        .items
        .iter()
        .map(|i| (i.product_id, i.refunded_quantity))
        .collect();
    assert_eq!(refunded, vec![(kettle, 0), (mug, 2)]);
    assert_eq!(get_order(&app, 1, order.id).await.unwrap(), after);
    assert_eq!(stock(&app, mug).await, 10 - 3 + 2, "restocked");
    assert_eq!(coupon_status(&app, coupon).await, UserCouponStatus::Used);

    // No lines: everything left, the kettle and the last mug, not restocked.
    let (after, rest) = refund(&app, order.id, &[], false, "r2").await.unwrap();
    assert_eq!(
        rest.lines,
        vec![
            Line {
                product_id: kettle,
                quantity: 1,
                amount: 27_059
            },
            Line {
                product_id: mug,
                quantity: 1,
                amount: 18_941 - 12_627
            },
        ]
    );
    assert_eq!(first.amount + rest.amount, order.final_amount);
    assert_eq!(after.status(), OrderStatus::Refunded);
    assert_eq!(after.refunded_amount, order.final_amount);
    assert!(rest.coupon_returned);
    assert_eq!((stock(&app, kettle).await, stock(&app, mug).await), (9, 9));
    assert_eq!(balance(&app, 1).await, funded + order.final_amount);
    for r in [&first, &rest] {
        assert_eq!(misallocated(&order, r), None);
    }

    // The ledger shows both refunds against the order.
    let history = app
        .balance()
        .list_balance_history(ListBalanceHistoryRequest {
            user_id: 1,
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let refunds: Vec<(i64, i64, i64)> = history
        .iter()
        .filter(|e| e.r#type() == BalanceHistoryType::Refund)
        .map(|e| (e.amount, e.order_id, e.balance_after))
        .collect();
    assert_eq!(
        refunds,
        vec![
            (rest.amount, order.id, rest.balance_after),
            (first.amount, order.id, first.balance_after)
        ]
    );
    assert_ledger_matches(&app, 1).await;

    // The coupon is back and buys again.
    assert_eq!(
        coupon_status(&app, coupon).await,
        UserCouponStatus::Available
    );
    let again = paid_order(&app, 1, &[(kettle, 1)], coupon).await;
    assert_eq!(again.discount_amount, 3_000);
    assert_eq!(rules::broken(&app.pg).await, Vec::<String>::new());
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn an_expired_coupon_stays_used_after_a_full_refund(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let lamp = create_product(&app, "lamp", 20_000, 10).await;
    let request = CreateCouponRequest {
        discount: fixed(2_000),
        ..coupon_request(5)
    };
    let coupon = coupon_for(&app, 1, request).await;
    let order = paid_order(&app, 1, &[(lamp, 2)], coupon).await;
    sqlx::query("UPDATE user_coupons SET expires_at = now() - interval '1 minute' WHERE id = $1")
        .bind(coupon)
        .execute(&app.pg)
        .await
        .unwrap();
    let (after, all) = refund(&app, order.id, &[], true, "all").await.unwrap();
    assert_eq!(all.amount, 38_000);
    assert!(!all.coupon_returned);
    assert_eq!(after.status(), OrderStatus::Refunded);
    let (status, held_by): (String, Option<i64>) =
        sqlx::query_as("SELECT status, order_id FROM user_coupons WHERE id = $1")
            .bind(coupon)
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!((status.as_str(), held_by), ("USED", Some(order.id)));
    assert_eq!(rules::broken(&app.pg).await, Vec::<String>::new());
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn refusals_change_nothing_and_a_retried_key_returns_the_first_refund(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;
    let pen = create_product(&app, "pen", 1_500, 100).await;
    let ink = create_product(&app, "ink", 800, 100).await;
    let paper = create_product(&app, "paper", 300, 100).await;
    let order = paid_order(&app, 1, &[(pen, 4), (ink, 2)], 0).await;
    let other = paid_order(&app, 1, &[(pen, 1)], 0).await;
    let pending = place(&app, 1, &[(pen, 1)]).await.unwrap();
    let cancelled = place(&app, 1, &[(ink, 1)]).await.unwrap();
    app.orders()
        .cancel_order(CancelOrderRequest {
            order_id: cancelled.id,
            user_id: 1,
        })
        .await
        .unwrap();
    let rows = ledger_rows(&app).await;

    let status_of = |s: &Status| s.get_details_error_info().unwrap().metadata;
    for (id, status) in [(pending.id, "PENDING_PAYMENT"), (cancelled.id, "CANCELLED")] {
        let refused = assert_error(
            refund(&app, id, &[], false, "k").await,
            Code::FailedPrecondition,
            "ORDER_NOT_REFUNDABLE",
        );
        assert_eq!(status_of(&refused)["status"], status);
    }
    assert_error(
        refund(&app, 999_999, &[], false, "k").await,
        Code::NotFound,
        "ORDER_NOT_FOUND",
    );
    let invalid = [
        (refund_request(order.id, &[], false, ""), "idempotency_key"),
        (refund_request(0, &[], false, "k"), "order_id"),
        (
            refund_request(order.id, &[(pen, 0)], false, "k"),
            "lines[0].quantity",
        ),
        (
            refund_request(order.id, &[(pen, 1), (pen, 1)], false, "k"),
            "lines[1].product_id",
        ),
        (refund_request(order.id, &[(paper, 1)], false, "k"), "lines"),
        (
            RefundOrderRequest {
                reason: "line\nbreak".into(),
                ..refund_request(order.id, &[], false, "k")
            },
            "reason",
        ),
    ];
    for (request, field) in invalid {
        let status = refund_with(&app, request).await.unwrap_err();
        assert_eq!(invalid_field(&status), field, "{status:?}");
    }
    let too_many = assert_error(
        refund(&app, order.id, &[(ink, 3)], false, "k").await,
        Code::FailedPrecondition,
        "REFUND_EXCEEDS_REMAINING",
    );
    assert_eq!(status_of(&too_many)["remaining"], "2");
    let unauthenticated = app
        .admin_with_token(None)
        .refund_order(refund_request(order.id, &[], false, "k"))
        .await;
    assert_error(unauthenticated, Code::Unauthenticated, "UNAUTHENTICATED");
    assert_eq!(ledger_rows(&app).await, rows, "refusals write nothing");

    // A retry returns the first refund and changes nothing more; another request under the same
    // key (other lines, or another order of the same buyer) is refused.
    let (_, first) = refund(&app, order.id, &[(pen, 1)], true, "k")
        .await
        .unwrap();
    let (now, again) = refund(&app, order.id, &[(pen, 1)], true, "k")
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(now.refunded_amount, first.amount);
    assert_eq!(stock(&app, pen).await, 100 - 5 - 1 + 1);
    for request in [
        refund_request(order.id, &[(pen, 2)], true, "k"),
        refund_request(order.id, &[(pen, 1)], false, "k"),
        refund_request(other.id, &[(pen, 1)], true, "k"),
    ] {
        assert_error(
            refund_with(&app, request).await,
            Code::InvalidArgument,
            "IDEMPOTENCY_KEY_REUSED",
        );
    }
    // A paid order cannot be paid or cancelled again, refunded or not.
    assert_error(
        pay(&app, 1, order.id).await,
        Code::AlreadyExists,
        "ORDER_ALREADY_PAID",
    );
    let cancel = app
        .orders()
        .cancel_order(CancelOrderRequest {
            order_id: order.id,
            user_id: 1,
        })
        .await;
    assert_error(cancel, Code::FailedPrecondition, "ORDER_CLOSED");

    let (done, _) = refund(&app, order.id, &[], false, "rest").await.unwrap();
    assert_eq!(done.status(), OrderStatus::Refunded);
    let after = assert_error(
        refund(&app, order.id, &[], false, "more").await,
        Code::FailedPrecondition,
        "ORDER_NOT_REFUNDABLE",
    );
    assert_eq!(status_of(&after)["status"], "REFUNDED");
    assert_eq!(ledger_rows(&app).await, rows + 2);
    assert_ledger_matches(&app, 1).await;
    assert_eq!(rules::broken(&app.pg).await, Vec::<String>::new());
    app.stop().await;
}

/// Refusals a racing refund may meet: the units or the whole order were refunded first.
const RACE_REFUSALS: &[&str] = &["REFUND_EXCEEDS_REMAINING", "ORDER_NOT_REFUNDABLE"];

#[sqlx::test(migrations = false)]
async fn fifty_concurrent_refunds_never_give_back_more_than_was_paid(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app_with(db, |s| {
        s.set("ORDER_TTL_SECS", 1)
            .set("ORDER_EXPIRY_INTERVAL_SECS", 1)
            .set("DATABASE_MAX_CONNECTIONS", 24)
            .set("DATABASE_ACQUIRE_TIMEOUT_MS", 30_000);
    })
    .await;
    const STOCK: i64 = 1_000;
    let mut products = Vec::new();
    for (i, price) in [1_000, 2_500, 3_700, 9_900, 15_000].into_iter().enumerate() {
        products.push(create_product(&app, &format!("p{i}"), price, STOCK).await);
    }
    let request = CreateCouponRequest {
        discount: percent(7, 0),
        ..coupon_request(5)
    };
    let coupon = coupon_for(&app, 1, request).await;
    let items: Vec<(i64, i32)> = products.iter().map(|&p| (p, 30)).collect();
    let order = paid_order(&app, 1, &items, coupon).await;
    // Open orders for the same products: the expiry job gives their units back (locking the rows
    // the restocking refunds lock) while the refunds run, and one is cancelled among them.
    for user in 2..=6 {
        charge(&app, user, 1_000_000).await;
        place(&app, user, &[(products[0], 1), (products[4], 2)])
            .await
            .unwrap();
    }
    let to_cancel = place(&app, 2, &[(products[3], 3)]).await.unwrap();

    let mut rng = StdRng::seed_from_u64(21);
    // Random lines of one to three units, about 150 units asked for the order's 150; the last
    // key asks for everything left.
    let requests: Vec<RefundOrderRequest> = (0..50)
        .map(|k| {
            let lines: Vec<(i64, i32)> = if k == 49 {
                Vec::new()
            } else {
                let n = rng.random_range(1..=2);
                let picked: Vec<i64> = products.choose_multiple(&mut rng, n).copied().collect();
                picked
                    .into_iter()
                    .map(|p| (p, rng.random_range(1..=3)))
                    .collect()
            };
            refund_request(order.id, &lines, rng.random_bool(0.5), &format!("race-{k}"))
        })
        .collect();
    // Every fifth key is sent twice at once.
    let sends: Vec<&RefundOrderRequest> = requests
        .iter()
        .enumerate()
        .flat_map(|(k, r)| std::iter::repeat_n(r, if k % 5 == 0 { 2 } else { 1 }))
        .collect();
    let cancel = |order_id, user_id| {
        let mut orders = app.orders();
        async move {
            orders
                .cancel_order(CancelOrderRequest { order_id, user_id })
                .await
        }
    };
    let (results, cancel_paid, cancel_open) = tokio::join!(
        join_all(sends.iter().map(|&r| refund_with(&app, r.clone()))),
        cancel(order.id, 1),
        cancel(to_cancel.id, 2),
    );
    assert_error(cancel_paid, Code::FailedPrecondition, "ORDER_CLOSED");
    cancel_open.expect("an open order is cancelled meanwhile");

    let mut violations = Vec::new();
    let mut by_key: HashMap<&str, i64> = HashMap::new();
    let mut refunds = BTreeMap::new();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for (request, result) in sends.iter().zip(results) {
        let key = request.idempotency_key.as_str();
        match result {
            Ok((_, r)) => {
                *outcomes.entry("OK".into()).or_default() += 1;
                if let Some(problem) = misallocated(&order, &r) {
                    violations.push(problem);
                }
                if by_key.insert(key, r.id).is_some_and(|id| id != r.id) {
                    violations.push(format!("key {key} made two refunds"));
                }
                refunds.insert(r.id, ((*request).clone(), r));
            }
            Err(status) => {
                let (_, why) = reason(&status);
                if !RACE_REFUSALS.contains(&why.as_str()) {
                    violations.push(format!("{key}: {status:?}"));
                }
                *outcomes.entry(why).or_default() += 1;
            }
        }
    }

    // What the answers say the order gave back is what Postgres holds, never more than paid.
    let given: i64 = refunds.values().map(|(_, r)| r.amount).sum();
    let mut units: HashMap<i64, i32> = HashMap::new();
    let mut restocked: HashMap<i64, i64> = HashMap::new();
    for (_, r) in refunds.values() {
        for line in &r.lines {
            *units.entry(line.product_id).or_default() += line.quantity;
            if r.restocked {
                *restocked.entry(line.product_id).or_default() += i64::from(line.quantity);
            }
        }
    }
    let now = get_order(&app, 1, order.id).await.unwrap();
    eprintln!(
        "50 keys (10 sent twice at once): answers {outcomes:?}; {} refunds gave back {given} of \
         {} won, {} of 150 units; the order is {:?}",
        refunds.len(),
        order.final_amount,
        units.values().sum::<i32>(),
        now.status()
    );
    assert!(
        given <= order.final_amount,
        "gave back {given} of {}",
        order.final_amount
    );
    assert_eq!(now.refunded_amount, given);
    for item in &now.items {
        assert_eq!(
            item.refunded_quantity,
            units.get(&item.product_id).copied().unwrap_or(0)
        );
    }
    if now.status() == OrderStatus::Refunded {
        assert_eq!(
            given, order.final_amount,
            "every unit refunded: all of it back"
        );
    }
    assert!(
        outcomes.contains_key("OK") && outcomes.len() > 1,
        "{outcomes:?}"
    );

    // Retried keys return their refund; balances equal their ledgers.
    for (request, first) in refunds.values() {
        let (_, again) = refund_with(&app, request.clone()).await.unwrap();
        assert_eq!(&again, first);
    }
    for user in 1..=6 {
        assert_ledger_matches(&app, user).await;
    }
    assert_eq!(balance(&app, 1).await, FUNDS - order.final_amount + given);

    // Once the open orders expired, every unit is on the shelf or with the buyer.
    let closed = eventually(std::time::Duration::from_secs(20), || async {
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'PENDING_PAYMENT'")
                .fetch_one(&app.pg)
                .await
                .unwrap();
        open == 0
    })
    .await;
    assert!(closed, "the expiry job closed the open orders");
    for &product in &products {
        let expected = STOCK - 30 + restocked.get(&product).copied().unwrap_or(0);
        assert_eq!(stock(&app, product).await, expected, "product {product}");
    }
    violations.extend(rules::broken(&app.pg).await);
    assert_no_violations(&violations);
    // The coupon is back only if the order was refunded in full.
    let expected = if now.status() == OrderStatus::Refunded {
        UserCouponStatus::Available
    } else {
        UserCouponStatus::Used
    };
    assert_eq!(coupon_status(&app, coupon).await, expected);
    app.stop().await;
}
