//! What each worker does, from its own seeded generator: charges, coupon issues, orders with and
//! without coupons, cancels, payments (retried with their key, or several at once), payments
//! sent after the TTL, refunds of paid orders (in part or in full, restocked or not, retried
//! with their key or sent twice at once), and the reads and admin adjustments of `lists`. Each
//! answer goes to the record.

use std::{collections::HashSet, time::Duration};

use ecommerce::proto::{
    CancelOrderRequest, ChargeBalanceRequest, GetBalanceRequest, IssueCouponRequest, OrderLine,
    PayRequest, PlaceOrderRequest, RefundLine, RefundOrderRequest,
};
use futures::future::join_all;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

use super::{
    ORDER_TTL, USERS,
    coupon_admin::coupon_admin_op,
    lists::{adjust_op, admin_read_op, list_op},
    record::Shared,
    shop::Shop,
};
use crate::support::TestApp;

/// A key unique to this worker and operation.
fn key(prefix: &str, worker: usize, n: usize) -> String {
    format!("{prefix}-{worker}-{n}")
}

async fn charge_op(app: &TestApp, shared: &Shared, rng: &mut StdRng, worker: usize, n: usize) {
    let user = rng.random_range(1..=USERS);
    let amount = rng.random_range(1..=20) * 5_000;
    let keyed = rng.random_bool(0.4);
    let request = ChargeBalanceRequest {
        user_id: user,
        amount,
        idempotency_key: if keyed {
            key("charge", worker, n)
        } else {
            String::new()
        },
    };
    let call = |request: ChargeBalanceRequest| async move {
        app.balance()
            .charge_balance(request)
            .await
            .map(|r| r.into_inner())
    };
    let concurrent = keyed && rng.random_bool(0.2);
    let results = if concurrent {
        join_all([call(request.clone()), call(request.clone())]).await
    } else {
        vec![call(request.clone()).await]
    };
    let op = if concurrent {
        "charge (2 at once, one key)"
    } else {
        "charge"
    };
    let mut ids = HashSet::new();
    for result in &results {
        shared.note(op, result, &[]);
        if let Ok(r) = result {
            shared.charged(r.history_id, user, amount);
            ids.insert(r.history_id);
        }
    }
    if keyed && rng.random_bool(0.3) {
        let again = call(request).await;
        shared.note("charge retry (same key)", &again, &[]);
        if let Ok(r) = &again {
            shared.charged(r.history_id, user, amount);
            ids.insert(r.history_id);
        }
    }
    if ids.len() > 1 {
        shared.violation(format!(
            "one idempotency key credited several times: {ids:?}"
        ));
    }
}

async fn issue_op(app: &TestApp, shop: &Shop, shared: &Shared, rng: &mut StdRng) {
    let user = rng.random_range(1..=USERS);
    let coupon = *shop.coupon_ids.choose(rng).unwrap();
    let result = app
        .coupons()
        .issue_coupon(IssueCouponRequest {
            user_id: user,
            coupon_id: coupon,
        })
        .await
        .map(|r| r.into_inner().user_coupon.unwrap());
    shared.note(
        "issue coupon",
        &result,
        &["COUPON_SOLD_OUT", "COUPON_ALREADY_ISSUED"],
    );
    if let Ok(uc) = result {
        if uc.user_id != user || uc.coupon_id != coupon {
            shared.violation(format!("issued the wrong coupon: {uc:?}"));
        }
        shared.with(|r| {
            r.issued.insert(uc.id, (user, coupon));
            r.coupons_of.entry(user).or_default().push(uc.id);
        });
    }
}

const PLACE_REFUSALS: &[&str] = &["OUT_OF_STOCK", "INSUFFICIENT_BALANCE", "COUPON_UNUSABLE"];

/// Places a random order for `user`; returns its id when placed.
async fn place_op(
    app: &TestApp,
    shop: &Shop,
    shared: &Shared,
    rng: &mut StdRng,
    user: i64,
    key: Option<String>,
) -> Option<i64> {
    let lines = rng.random_range(1..=3);
    let items: Vec<OrderLine> = shop
        .products
        .choose_multiple(rng, lines)
        .map(|p| OrderLine {
            product_id: p.0,
            quantity: rng.random_range(1..=3),
        })
        .collect();
    let coupon = if rng.random_bool(0.4) {
        shared.with(|r| r.coupons_of.get(&user).and_then(|c| c.choose(rng).copied()))
    } else {
        None
    };
    let request = PlaceOrderRequest {
        user_id: user,
        items,
        user_coupon_id: coupon.unwrap_or(0),
        idempotency_key: key.clone().unwrap_or_default(),
    };
    let call = |request: PlaceOrderRequest| async move {
        app.orders()
            .place_order(request)
            .await
            .map(|r| r.into_inner().order.unwrap())
    };
    let first = call(request.clone()).await;
    shared.note("place order", &first, PLACE_REFUSALS);
    if let Ok(order) = &first {
        shared.placed(shop, user, coupon, order);
    }
    if key.is_some() && rng.random_bool(0.3) {
        let again = call(request).await;
        shared.note("place order retry (same key)", &again, PLACE_REFUSALS);
        match (&first, &again) {
            (Ok(a), Ok(b)) if a.id != b.id => shared.violation(format!(
                "a retried order key placed a second order: {} and {}",
                a.id, b.id
            )),
            // A replay answers the first order as it is now (paid, cancelled...): recorded.
            (Ok(_), Ok(_)) => {}
            // The first attempt was refused and left no key: the retry is a first attempt.
            (Err(_), Ok(b)) => shared.placed(shop, user, coupon, b),
            _ => {}
        }
        if let Ok(order) = again {
            return Some(order.id);
        }
    }
    first.ok().map(|o| o.id)
}

const PAY_REFUSALS: &[&str] = &[
    "ORDER_ALREADY_PAID",
    "ORDER_CLOSED",
    "ORDER_EXPIRED",
    "INSUFFICIENT_BALANCE",
];

async fn pay_op(
    app: &TestApp,
    shared: &Shared,
    rng: &mut StdRng,
    (order, user): (i64, i64),
    worker: usize,
    n: usize,
) {
    let keyed = rng.random_bool(0.5);
    let request = PayRequest {
        order_id: order,
        user_id: user,
        idempotency_key: if keyed {
            key("pay", worker, n)
        } else {
            String::new()
        },
    };
    let call = |request: PayRequest| async move {
        app.payments()
            .pay(request)
            .await
            .map(|r| r.into_inner().payment.unwrap())
    };
    let at_once = rng.random_bool(0.15);
    let (op, results) = if at_once {
        let calls = (0..3).map(|_| call(request.clone()));
        ("pay (3 at once)", join_all(calls).await)
    } else {
        ("pay", vec![call(request.clone()).await])
    };
    let mut ids = HashSet::new();
    for result in &results {
        shared.note(op, result, PAY_REFUSALS);
        if let Ok(p) = result {
            shared.paid(p.id, user, order, p.amount);
            ids.insert(p.id);
        }
    }
    if keyed && rng.random_bool(0.3) {
        let again = call(request).await;
        shared.note("pay retry (same key)", &again, PAY_REFUSALS);
        if let Ok(p) = &again {
            shared.paid(p.id, user, order, p.amount);
            ids.insert(p.id);
        }
    }
    if ids.len() > 1 {
        shared.violation(format!("order {order} got several payments: {ids:?}"));
    }
}

const REFUND_REFUSALS: &[&str] = &["ORDER_NOT_REFUNDABLE", "REFUND_EXCEEDS_REMAINING"];

/// Refunds a paid order: everything left, or some units of some lines (perhaps more than are
/// left); restocked or not; sometimes sent twice at once or retried with its key.
async fn refund_op(app: &TestApp, shared: &Shared, rng: &mut StdRng, worker: usize, n: usize) {
    let Some((order, items)) = shared.with(|r| {
        let order = *r.paid_list.choose(rng)?;
        Some((order, r.orders.get(&order)?.items.clone()))
    }) else {
        return;
    };
    let mut lines = Vec::new();
    if rng.random_bool(0.7) {
        for &(product_id, quantity) in &items {
            if rng.random_bool(0.5) {
                let quantity = rng.random_range(1..=quantity);
                lines.push(RefundLine {
                    product_id,
                    quantity,
                });
            }
        }
    }
    let request = RefundOrderRequest {
        order_id: order,
        lines,
        restock: rng.random_bool(0.5),
        reason: "conservation".into(),
        idempotency_key: key("refund", worker, n),
    };
    let call = |request: RefundOrderRequest| async move {
        app.admin()
            .refund_order(request)
            .await
            .map(|r| r.into_inner().refund.unwrap())
    };
    let (op, results) = if rng.random_bool(0.15) {
        let calls = [call(request.clone()), call(request.clone())];
        ("refund (2 at once, one key)", join_all(calls).await)
    } else {
        ("refund", vec![call(request.clone()).await])
    };
    let mut ids = HashSet::new();
    for result in &results {
        shared.note(op, result, REFUND_REFUSALS);
        if let Ok(refund) = result {
            shared.refunded(refund);
            ids.insert(refund.id);
        }
    }
    if rng.random_bool(0.3) {
        let again = call(request).await;
        shared.note("refund retry (same key)", &again, REFUND_REFUSALS);
        if let Ok(refund) = &again {
            shared.refunded(refund);
            ids.insert(refund.id);
        }
    }
    if ids.len() > 1 {
        shared.violation(format!("one refund key made several refunds: {ids:?}"));
    }
}

/// Places an order and pays it only after it expired: it must be refused.
async fn pay_late_op(app: &TestApp, shop: &Shop, shared: &Shared, rng: &mut StdRng) {
    let user = rng.random_range(1..=USERS);
    let Some(order) = place_op(app, shop, shared, rng, user, None).await else {
        return;
    };
    tokio::time::sleep(ORDER_TTL + Duration::from_millis(rng.random_range(100..1_500))).await;
    let late = app
        .payments()
        .pay(PayRequest {
            order_id: order,
            user_id: user,
            idempotency_key: String::new(),
        })
        .await
        .map(|r| r.into_inner().payment.unwrap());
    // Another worker may have paid or cancelled it in time; otherwise it is expired, by the job
    // (ORDER_CLOSED) or by its deadline (ORDER_EXPIRED).
    shared.note(
        "pay after the TTL",
        &late,
        &["ORDER_EXPIRED", "ORDER_CLOSED", "ORDER_ALREADY_PAID"],
    );
    if let Ok(p) = &late {
        let paid_before = shared.with(|r| r.paid_orders.contains_key(&order));
        shared.violation(format!(
            "an order was paid after its TTL (paid before: {paid_before}): {p:?}"
        ));
        shared.paid(p.id, user, order, p.amount);
    }
}

pub(super) async fn worker(
    app: &TestApp,
    shop: &Shop,
    shared: &Shared,
    worker: usize,
    ops: usize,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(worker as u64 * 7_919));
    // Orders this worker placed and has not acted on yet. Most payments and cancels are for
    // the order just placed, as a buyer's would be; the rest for an older one or any order at
    // all (already paid, cancelled, expired, or another worker's).
    let mut mine: Vec<(i64, i64)> = Vec::new();
    let pick = |rng: &mut StdRng, mine: &mut Vec<(i64, i64)>| -> Option<(i64, i64)> {
        let roll = rng.random_range(0..100);
        if !mine.is_empty() && roll < 80 {
            let i = if roll < 65 {
                mine.len() - 1
            } else {
                rng.random_range(0..mine.len())
            };
            return Some(mine.remove(i));
        }
        shared.with(|r| r.order_list.choose(rng).copied())
    };
    for n in 0..ops {
        match rng.random_range(0..100) {
            0..25 => charge_op(app, shared, &mut rng, worker, n).await,
            25..35 => issue_op(app, shop, shared, &mut rng).await,
            35..60 => {
                let user = rng.random_range(1..=USERS);
                let order_key = rng.random_bool(0.3).then(|| key("order", worker, n));
                if let Some(order) = place_op(app, shop, shared, &mut rng, user, order_key).await {
                    mine.push((order, user));
                    if mine.len() > 20 {
                        mine.remove(0);
                    }
                }
            }
            60..68 => {
                let Some((order, user)) = pick(&mut rng, &mut mine) else {
                    continue;
                };
                let result = app
                    .orders()
                    .cancel_order(CancelOrderRequest {
                        order_id: order,
                        user_id: user,
                    })
                    .await;
                shared.note("cancel order", &result, &["ORDER_CLOSED"]);
            }
            68..89 => {
                if let Some(target) = pick(&mut rng, &mut mine) {
                    pay_op(app, shared, &mut rng, target, worker, n).await;
                }
            }
            89..93 => refund_op(app, shared, &mut rng, worker, n).await,
            93..95 => list_op(app, shared, &mut rng).await,
            95 => admin_read_op(app, shop, shared, &mut rng).await,
            96 => coupon_admin_op(app, shop, shared, &mut rng).await,
            97 => adjust_op(app, shop, shared, &mut rng, key("adjust", worker, n)).await,
            98 => {
                let user = rng.random_range(1..=USERS);
                let result = app
                    .balance()
                    .get_balance(GetBalanceRequest { user_id: user })
                    .await
                    .map(|r| r.into_inner().balance);
                shared.note("get balance", &result, &[]);
                if result.as_ref().is_ok_and(|b| *b < 0) {
                    shared.violation(format!("user {user} has a negative balance {result:?}"));
                }
            }
            _ => pay_late_op(app, shop, shared, &mut rng).await,
        }
    }
}
