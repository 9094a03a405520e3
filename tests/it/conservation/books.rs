//! The books, read on one consistent snapshot: the shared rules and stock conservation, which hold
//! at any moment of the workload; and, once it is over, every balance (charges - uses + refunds),
//! order, payment, refund, coupon and charge against what the RPCs reported.

use std::collections::{HashMap, HashSet};

use ecommerce::proto::GetBalanceRequest;
use sqlx::Row;

use super::{USERS, record::Record, shop::Shop};
use crate::support::{TestApp, coupons::remaining, rules::RULES};

/// Opens a transaction that sees one snapshot for all its queries: the workers and the expiry
/// and outbox jobs keep writing meanwhile.
pub(super) async fn snapshot(app: &TestApp) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = app.pg.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// The invariants that hold on any snapshot, even in the middle of the workload: [`RULES`], and
/// every unit of stock on the shelf, in an open order or in a paid one. Returns how many were
/// checked.
pub(super) async fn audit(
    tx: &mut sqlx::PgConnection,
    shop: &Shop,
    violations: &mut Vec<String>,
    when: &str,
) -> usize {
    let mut checked = 0;
    let mut fail = |message: String| violations.push(format!("{when}: {message}"));
    for &(rule, sql) in RULES {
        let broken: i64 = sqlx::query_scalar(sql).fetch_one(&mut *tx).await.unwrap();
        checked += 1;
        if broken != 0 {
            fail(format!("{rule}: {broken} rows break it"));
        }
    }

    // Stock: every unit is on the shelf, in an open order, kept by a buyer who paid, or
    // refunded without going back to stock.
    let rows: Vec<(i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT p.id, p.stock,
                coalesce(sum(i.quantity) FILTER (WHERE o.status = 'PENDING_PAYMENT'), 0)::bigint,
                coalesce(sum(i.quantity - i.refunded_quantity)
                    FILTER (WHERE o.status IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED')),
                    0)::bigint,
                (SELECT coalesce(sum(l.quantity), 0)::bigint
                 FROM refund_lines l JOIN refunds r ON r.id = l.refund_id
                 WHERE l.product_id = p.id AND NOT r.restocked)
         FROM products p
         LEFT JOIN order_items i ON i.product_id = p.id
         LEFT JOIN orders o ON o.id = i.order_id
         WHERE p.id = ANY($1)
         GROUP BY p.id, p.stock ORDER BY p.id",
    )
    .bind(shop.products.iter().map(|p| p.0).collect::<Vec<i64>>())
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    for (product, stock, open, kept, gone) in rows {
        let initial = shop.products.iter().find(|p| p.0 == product).unwrap().2;
        checked += 1;
        if stock + open + kept + gone != initial {
            fail(format!(
                "product {product}: stock {stock} + open {open} + paid and kept {kept} \
                 + refunded but not restocked {gone} != {initial}"
            ));
        }
    }

    checked
}

/// Checks the books against what the RPCs reported, on one snapshot taken after the workload;
/// returns how many invariants were checked.
pub(super) async fn check_books(
    app: &TestApp,
    shop: &Shop,
    record: &Record,
    violations: &mut Vec<String>,
    when: &str,
) -> usize {
    let mut tx = snapshot(app).await;
    let mut checked = audit(&mut tx, shop, violations, when).await;
    let mut fail = |message: String| violations.push(format!("{when}: {message}"));

    // Balances: what the RPCs reported, per user, against the ledger: charges - uses + refunds.
    // (charged, charges, paid, refunded)
    let mut expected: HashMap<i64, (i64, i64, i64, i64)> = HashMap::new();
    for (user, amount) in record.charges.values() {
        let e = expected.entry(*user).or_default();
        e.0 += amount;
        e.1 += 1;
    }
    for (user, _, amount) in record.payments.values() {
        expected.entry(*user).or_default().2 += amount;
    }
    for refund in record.refunds.values() {
        expected.entry(refund.user).or_default().3 += refund.amount;
    }
    let rows = sqlx::query(
        "SELECT u.user_id,
                coalesce((SELECT balance FROM user_balances b WHERE b.user_id = u.user_id), 0),
                coalesce(sum(h.amount) FILTER (WHERE h.kind = 'CHARGE'), 0)::bigint,
                count(h.id) FILTER (WHERE h.kind = 'CHARGE'),
                coalesce(sum(h.amount) FILTER (WHERE h.kind = 'USE'), 0)::bigint,
                coalesce(sum(h.amount) FILTER (WHERE h.kind = 'REFUND'), 0)::bigint
         FROM generate_series(1, $1::bigint) AS u(user_id)
         LEFT JOIN balance_history h ON h.user_id = u.user_id
         GROUP BY u.user_id ORDER BY u.user_id",
    )
    .bind(USERS)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    for row in rows {
        let user: i64 = row.get(0);
        let balance: i64 = row.get(1);
        let ledger = (
            row.get::<i64, _>(2),
            row.get::<i64, _>(3),
            row.get::<i64, _>(4),
            row.get::<i64, _>(5),
        );
        let (charged, charges, paid, refunded) = expected.get(&user).copied().unwrap_or_default();
        checked += 3;
        if ledger != (charged, charges, paid, refunded) {
            fail(format!(
                "user {user}: ledger charges {} in {} entries, uses {}, refunds {}; the RPCs \
                 reported charges {charged} in {charges}, payments {paid}, refunds {refunded}",
                ledger.0, ledger.1, ledger.2, ledger.3
            ));
        }
        if balance != charged - paid + refunded {
            fail(format!(
                "user {user}: balance {balance} != {charged} charged - {paid} paid \
                 + {refunded} refunded"
            ));
        }
        if balance < 0 {
            fail(format!("user {user}: negative balance {balance}"));
        }
    }

    // What exists is exactly what the RPCs reported: no phantom or lost orders, payments,
    // coupons or charges.
    let sets: [(&str, &str, HashSet<i64>); 5] = [
        (
            "orders",
            "SELECT id FROM orders",
            record.orders.keys().copied().collect(),
        ),
        (
            "payments",
            "SELECT id FROM payments",
            record.payments.keys().copied().collect(),
        ),
        (
            "user coupons",
            "SELECT id FROM user_coupons",
            record.issued.keys().copied().collect(),
        ),
        (
            "charges",
            "SELECT id FROM balance_history WHERE kind = 'CHARGE'",
            record.charges.keys().copied().collect(),
        ),
        (
            "refunds",
            "SELECT id FROM refunds",
            record.refunds.keys().copied().collect(),
        ),
    ];
    for (what, sql, reported) in sets {
        let stored: HashSet<i64> = sqlx::query_scalar(sql)
            .fetch_all(&mut *tx)
            .await
            .unwrap()
            .into_iter()
            .collect();
        checked += 1;
        if stored != reported {
            let phantom: Vec<_> = stored.difference(&reported).take(10).collect();
            let lost: Vec<_> = reported.difference(&stored).take(10).collect();
            fail(format!(
                "{what}: stored but never reported {phantom:?}, reported but not stored {lost:?}"
            ));
        }
    }
    tx.rollback().await.unwrap();
    checked
}

/// Balances and coupon stock as the RPCs tell them, against the books.
pub(super) async fn check_rpc_views(
    app: &TestApp,
    shop: &Shop,
    violations: &mut Vec<String>,
) -> usize {
    let mut checked = 0;
    for user in 1..=USERS {
        let balance = app
            .balance()
            .get_balance(GetBalanceRequest { user_id: user })
            .await
            .unwrap()
            .into_inner()
            .balance;
        let ledger: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(CASE kind WHEN 'USE' THEN -amount ELSE amount END), 0)::bigint
             FROM balance_history WHERE user_id = $1",
        )
        .bind(user)
        .fetch_one(&app.pg)
        .await
        .unwrap();
        checked += 1;
        if balance != ledger || balance < 0 {
            violations.push(format!("GetBalance({user}) = {balance}, ledger {ledger}"));
        }
    }
    for &coupon in shop.coupons.keys() {
        let remaining = remaining(app, coupon).await;
        // The workload moves totals (UpdateCoupon): Postgres has the one that holds now.
        let total: i64 = sqlx::query_scalar("SELECT total_quantity FROM coupons WHERE id = $1")
            .bind(coupon)
            .fetch_one(&app.pg)
            .await
            .unwrap();
        let issued: i64 =
            sqlx::query_scalar("SELECT count(*) FROM user_coupons WHERE coupon_id = $1")
                .bind(coupon)
                .fetch_one(&app.pg)
                .await
                .unwrap();
        checked += 1;
        if remaining != total - issued || remaining < 0 {
            violations.push(format!(
                "coupon {coupon}: remaining {remaining}, issued {issued} of {total}"
            ));
        }
    }
    checked
}
