//! Judges the record after a failover: is every acknowledged write in it, and do the books
//! still balance? The same checker runs on the control set-up (asynchronous replication), where
//! it must find losses: that is what proves it can.

use std::collections::BTreeMap;

use sqlx::PgPool;

use super::workload::Acked;
use crate::support::rules::RULES;

/// Per kind of write: (acknowledged, missing from the record).
pub type Losses = BTreeMap<&'static str, (usize, usize)>;

/// Counts the acknowledged writes the database does not have, each as the service answered
/// it: a charge as its ledger entry, an order with its items, a payment with its USE entry and
/// its outbox event, a coupon as its row.
pub async fn lost_writes(pg: &PgPool, acked: &[Acked]) -> Losses {
    let mut charges = (Vec::new(), Vec::new(), Vec::new());
    let mut orders = (Vec::new(), Vec::new());
    let mut payments = (Vec::new(), Vec::new());
    let mut coupons = (Vec::new(), Vec::new(), Vec::new());
    for write in acked {
        match write {
            Acked::Charge {
                user,
                amount,
                history_id,
                ..
            } => {
                charges.0.push(*history_id);
                charges.1.push(*user);
                charges.2.push(*amount);
            }
            Acked::Order { user, order_id, .. } => {
                orders.0.push(*order_id);
                orders.1.push(*user);
            }
            Acked::Payment {
                order_id,
                payment_id,
                ..
            } => {
                payments.0.push(*payment_id);
                payments.1.push(*order_id);
            }
            Acked::Coupon {
                user,
                coupon,
                user_coupon_id,
            } => {
                coupons.0.push(*user_coupon_id);
                coupons.1.push(*user);
                coupons.2.push(*coupon);
            }
        }
    }
    let missing = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql);
    let lost_charges = missing(
        "SELECT count(*) FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) a(id, user_id, amount)
         WHERE NOT EXISTS (SELECT 1 FROM balance_history h WHERE h.id = a.id
             AND h.user_id = a.user_id AND h.amount = a.amount AND h.kind = 'CHARGE')",
    )
    .bind(&charges.0)
    .bind(&charges.1)
    .bind(&charges.2)
    .fetch_one(pg)
    .await
    .unwrap();
    let lost_orders = missing(
        "SELECT count(*) FROM unnest($1::bigint[], $2::bigint[]) a(id, user_id)
         WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = a.id AND o.user_id = a.user_id
             AND EXISTS (SELECT 1 FROM order_items i WHERE i.order_id = o.id))",
    )
    .bind(&orders.0)
    .bind(&orders.1)
    .fetch_one(pg)
    .await
    .unwrap();
    let lost_payments = missing(
        "SELECT count(*) FROM unnest($1::bigint[], $2::bigint[]) a(id, order_id)
         WHERE NOT EXISTS (SELECT 1 FROM payments p
             JOIN balance_history h ON h.id = p.balance_history_id AND h.kind = 'USE'
             WHERE p.id = a.id AND p.order_id = a.order_id
               AND EXISTS (SELECT 1 FROM outbox_events e WHERE e.aggregate_id = p.id))",
    )
    .bind(&payments.0)
    .bind(&payments.1)
    .fetch_one(pg)
    .await
    .unwrap();
    let lost_coupons = missing(
        "SELECT count(*) FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) a(id, user_id, coupon_id)
         WHERE NOT EXISTS (SELECT 1 FROM user_coupons uc WHERE uc.id = a.id
             AND uc.user_id = a.user_id AND uc.coupon_id = a.coupon_id)",
    )
    .bind(&coupons.0)
    .bind(&coupons.1)
    .bind(&coupons.2)
    .fetch_one(pg)
    .await
    .unwrap();
    BTreeMap::from([
        ("charges", (charges.0.len(), lost_charges as usize)),
        ("orders", (orders.0.len(), lost_orders as usize)),
        ("payments", (payments.0.len(), lost_payments as usize)),
        ("coupons", (coupons.0.len(), lost_coupons as usize)),
    ])
}

pub fn total_lost(losses: &Losses) -> usize {
    losses.values().map(|(_, lost)| lost).sum()
}

/// The books on whatever the database holds: the conservation rules (balances equal their
/// ledgers, one payment, USE entry and event per paid order, coupons within their totals, one
/// per user), every order with its items, and every unit of stock on the shelf or in an open or
/// paid order. Returns what breaks.
pub async fn broken_rules(pg: &PgPool, initial_stock: i64) -> Vec<String> {
    let no_items = (
        "every order has items",
        "SELECT count(*) FROM orders o WHERE NOT EXISTS
             (SELECT 1 FROM order_items i WHERE i.order_id = o.id)",
    );
    let stock = (
        "stock + reserved + sold == initial",
        "SELECT count(*) FROM products p WHERE p.stock + coalesce((
             SELECT sum(i.quantity) FROM order_items i JOIN orders o ON o.id = i.order_id
             WHERE i.product_id = p.id AND o.status IN ('PENDING_PAYMENT', 'PAID')), 0) <> $1",
    );
    let mut broken = Vec::new();
    for &(what, sql) in RULES.iter().chain([&no_items, &stock]) {
        let mut query = sqlx::query_scalar::<_, i64>(sql);
        if sql.contains("$1") {
            query = query.bind(initial_stock);
        }
        let violations = query.fetch_one(pg).await.unwrap();
        if violations != 0 {
            broken.push(format!("{what}: {violations} rows"));
        }
    }
    broken
}
