//! Rules the database must satisfy on any snapshot, whatever the traffic or the fault: no
//! negative balance or stock, balances equal to their ledgers, order totals equal to their lines,
//! coupons issued at most their quantity and reserved or used only as their orders say, exactly
//! one payment and one ledger entry per paid order, exactly one outbox event per order
//! transition, numbered in order. Kept as SQL in one place so
//! that every test judges the books the same way: the conservation workload during and after its
//! run, the fault tests after a dependency died under load.

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
                 AND o.status = 'PAID')",
    ),
    (
        "paid orders used their coupon",
        "SELECT count(*) FROM orders o WHERE o.status = 'PAID'
             AND o.user_coupon_id IS NOT NULL AND NOT EXISTS (
             SELECT 1 FROM user_coupons uc WHERE uc.id = o.user_coupon_id
                 AND uc.order_id = o.id AND uc.status = 'USED')",
    ),
    (
        "AVAILABLE coupons back no open or paid order",
        "SELECT count(*) FROM user_coupons uc JOIN orders o ON o.user_coupon_id = uc.id
         WHERE uc.status = 'AVAILABLE' AND o.status IN ('PENDING_PAYMENT', 'PAID')",
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
        "SELECT count(*) FROM orders o WHERE o.status = 'PAID'
             AND (SELECT count(*) FROM payments p WHERE p.order_id = o.id) <> 1",
    ),
    (
        "no payment for an order that is not paid",
        "SELECT count(*) FROM payments p JOIN orders o ON o.id = p.order_id
         WHERE o.status <> 'PAID'",
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
        "SELECT count(*) FROM balance_history h WHERE h.kind <> 'CHARGE' AND NOT EXISTS (
             SELECT 1 FROM payments p WHERE p.balance_history_id = h.id)",
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
             END",
    ),
    (
        "no event without its order",
        "SELECT count(*) FROM outbox_events e
         WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = e.order_id)",
    ),
];
