//! The allocation rule, property-tested through the real server: random orders (1..=50 lines,
//! free and expensive lines, FIXED and PERCENT coupons of every size, some discounting the whole
//! order) are refunded by random partial refunds, in random order across the orders, until every
//! unit is back. Each refunded line must be within 1 won of its exact share, an order must never
//! give back more than it was paid, and once every unit is refunded it must have given back
//! exactly its final amount. `REFUND_SEED=<u64>` explores other orders.

use std::collections::BTreeMap;

use ecommerce::proto::{CreateCouponRequest, Order, OrderStatus};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::support::{
    assert_no_violations,
    coupons::{coupon_request, create_coupon_with, fixed, issue, percent},
    refunds::{misallocated, paid_order, refund},
    rules,
    shop::create_product,
    spawn_app_with,
};

const DEFAULT_SEED: u64 = 2_026_121;
const ORDERS: i64 = 24;

/// An order being refunded: as placed, with what is left of each line and what it gave back.
struct Refunding {
    order: Order,
    left: BTreeMap<i64, i32>,
    given: i64,
    refunds: usize,
}

#[sqlx::test(migrations = false)]
async fn random_partial_refunds_add_up_to_exactly_what_was_paid(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app_with(db, |s| {
        s.set("DATABASE_ACQUIRE_TIMEOUT_MS", 30_000);
    })
    .await;
    let seed = std::env::var("REFUND_SEED")
        .ok()
        .map(|s| s.parse().expect("REFUND_SEED is a u64"))
        .unwrap_or(DEFAULT_SEED);
    let mut rng = StdRng::seed_from_u64(seed);

    let mut products = Vec::new();
    for i in 0..50 {
        let price = match rng.random_range(0..10) {
            0 => 0,
            1 => rng.random_range(100_000..=1_000_000),
            _ => rng.random_range(1..=50_000),
        };
        products.push(create_product(&app, &format!("p{i}"), price, 1_000_000).await);
    }
    let mut coupons = Vec::new();
    for discount in [
        fixed(1),
        fixed(777),
        fixed(50_000),
        fixed(100_000_000),
        percent(1, 0),
        percent(33, 0),
        percent(50, 12_345),
        percent(99, 1_000_000),
        percent(100, 0),
    ] {
        let request = CreateCouponRequest {
            discount,
            ..coupon_request(ORDERS)
        };
        coupons.push(create_coupon_with(&app, request).await);
    }

    let mut orders = Vec::new();
    for user in 1..=ORDERS {
        let n = if rng.random_bool(0.5) {
            rng.random_range(1..=5)
        } else {
            rng.random_range(1..=50)
        };
        let lines: Vec<(i64, i32)> = products
            .choose_multiple(&mut rng, n)
            .copied()
            .collect::<Vec<_>>()
            .into_iter()
            .map(|p| (p, rng.random_range(1..=20)))
            .collect();
        let user_coupon = if rng.random_bool(0.75) {
            let coupon = *coupons.choose(&mut rng).unwrap();
            issue(&app, coupon, user).await.expect("issue")
        } else {
            0
        };
        let order = paid_order(&app, user, &lines, user_coupon).await;
        orders.push(Refunding {
            left: lines.iter().copied().collect(),
            order,
            given: 0,
            refunds: 0,
        });
    }

    let mut violations = Vec::new();
    let mut calls = 0;
    while let Some(at) = {
        let open: Vec<usize> = (0..orders.len())
            .filter(|&i| orders[i].left.values().any(|&n| n > 0))
            .collect();
        open.choose(&mut rng).copied()
    } {
        let o = &mut orders[at];
        let left: Vec<(i64, i32)> = o
            .left
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(&p, &n)| (p, n))
            .collect();
        let asked: Vec<(i64, i32)> = if rng.random_range(0..8) == 0 {
            Vec::new()
        } else {
            let mut picked = Vec::new();
            for &(p, n) in &left {
                if rng.random_range(0..3) == 0 {
                    picked.push((p, rng.random_range(1..=n)));
                }
            }
            if picked.is_empty() {
                picked.push((left[0].0, 1));
            }
            picked
        };
        let expected = if asked.is_empty() {
            left
        } else {
            asked.clone()
        };
        o.refunds += 1;
        calls += 1;
        let key = format!("o{}-{}", o.order.id, o.refunds);
        let (after, r) = refund(&app, o.order.id, &asked, o.refunds % 2 == 0, &key)
            .await
            .unwrap_or_else(|e| panic!("refund {key} of {expected:?}: {e:?}"));
        if let Some(problem) = misallocated(&o.order, &r) {
            violations.push(problem);
        }
        let mut got: Vec<(i64, i32)> = r.lines.iter().map(|l| (l.product_id, l.quantity)).collect();
        let mut want = expected.clone();
        got.sort_unstable();
        want.sort_unstable();
        if got != want {
            violations.push(format!("refund {key} asked {want:?}, refunded {got:?}"));
        }
        for (p, n) in expected {
            *o.left.get_mut(&p).unwrap() -= n;
        }
        o.given += r.amount;
        let done = o.left.values().all(|&n| n == 0);
        let final_amount = o.order.final_amount;
        if o.given > final_amount || after.refunded_amount != o.given {
            violations.push(format!(
                "order {}: gave back {} (order says {}) of {final_amount}",
                o.order.id, o.given, after.refunded_amount
            ));
        }
        let status = after.status();
        if done != (status == OrderStatus::Refunded) || (done && o.given != final_amount) {
            violations.push(format!(
                "order {} {status:?} after {} refunds gave back {} of {final_amount}",
                o.order.id, o.refunds, o.given
            ));
        }
    }

    let lines: usize = orders.iter().map(|o| o.order.items.len()).sum();
    let discounted = orders
        .iter()
        .filter(|o| o.order.discount_amount > 0)
        .count();
    eprintln!(
        "allocation (seed {seed}): {ORDERS} orders ({discounted} discounted, {lines} lines) \
         refunded in full by {calls} refunds"
    );
    violations.extend(rules::broken(&app.pg).await);
    assert_no_violations(&violations);
    app.stop().await;
}
