//! Refunds: the credit, its REFUND ledger entry, the refund and its lines, the order's refunded
//! units and amount, and the coupon given back, all inside the caller's transaction.
//!
//! Invariants: the schema refuses a line refunding more units than it holds and an order
//! refunding more than it was paid (CHECKs on the counters this module bumps in the same
//! statement that records the refund); every credit has its REFUND ledger entry, written by the
//! same statement. The order and the buyer's balance must be locked by the caller (the global
//! lock order: orders, balances, coupons, products), so refunds of one order run one at a time.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use super::orders::{OrderRow, order_columns};
use crate::{
    domain::{
        OrderId, OrderStatus, ProductId, Refund, RefundId, RefundedLine, TxId, UserCouponId,
        UserId, Won,
    },
    store::StoreError,
};

/// Gives a fully refunded order's coupon back to its holder (AVAILABLE, free for another order)
/// if it is still valid; an expired one stays USED. Returns whether it was given back.
#[tracing::instrument(target = "otel", name = "refunds.return_coupon", skip_all, fields(db.system = "postgresql"))]
pub async fn return_coupon(
    tx: &mut PgConnection,
    coupon: UserCouponId,
    order: OrderId,
) -> Result<bool, StoreError> {
    let returned = sqlx::query(
        "UPDATE user_coupons SET status = 'AVAILABLE', order_id = NULL, used_at = NULL
         WHERE id = $1 AND order_id = $2 AND status = 'USED' AND expires_at > now()",
    )
    .bind(coupon)
    .bind(order)
    .execute(tx)
    .await?
    .rows_affected();
    Ok(returned == 1)
}

/// A refund to write, decided against the locked order.
pub struct RefundRecord<'a> {
    pub order_id: OrderId,
    pub user_id: UserId,
    /// By ascending product id.
    pub lines: &'a [RefundedLine],
    pub amount: Won,
    /// The order's status once refunded.
    pub status: OrderStatus,
    pub restocked: bool,
    pub coupon_returned: bool,
    pub reason: &'a str,
}

/// What [`record`] wrote.
pub struct Recorded {
    pub id: RefundId,
    pub created_at: DateTime<Utc>,
    pub balance_after: Won,
    /// The order as the refund left it.
    pub order: OrderRow,
    /// The transaction's id: once committed, it tells which ranking snapshots saw the refund.
    pub tx: TxId,
}

#[derive(sqlx::FromRow)]
struct RecordedRow {
    refund_id: RefundId,
    refunded_at: DateTime<Utc>,
    balance_after: Won,
    items_refunded: i64,
    tx: String,
    #[sqlx(flatten)]
    order: OrderRow,
}

/// Writes a refund in one statement: the buyer's balance credited, its REFUND ledger entry, the
/// refund and its lines, each line's refunded units and the order's refunded amount and status.
/// Every row it changes must be locked by this transaction (the order and the balance) or
/// belong to the locked order (its items).
#[tracing::instrument(target = "otel", name = "refunds.record", skip_all, fields(db.system = "postgresql"))]
pub async fn record(
    tx: &mut PgConnection,
    refund: &RefundRecord<'_>,
) -> Result<Recorded, StoreError> {
    let products: Vec<ProductId> = refund.lines.iter().map(|l| l.product_id).collect();
    let quantities: Vec<i32> = refund.lines.iter().map(|l| l.quantity).collect();
    let amounts: Vec<Won> = refund.lines.iter().map(|l| l.amount).collect();
    let row: Option<RecordedRow> = sqlx::query_as(concat!(
        "WITH credit AS (
             UPDATE user_balances SET balance = balance + $3, updated_at = now()
             WHERE user_id = $2
             RETURNING balance
         ),
         ledger AS (
             INSERT INTO balance_history (user_id, kind, amount, balance_after, order_id)
             SELECT $2, 'REFUND', $3, balance, $1 FROM credit
             RETURNING id, balance_after
         ),
         refund AS (
             INSERT INTO refunds (order_id, user_id, amount, balance_after, balance_history_id,
                 restocked, coupon_returned, reason)
             SELECT $1, $2, $3, balance_after, id, $4, $5, $6 FROM ledger
             RETURNING id, created_at, balance_after
         ),
         lines AS (
             INSERT INTO refund_lines (refund_id, order_id, product_id, quantity, amount)
             SELECT refund.id, $1, l.product_id, l.quantity, l.amount
             FROM refund, unnest($7::bigint[], $8::int[], $9::bigint[])
                 AS l(product_id, quantity, amount)
         ),
         items AS (
             UPDATE order_items i SET refunded_quantity = i.refunded_quantity + l.quantity
             FROM unnest($7::bigint[], $8::int[]) AS l(product_id, quantity)
             WHERE i.order_id = $1 AND i.product_id = l.product_id
             RETURNING 1
         ),
         refunded_order AS (
             UPDATE orders SET refunded_amount = refunded_amount + $3, status = $10
             WHERE id = $1
             RETURNING ",
        order_columns!(),
        "
         )
         SELECT refund.id AS refund_id, refund.created_at AS refunded_at, refund.balance_after,
             (SELECT count(*) FROM items) AS items_refunded,
             pg_current_xact_id()::text AS tx, o.*
         FROM refund, refunded_order o"
    ))
    .bind(refund.order_id)
    .bind(refund.user_id)
    .bind(refund.amount)
    .bind(refund.restocked)
    .bind(refund.coupon_returned)
    .bind(refund.reason)
    .bind(&products)
    .bind(&quantities)
    .bind(&amounts)
    .bind(refund.status)
    .fetch_optional(tx)
    .await?;
    let row = row.ok_or_else(|| {
        StoreError::Inconsistent(format!(
            "refund of order {} found no balance for user {}",
            refund.order_id, refund.user_id
        ))
    })?;
    if row.items_refunded != refund.lines.len() as i64 {
        return Err(StoreError::Inconsistent(format!(
            "refund of order {} matched {} of its {} lines",
            refund.order_id,
            row.items_refunded,
            refund.lines.len()
        )));
    }
    let tx_id = TxId::parse(&row.tx)
        .ok_or_else(|| StoreError::Inconsistent(format!("transaction id {:?}", row.tx)))?;
    Ok(Recorded {
        id: row.refund_id,
        created_at: row.refunded_at,
        balance_after: row.balance_after,
        order: row.order,
        tx: tx_id,
    })
}

#[derive(sqlx::FromRow)]
struct RefundRow {
    id: RefundId,
    order_id: OrderId,
    user_id: UserId,
    amount: Won,
    balance_after: Won,
    restocked: bool,
    coupon_returned: bool,
    reason: String,
    created_at: DateTime<Utc>,
}

/// A refund with its lines.
pub async fn get(conn: &mut PgConnection, id: RefundId) -> Result<Option<Refund>, StoreError> {
    let row: Option<RefundRow> = sqlx::query_as(
        "SELECT id, order_id, user_id, amount, balance_after, restocked, coupon_returned, reason,
             created_at
         FROM refunds WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let lines = lines(&mut *conn, id).await?;
    Ok(Some(Refund {
        id: row.id,
        order_id: row.order_id,
        user_id: row.user_id,
        lines,
        amount: row.amount,
        balance_after: row.balance_after,
        restocked: row.restocked,
        coupon_returned: row.coupon_returned,
        reason: row.reason,
        created_at: row.created_at,
    }))
}

async fn lines(db: impl PgExecutor<'_>, id: RefundId) -> Result<Vec<RefundedLine>, StoreError> {
    let lines = sqlx::query_as(
        "SELECT product_id, quantity, amount FROM refund_lines
         WHERE refund_id = $1 ORDER BY product_id",
    )
    .bind(id)
    .fetch_all(db)
    .await?;
    Ok(lines)
}
