//! Rules the database must satisfy on any snapshot, whatever the traffic or the fault: no
//! negative balance or stock, balances equal to their ledgers, order totals equal to their lines,
//! coupons issued at most their quantity and reserved or used only as their orders say, exactly
//! one payment and one ledger entry per paid order, exactly one outbox event per order
//! transition, numbered in order, refunds that add up to what their orders record and never to
//! more than was paid. Kept as SQL in one place so that every test judges the books the same
//! way: the conservation workload during and after its run, the fault tests after a dependency
//! died under load, the refund races.

use sqlx::PgExecutor;

/// The rules `db` breaks, each with how many rows break it.
pub async fn broken<'c>(db: impl PgExecutor<'c> + Copy) -> Vec<String> {
    let mut broken = Vec::new();
    for &(rule, sql) in RULES {
        let rows: i64 = sqlx::query_scalar(sql).fetch_one(db).await.unwrap();
        if rows != 0 {
            broken.push(format!("{rule}: {rows} rows break it"));
        }
    }
    broken
}

/// Each rule as (what must hold, SQL counting the rows that break it).
pub const RULES: &[(&str, &str)] = &[
    (
        "no negative balance",
        "SELECT count(*) FROM user_balances WHERE balance < 0",
    ),
    (
        "no negative stock",
        "SELECT count(*) FROM products WHERE stock < 0",
    ),
    (
        "every balance equals its ledger",
        "SELECT count(*) FROM user_balances b
         WHERE b.balance <> (SELECT coalesce(sum(CASE kind WHEN 'USE' THEN -amount ELSE amount END), 0)
                             FROM balance_history h WHERE h.user_id = b.user_id)",
    ),
    (
        "an order's total is the sum of its lines",
        "SELECT count(*) FROM orders o
         WHERE o.total_amount <> (SELECT coalesce(sum(unit_price * quantity), 0)
                                  FROM order_items i WHERE i.order_id = o.id)",
    ),
    (
        "RESERVED coupons are held by an open order",
        "SELECT count(*) FROM user_coupons uc WHERE uc.status = 'RESERVED' AND NOT EXISTS (
             SELECT 1 FROM orders o WHERE o.id = uc.order_id AND o.user_coupon_id = uc.id
                 AND o.status = 'PENDING_PAYMENT')",
    ),
    (
        "open orders hold their coupon RESERVED",
        "SELECT count(*) FROM orders o WHERE o.status = 'PENDING_PAYMENT'
             AND o.user_coupon_id IS NOT NULL AND NOT EXISTS (
             SELECT 1 FROM user_coupons uc WHERE uc.id = o.user_coupon_id
                 AND uc.order_id = o.id AND uc.status = 'RESERVED')",
    ),
    (
        "USED coupons belong to a paid order",
        "SELECT count(*) FROM user_coupons uc WHERE uc.status = 'USED' AND NOT EXISTS (
             SELECT 1 FROM orders o WHERE o.id = uc.order_id AND o.user_coupon_id = uc.id
                 AND o.status IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED'))",
    ),
    (
        "paid orders not fully refunded used their coupon",
        "SELECT count(*) FROM orders o WHERE o.status IN ('PAID', 'PARTIALLY_REFUNDED')
             AND o.user_coupon_id IS NOT NULL AND NOT EXISTS (
             SELECT 1 FROM user_coupons uc WHERE uc.id = o.user_coupon_id
                 AND uc.order_id = o.id AND uc.status = 'USED')",
    ),
    (
        "a refunded order's coupon is still USED by it, or its last refund gave it back",
        "SELECT count(*) FROM orders o WHERE o.status = 'REFUNDED'
             AND o.user_coupon_id IS NOT NULL
             AND NOT EXISTS (SELECT 1 FROM user_coupons uc WHERE uc.id = o.user_coupon_id
                 AND uc.order_id = o.id AND uc.status = 'USED')
             AND NOT EXISTS (SELECT 1 FROM refunds r WHERE r.order_id = o.id
                 AND r.coupon_returned)",
    ),
    (
        "AVAILABLE coupons back no open or paid order",
        "SELECT count(*) FROM user_coupons uc JOIN orders o ON o.user_coupon_id = uc.id
         WHERE uc.status = 'AVAILABLE'
             AND o.status IN ('PENDING_PAYMENT', 'PAID', 'PARTIALLY_REFUNDED')",
    ),
    (
        "coupons are used by their holder",
        "SELECT count(*) FROM orders o JOIN user_coupons uc ON uc.id = o.user_coupon_id
         WHERE uc.user_id <> o.user_id",
    ),
    (
        "a coupon is issued at most total_quantity times, once per user",
        "SELECT count(*) FROM coupons c
         WHERE (SELECT count(*) FROM user_coupons uc WHERE uc.coupon_id = c.id) > c.total_quantity
            OR (SELECT count(*) - count(DISTINCT user_id) FROM user_coupons uc
                WHERE uc.coupon_id = c.id) <> 0",
    ),
    (
        "every paid order has exactly one payment",
        "SELECT count(*) FROM orders o
         WHERE o.status IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED')
             AND (SELECT count(*) FROM payments p WHERE p.order_id = o.id) <> 1",
    ),
    (
        "no payment for an order that is not paid",
        "SELECT count(*) FROM payments p JOIN orders o ON o.id = p.order_id
         WHERE o.status NOT IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED')",
    ),
    (
        "a payment takes the order's final amount from its buyer",
        "SELECT count(*) FROM payments p JOIN orders o ON o.id = p.order_id
         WHERE p.amount <> o.final_amount OR p.user_id <> o.user_id",
    ),
    (
        "a payment has its USE ledger entry",
        "SELECT count(*) FROM payments p JOIN balance_history h ON h.id = p.balance_history_id
         WHERE h.kind <> 'USE' OR h.amount <> p.amount OR h.order_id <> p.order_id
            OR h.user_id <> p.user_id",
    ),
    (
        "every USE ledger entry is a payment",
        "SELECT count(*) FROM balance_history h WHERE h.kind = 'USE' AND NOT EXISTS (
             SELECT 1 FROM payments p WHERE p.balance_history_id = h.id)",
    ),
    (
        "every REFUND ledger entry is a refund crediting its buyer its amount",
        "SELECT count(*) FROM balance_history h WHERE h.kind = 'REFUND' AND NOT EXISTS (
             SELECT 1 FROM refunds r WHERE r.balance_history_id = h.id AND r.amount = h.amount
                 AND r.user_id = h.user_id AND r.order_id = h.order_id)",
    ),
    (
        "a refund refunds a paid order of its buyer, by the sum of its lines",
        "SELECT count(*) FROM refunds r JOIN orders o ON o.id = r.order_id
         WHERE o.status NOT IN ('PARTIALLY_REFUNDED', 'REFUNDED') OR o.user_id <> r.user_id
            OR r.amount <> (SELECT coalesce(sum(l.amount), 0) FROM refund_lines l
                            WHERE l.refund_id = r.id)
            OR NOT EXISTS (SELECT 1 FROM refund_lines l WHERE l.refund_id = r.id)",
    ),
    (
        "an order's refunded amount is what its refunds gave back, never more than it paid",
        "SELECT count(*) FROM orders o
         WHERE o.refunded_amount <> (SELECT coalesce(sum(r.amount), 0) FROM refunds r
                                     WHERE r.order_id = o.id)
            OR o.refunded_amount > o.final_amount
            OR (o.status = 'REFUNDED' AND o.refunded_amount <> o.final_amount)",
    ),
    (
        "a line's refunded units are what its refunds gave back, never more than it holds",
        "SELECT count(*) FROM order_items i
         WHERE i.refunded_quantity <> (SELECT coalesce(sum(l.quantity), 0) FROM refund_lines l
                                       WHERE l.order_id = i.order_id
                                           AND l.product_id = i.product_id)
            OR i.refunded_quantity > i.quantity",
    ),
    (
        "a REFUNDED order refunded every unit, a PARTIALLY_REFUNDED one some but not all",
        "SELECT count(*) FROM orders o
         JOIN (SELECT order_id, sum(quantity) AS units, sum(refunded_quantity) AS refunded
               FROM order_items GROUP BY order_id) i ON i.order_id = o.id
         WHERE (o.status = 'REFUNDED') <> (i.refunded = i.units)
            OR (o.status = 'PARTIALLY_REFUNDED') <> (i.refunded > 0 AND i.refunded < i.units)",
    ),
    (
        "exactly one outbox event per payment",
        "SELECT count(*) FROM payments p WHERE (SELECT count(*) FROM outbox_events e
             WHERE e.aggregate_id = p.id AND e.event_type = 'PaymentCompleted') <> 1",
    ),
    (
        "no payment event without its payment",
        "SELECT count(*) FROM outbox_events e WHERE e.event_type = 'PaymentCompleted'
             AND NOT EXISTS (SELECT 1 FROM payments p
                             WHERE p.id = e.aggregate_id AND p.order_id = e.order_id)",
    ),
    (
        "one event per order transition, numbered 1, 2... in the order of the transitions",
        "WITH numbered AS (
             SELECT order_id, string_agg(event_type || '#' || (payload->>'sequence'), ','
                                         ORDER BY (payload->>'sequence')::int) AS events,
                    max((payload->>'sequence')::int) AS last
             FROM outbox_events GROUP BY order_id
         )
         SELECT count(*) FROM orders o LEFT JOIN numbered n ON n.order_id = o.id
         WHERE n.last IS DISTINCT FROM o.event_sequence
            OR n.events IS DISTINCT FROM CASE o.status
                 WHEN 'PENDING_PAYMENT' THEN 'OrderPlaced#1'
                 WHEN 'PAID' THEN 'OrderPlaced#1,PaymentCompleted#2'
                 WHEN 'CANCELLED' THEN 'OrderPlaced#1,OrderCancelled#2'
                 WHEN 'EXPIRED' THEN 'OrderPlaced#1,OrderExpired#2'
                 ELSE 'OrderPlaced#1,PaymentCompleted#2' || (
                     SELECT string_agg(',OrderRefunded#' || k, '' ORDER BY k)
                     FROM generate_series(3, 2 + (SELECT count(*) FROM refunds r
                                                  WHERE r.order_id = o.id)) AS k)
             END",
    ),
    (
        "no event without its order",
        "SELECT count(*) FROM outbox_events e
         WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = e.order_id)",
    ),
];
