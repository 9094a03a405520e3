//! Payments: the balance deduction, its ledger entry, the payment, the order and coupon state,
//! all inside the caller's transaction.
//!
//! Invariants: a balance never goes negative (conditional update, plus the schema's CHECK);
//! one payment per order (unique constraint); every deduction has its USE ledger entry.

use sqlx::{PgConnection, PgExecutor};

use crate::{
    domain::{OrderId, Payment, PaymentId, TxId, UserCouponId, UserId, Won},
    store::StoreError,
};

macro_rules! payment_columns {
    () => {
        "id, order_id, user_id, amount, balance_after, paid_at"
    };
}

/// Takes `amount` from the balance if it is there; the balance after, or `None` when it is not.
#[tracing::instrument(target = "otel", name = "payments.deduct", skip_all, fields(db.system = "postgresql"))]
pub async fn deduct(
    tx: &mut PgConnection,
    user_id: UserId,
    amount: Won,
) -> Result<Option<Won>, StoreError> {
    let after: Option<Won> = sqlx::query_scalar(
        "UPDATE user_balances SET balance = balance - $2, updated_at = now()
         WHERE user_id = $1 AND balance >= $2
         RETURNING balance",
    )
    .bind(user_id)
    .bind(amount)
    .fetch_optional(&mut *tx)
    .await?;
    if after.is_some() || amount > Won::ZERO {
        return Ok(after);
    }
    // A fully discounted order of a user who never charged: the ledger still needs their row.
    let after = sqlx::query_scalar(
        "INSERT INTO user_balances AS b (user_id, balance) VALUES ($1, 0)
         ON CONFLICT (user_id) DO UPDATE SET updated_at = b.updated_at
         RETURNING balance",
    )
    .bind(user_id)
    .fetch_one(&mut *tx)
    .await?;
    Ok(Some(after))
}

pub struct PaymentRecord {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub amount: Won,
    pub balance_after: Won,
    pub user_coupon_id: Option<UserCouponId>,
}

#[derive(sqlx::FromRow)]
struct Recorded {
    #[sqlx(flatten)]
    payment: Payment,
    tx: String,
}

/// Writes the USE ledger entry, the payment, the order as PAID and its coupon as USED, in one
/// statement. The order row must be locked by this transaction. Also returns the transaction's
/// id: once committed, it tells which snapshots see the payment (the ranking counts it once).
#[tracing::instrument(target = "otel", name = "payments.record", skip_all, fields(db.system = "postgresql"))]
pub async fn record(
    tx: &mut PgConnection,
    record: PaymentRecord,
) -> Result<(Payment, TxId), StoreError> {
    let recorded: Recorded = sqlx::query_as(concat!(
        "WITH ledger AS (
             INSERT INTO balance_history (user_id, kind, amount, balance_after, order_id)
             VALUES ($2, 'USE', $3, $4, $1)
             RETURNING id
         ),
         payment AS (
             INSERT INTO payments (order_id, user_id, amount, balance_after, balance_history_id)
             SELECT $1, $2, $3, $4, ledger.id FROM ledger
             RETURNING ",
        payment_columns!(),
        "),
         paid AS (
             UPDATE orders SET status = 'PAID', paid_at = payment.paid_at
             FROM payment WHERE orders.id = $1
         ),
         used AS (
             UPDATE user_coupons SET status = 'USED', used_at = now()
             WHERE id = $5 AND order_id = $1 AND status = 'RESERVED'
         )
         SELECT payment.*, pg_current_xact_id()::text AS tx FROM payment"
    ))
    .bind(record.order_id)
    .bind(record.user_id)
    .bind(record.amount)
    .bind(record.balance_after)
    .bind(record.user_coupon_id)
    .fetch_one(tx)
    .await?;
    let tx_id = TxId::parse(&recorded.tx)
        .ok_or_else(|| StoreError::Inconsistent(format!("transaction id {:?}", recorded.tx)))?;
    Ok((recorded.payment, tx_id))
}

pub async fn get(db: impl PgExecutor<'_>, id: PaymentId) -> Result<Option<Payment>, StoreError> {
    let payment = sqlx::query_as(concat!(
        "SELECT ",
        payment_columns!(),
        " FROM payments WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await?;
    Ok(payment)
}
