//! The lifecycle scenario's invariants, checked in Postgres after the run over every order of
//! the run's products (so also the orders whose PlaceOrder had an unknown outcome):
//!
//! * **money**: each paid order has one payment and one USE ledger entry of its final amount;
//!   its refunds, their lines, its REFUND ledger entries and `refunded_amount` add up to the
//!   same sum, never more than was paid; each line's refunds stay within its share of the final
//!   amount (rounded up) and its refunded units within its units; the status says how much was
//!   refunded (PAID: nothing, PARTIALLY_REFUNDED: some units, REFUNDED: every unit).
//! * **stock**: per product, initial stock = stock now + units of orders not cancelled or
//!   expired − units refunded with restock (the rule of `src/app/refunds.rs`: a restocking
//!   refund puts its units back as a cancel does).
//! * **events**: exactly one outbox event per transition (OrderPlaced; PaymentCompleted when
//!   paid; OrderCancelled or OrderExpired when closed; one OrderRefunded per refund), numbered
//!   1..n with n the order's `event_sequence`, placing first and paying (or closing) second.
//! * **the run's view**: every order the run left in a known state is in that state, with that
//!   refunded amount (an order left open may have expired since: runs longer than
//!   `ORDER_TTL_SECS`).
//!
//! Balances (= charges − uses + refunds, and their ledgers) are checked by the common balance
//! checks. Reads are plain SELECTs; the judging is pure and tested below.

use std::collections::HashMap;

use sqlx::PgPool;

use super::{judge::Check, lifecycle::LifeSeen, seen::Problems};

/// One order of the run's products, with the sums of what refers to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct DbOrder {
    pub id: i64,
    pub status: String,
    pub total_amount: i64,
    pub final_amount: i64,
    pub refunded_amount: i64,
    pub event_sequence: i32,
    pub payments: i64,
    pub paid: i64,
    pub uses: i64,
    pub used: i64,
    pub refunds: i64,
    pub refunds_sum: i64,
    pub refund_entries: i64,
    pub refund_lines_sum: i64,
}

/// One line of such an order.
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct DbLine {
    pub order_id: i64,
    pub product_id: i64,
    pub unit_price: i64,
    pub quantity: i32,
    pub refunded_quantity: i32,
    /// From its refund lines.
    pub lines_quantity: i64,
    pub lines_amount: i64,
}

/// One of the run's products.
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct DbProduct {
    pub id: i64,
    pub stock: i64,
    /// Units in orders neither cancelled nor expired.
    pub held: i64,
    /// Units refunded with restock.
    pub restocked: i64,
}

/// One outbox event of such an order.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct DbEvent {
    pub order_id: i64,
    pub event_type: String,
    pub sequence: Option<i32>,
}

#[derive(Debug, Default)]
pub struct LifeDb {
    pub orders: Vec<DbOrder>,
    pub lines: Vec<DbLine>,
    pub products: Vec<DbProduct>,
    pub events: Vec<DbEvent>,
}

const ORDERS: &str = "
    WITH o AS (SELECT * FROM orders WHERE id IN (
                   SELECT order_id FROM order_items WHERE product_id = ANY($1))),
         pay AS (SELECT order_id, count(*) AS n, sum(amount) AS s FROM payments
                 WHERE order_id IN (SELECT id FROM o) GROUP BY order_id),
         led AS (SELECT order_id,
                        count(*) FILTER (WHERE kind = 'USE') AS uses,
                        sum(amount) FILTER (WHERE kind = 'USE') AS used,
                        sum(amount) FILTER (WHERE kind = 'REFUND') AS refunded
                 FROM balance_history WHERE order_id IN (SELECT id FROM o) GROUP BY order_id),
         ref AS (SELECT order_id, count(*) AS n, sum(amount) AS s FROM refunds
                 WHERE order_id IN (SELECT id FROM o) GROUP BY order_id),
         rl AS (SELECT order_id, sum(amount) AS s FROM refund_lines
                WHERE order_id IN (SELECT id FROM o) GROUP BY order_id)
    SELECT o.id, o.status, o.total_amount, o.final_amount, o.refunded_amount, o.event_sequence,
           coalesce(pay.n, 0)::bigint AS payments, coalesce(pay.s, 0)::bigint AS paid,
           coalesce(led.uses, 0)::bigint AS uses, coalesce(led.used, 0)::bigint AS used,
           coalesce(ref.n, 0)::bigint AS refunds, coalesce(ref.s, 0)::bigint AS refunds_sum,
           coalesce(led.refunded, 0)::bigint AS refund_entries,
           coalesce(rl.s, 0)::bigint AS refund_lines_sum
    FROM o LEFT JOIN pay ON pay.order_id = o.id LEFT JOIN led ON led.order_id = o.id
         LEFT JOIN ref ON ref.order_id = o.id LEFT JOIN rl ON rl.order_id = o.id
    ORDER BY o.id";

const LINES: &str = "
    SELECT i.order_id, i.product_id, i.unit_price, i.quantity, i.refunded_quantity,
           coalesce(sum(l.quantity), 0)::bigint AS lines_quantity,
           coalesce(sum(l.amount), 0)::bigint AS lines_amount
    FROM order_items i
    LEFT JOIN refund_lines l ON l.order_id = i.order_id AND l.product_id = i.product_id
    WHERE i.order_id IN (SELECT order_id FROM order_items WHERE product_id = ANY($1))
    GROUP BY i.order_id, i.product_id
    ORDER BY i.order_id, i.product_id";

const PRODUCTS: &str = "
    SELECT p.id, p.stock,
           (SELECT coalesce(sum(i.quantity), 0) FROM order_items i JOIN orders o ON o.id = i.order_id
            WHERE i.product_id = p.id AND o.status NOT IN ('CANCELLED', 'EXPIRED'))::bigint AS held,
           (SELECT coalesce(sum(l.quantity), 0) FROM refund_lines l JOIN refunds r ON r.id = l.refund_id
            WHERE l.product_id = p.id AND r.restocked)::bigint AS restocked
    FROM products p WHERE p.id = ANY($1) ORDER BY p.id";

/// Events written before the `order_id` column name their order in the payload only.
const EVENTS: &str = "
    SELECT coalesce(order_id, (payload->>'order_id')::bigint) AS order_id, event_type,
           (payload->>'sequence')::int AS sequence
    FROM outbox_events
    WHERE coalesce(order_id, (payload->>'order_id')::bigint) IN (
        SELECT order_id FROM order_items WHERE product_id = ANY($1))";

pub async fn read(pool: &PgPool, products: &[i64]) -> Result<LifeDb, sqlx::Error> {
    Ok(LifeDb {
        orders: sqlx::query_as(ORDERS)
            .bind(products)
            .fetch_all(pool)
            .await?,
        lines: sqlx::query_as(LINES).bind(products).fetch_all(pool).await?,
        products: sqlx::query_as(PRODUCTS)
            .bind(products)
            .fetch_all(pool)
            .await?,
        events: sqlx::query_as(EVENTS)
            .bind(products)
            .fetch_all(pool)
            .await?,
    })
}

fn is_paid(status: &str) -> bool {
    matches!(status, "PAID" | "PARTIALLY_REFUNDED" | "REFUNDED")
}

/// Why an order's money does not add up, if it does not.
fn money_problem(o: &DbOrder, lines: &[&DbLine]) -> Option<String> {
    let id = o.id;
    let paid = is_paid(&o.status);
    let times = i64::from(paid);
    if (o.payments, o.uses) != (times, times) {
        return Some(format!(
            "order {id} ({}) has {} payments and {} USE entries",
            o.status, o.payments, o.uses
        ));
    }
    if paid && (o.paid, o.used) != (o.final_amount, o.final_amount) {
        return Some(format!(
            "order {id} paid {} (ledger {}) of final amount {}",
            o.paid, o.used, o.final_amount
        ));
    }
    let sums = [o.refunds_sum, o.refund_entries, o.refund_lines_sum];
    if sums.iter().any(|&s| s != o.refunded_amount) {
        return Some(format!(
            "order {id}: refunded_amount {} but refunds {}, REFUND entries {}, refund lines {}",
            o.refunded_amount, o.refunds_sum, o.refund_entries, o.refund_lines_sum
        ));
    }
    if o.refunded_amount > o.paid || (o.refunds > 0 && !paid) {
        return Some(format!(
            "order {id} ({}) refunded {} of {} paid",
            o.status, o.refunded_amount, o.paid
        ));
    }
    let all = lines.iter().all(|l| l.refunded_quantity == l.quantity);
    let some = lines.iter().any(|l| l.refunded_quantity > 0);
    let fits = match o.status.as_str() {
        "REFUNDED" => all && o.refunded_amount == o.final_amount,
        "PARTIALLY_REFUNDED" => some && !all,
        _ => !some && o.refunds == 0,
    };
    (!fits).then(|| {
        format!(
            "order {id} is {} with {} of {} refunded (every unit: {all})",
            o.status, o.refunded_amount, o.final_amount
        )
    })
}

/// Why a line's refunds pass what it paid, if they do.
fn line_problem(l: &DbLine, order: &DbOrder) -> Option<String> {
    let (id, product) = (l.order_id, l.product_id);
    if i64::from(l.refunded_quantity) != l.lines_quantity
        || !(0..=l.quantity).contains(&l.refunded_quantity)
    {
        return Some(format!(
            "order {id} product {product}: {} of {} units refunded, refund lines say {}",
            l.refunded_quantity, l.quantity, l.lines_quantity
        ));
    }
    // The line's exact share of the final amount, rounded up: no allocation gives more.
    let total = i128::from(l.unit_price) * i128::from(l.quantity);
    let share = if order.total_amount > 0 {
        let num = total * i128::from(order.final_amount);
        let den = i128::from(order.total_amount);
        (num + den - 1) / den
    } else {
        0
    };
    (i128::from(l.lines_amount) > share).then(|| {
        format!(
            "order {id} product {product}: refunded {} of a share of {share}",
            l.lines_amount
        )
    })
}

/// Why an order's events are not one per transition, numbered 1..n, if they are not.
fn events_problem(o: &DbOrder, events: &[&DbEvent]) -> Option<String> {
    let mut events: Vec<&DbEvent> = events.to_vec();
    events.sort_by_key(|e| e.sequence);
    let sequences: Vec<Option<i32>> = events.iter().map(|e| e.sequence).collect();
    let want: Vec<Option<i32>> = (1..=o.event_sequence).map(Some).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let count = |t: &str| types.iter().filter(|&&x| x == t).count() as i64;
    let second = match o.status.as_str() {
        "CANCELLED" => Some("OrderCancelled"),
        "EXPIRED" => Some("OrderExpired"),
        s if is_paid(s) => Some("PaymentCompleted"),
        _ => None,
    };
    let expected_counts = [
        ("OrderPlaced", 1),
        ("PaymentCompleted", i64::from(is_paid(&o.status))),
        ("OrderCancelled", i64::from(o.status == "CANCELLED")),
        ("OrderExpired", i64::from(o.status == "EXPIRED")),
        ("OrderRefunded", o.refunds),
    ];
    let counts_fit = expected_counts.iter().all(|&(t, n)| count(t) == n)
        && expected_counts.iter().map(|&(_, n)| n).sum::<i64>() == types.len() as i64;
    let order_fits = types.first() == Some(&"OrderPlaced") && types.get(1).copied() == second;
    (sequences != want || !counts_fit || !order_fits).then(|| {
        format!(
            "order {} ({}, {} refunds, event_sequence {}): events {:?} numbered {:?}",
            o.id, o.status, o.refunds, o.event_sequence, types, sequences
        )
    })
}

/// The checks, from what Postgres holds and what the run saw; `initial` is each product's
/// stock when it was created.
pub fn checks(db: &LifeDb, seen: &LifeSeen, initial: &HashMap<i64, i64>) -> Vec<Check> {
    let mut lines_of: HashMap<i64, Vec<&DbLine>> = HashMap::new();
    for line in &db.lines {
        lines_of.entry(line.order_id).or_default().push(line);
    }
    let mut events_of: HashMap<i64, Vec<&DbEvent>> = HashMap::new();
    for event in &db.events {
        events_of.entry(event.order_id).or_default().push(event);
    }
    let orders: HashMap<i64, &DbOrder> = db.orders.iter().map(|o| (o.id, o)).collect();
    let (mut money, mut per_line, mut events) = (
        Problems::default(),
        Problems::default(),
        Problems::default(),
    );
    for o in &db.orders {
        let lines = lines_of.get(&o.id).map_or(&[][..], Vec::as_slice);
        if let Some(p) = money_problem(o, lines) {
            money.add(|| p);
        }
        let problem = events_problem(o, events_of.get(&o.id).map_or(&[][..], Vec::as_slice));
        if let Some(p) = problem {
            events.add(|| p);
        }
    }
    for l in &db.lines {
        if let Some(p) = orders.get(&l.order_id).and_then(|o| line_problem(l, o)) {
            per_line.add(|| p);
        }
    }
    let mut stock = Problems::default();
    for p in &db.products {
        let start = initial.get(&p.id).copied().unwrap_or_default();
        if p.stock < 0 || p.stock + p.held - p.restocked != start {
            stock.add(|| {
                format!(
                    "product {}: initial {start} but stock {} + held {} - restocked {} = {}",
                    p.id,
                    p.stock,
                    p.held,
                    p.restocked,
                    p.stock + p.held - p.restocked
                )
            });
        }
    }
    if db.products.len() != initial.len() {
        stock.add(|| format!("{} of {} products read", db.products.len(), initial.len()));
    }
    let mut left = Problems::default();
    let known = seen.orders.iter().filter(|o| o.expected.is_some()).count();
    for life in &seen.orders {
        let Some(expected) = life.expected else {
            continue;
        };
        let status = expected
            .status
            .as_str_name()
            .trim_start_matches("ORDER_STATUS_");
        match orders.get(&life.order_id) {
            // An order left open may have expired since (the expiry job's own transition).
            Some(o)
                if (o.status == status
                    || (status == "PENDING_PAYMENT" && o.status == "EXPIRED"))
                    && o.refunded_amount == expected.refunded_amount => {}
            Some(o) => left.add(|| {
                format!(
                    "order {} is {} with {} refunded; the run left it {status} with {}",
                    o.id, o.status, o.refunded_amount, expected.refunded_amount
                )
            }),
            None => left.add(|| format!("order {} is not in Postgres", life.order_id)),
        }
    }
    let n = db.orders.len() as u64;
    let mut checks = vec![
        Check::none(
            "each paid order: one payment and one USE entry of its final amount; refunds == \
             their lines == REFUND entries == refunded_amount <= paid; status matches the units \
             refunded (Postgres)",
            &money,
            n,
        ),
        Check::none(
            "each order line: refunded units == its refund lines' <= its units, refunded \
             amount <= its share of the final amount (Postgres)",
            &per_line,
            db.lines.len() as u64,
        ),
        Check::none(
            "each product: initial stock == stock + units of orders not cancelled/expired - \
             units refunded with restock (Postgres)",
            &stock,
            initial.len() as u64,
        ),
        Check::none(
            "each order: exactly one outbox event per transition, sequences 1..n (Postgres)",
            &events,
            n,
        ),
        Check::none(
            "every order the run left in a known state is in that state (Postgres)",
            &left,
            known as u64,
        ),
        Check::none(
            "no Pay, CancelOrder or RefundOrder of the run's orders is refused",
            &seen.refused,
            seen.transitions,
        ),
        Check::none(
            "each RefundOrder answer refunds exactly the units asked, its lines summing to its amount",
            &seen.refund_answers,
            seen.refunds,
        ),
        Check::none(
            "the buyer's first ListOrders page shows the order as the run left it",
            &seen.lists,
            seen.listed,
        ),
    ];
    if seen.replayed > 0 {
        checks.push(Check::none(
            "a RefundOrder sent again with its key returns the same refund",
            &seen.replays,
            seen.replayed,
        ));
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{Expected, LifeOrder};
    use ecommerce::proto::OrderStatus;

    /// A paid order of two lines (2 x 1,000 and 1 x 2,500), refunded in part: one unit of
    /// the first line, 1,000 won.
    fn partly_refunded() -> LifeDb {
        let order = DbOrder {
            id: 1,
            status: "PARTIALLY_REFUNDED".into(),
            total_amount: 4_500,
            final_amount: 4_500,
            refunded_amount: 1_000,
            event_sequence: 3,
            payments: 1,
            paid: 4_500,
            uses: 1,
            used: 4_500,
            refunds: 1,
            refunds_sum: 1_000,
            refund_entries: 1_000,
            refund_lines_sum: 1_000,
        };
        let line = |product_id, unit_price, quantity, refunded: i32| DbLine {
            order_id: 1,
            product_id,
            unit_price,
            quantity,
            refunded_quantity: refunded,
            lines_quantity: refunded.into(),
            lines_amount: unit_price * i64::from(refunded),
        };
        let event = |t: &str, s| DbEvent {
            order_id: 1,
            event_type: t.into(),
            sequence: Some(s),
        };
        LifeDb {
            orders: vec![order],
            lines: vec![line(10, 1_000, 2, 1), line(11, 2_500, 1, 0)],
            products: vec![DbProduct {
                id: 10,
                stock: 98,
                held: 2,
                restocked: 0,
            }],
            events: vec![
                event("OrderPlaced", 1),
                event("PaymentCompleted", 2),
                event("OrderRefunded", 3),
            ],
        }
    }

    fn seen(status: OrderStatus, refunded_amount: i64) -> LifeSeen {
        LifeSeen {
            orders: vec![LifeOrder {
                order_id: 1,
                user_id: 5,
                expected: Some(Expected {
                    status,
                    refunded_amount,
                }),
            }],
            ..LifeSeen::default()
        }
    }

    fn failed(db: &LifeDb, seen: &LifeSeen) -> Vec<String> {
        let initial = HashMap::from([(10, 100)]);
        checks(db, seen, &initial)
            .into_iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect()
    }

    #[test]
    fn a_consistent_order_passes() {
        let db = partly_refunded();
        let broken = failed(&db, &seen(OrderStatus::PartiallyRefunded, 1_000));
        assert!(broken.is_empty(), "{broken:?}");
    }

    #[test]
    fn over_refunds_missing_ledger_entries_and_wrong_statuses_are_caught() {
        let mut db = partly_refunded();
        db.orders[0].refund_entries = 0;
        assert!(failed(&db, &LifeSeen::default())[0].contains("REFUND entries 0"));
        let mut db = partly_refunded();
        db.orders[0].status = "REFUNDED".into();
        let broken = failed(&db, &LifeSeen::default());
        assert!(broken.iter().any(|b| b.contains("(every unit: false)")));
        let mut db = partly_refunded();
        db.lines[1].lines_amount = 2_501;
        db.lines[1].lines_quantity = 1;
        db.lines[1].refunded_quantity = 1;
        let broken = failed(&db, &LifeSeen::default());
        assert!(
            broken.iter().any(|b| b.contains("a share of 2500")),
            "{broken:?}"
        );
    }

    #[test]
    fn stock_that_does_not_add_up_is_caught() {
        let mut db = partly_refunded();
        db.products[0].restocked = 1;
        let broken = failed(&db, &LifeSeen::default());
        assert!(
            broken.iter().any(|b| b.contains("restocked 1 = 99")),
            "{broken:?}"
        );
    }

    #[test]
    fn a_missing_duplicated_or_misnumbered_event_is_caught() {
        let mut db = partly_refunded();
        db.events.pop();
        assert_eq!(failed(&db, &LifeSeen::default()).len(), 1);
        let mut db = partly_refunded();
        db.events.push(db.events[2].clone());
        assert_eq!(failed(&db, &LifeSeen::default()).len(), 1);
        let mut db = partly_refunded();
        db.events[2].sequence = Some(4);
        assert_eq!(failed(&db, &LifeSeen::default()).len(), 1);
        let mut db = partly_refunded();
        db.events[1].event_type = "OrderCancelled".into();
        assert_eq!(failed(&db, &LifeSeen::default()).len(), 1);
    }

    #[test]
    fn an_order_left_open_may_have_expired_since() {
        let mut db = partly_refunded();
        let order = &mut db.orders[0];
        *order = DbOrder {
            status: "EXPIRED".into(),
            refunded_amount: 0,
            event_sequence: 2,
            payments: 0,
            paid: 0,
            uses: 0,
            used: 0,
            refunds: 0,
            refunds_sum: 0,
            refund_entries: 0,
            refund_lines_sum: 0,
            ..order.clone()
        };
        for line in &mut db.lines {
            (
                line.refunded_quantity,
                line.lines_quantity,
                line.lines_amount,
            ) = (0, 0, 0);
        }
        db.events.truncate(2);
        db.events[1].event_type = "OrderExpired".into();
        db.products[0].held = 0;
        db.products[0].stock = 100;
        let broken = failed(&db, &seen(OrderStatus::PendingPayment, 0));
        assert!(broken.is_empty(), "{broken:?}");
        let broken = failed(&db, &seen(OrderStatus::Paid, 0));
        assert_eq!(broken.len(), 1, "{broken:?}");
    }

    #[test]
    fn an_order_not_as_the_run_left_it_is_caught() {
        let db = partly_refunded();
        let broken = failed(&db, &seen(OrderStatus::Refunded, 4_500));
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert!(
            broken[0].contains("left it REFUNDED with 4500"),
            "{broken:?}"
        );
    }
}
