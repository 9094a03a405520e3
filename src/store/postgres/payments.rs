//! Payments: the balance deduction, its ledger entry, the payment, the order and coupon state,
//! all inside the caller's transaction.
//!
//! Invariants: a balance never goes negative (checked against the locked row, plus the schema's
//! CHECK); one payment per order (unique constraint); every deduction has its USE ledger entry,
//! written by the same statement.

use chrono::{DateTime, Utc};
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

/// Locks the balances of `users` (ascending user id, after their orders: the global lock
/// order) and reads them. Users who never charged are left out.
#[tracing::instrument(target = "otel", name = "payments.lock_balances", skip_all, fields(db.system = "postgresql"))]
pub async fn lock_balances(
    tx: &mut PgConnection,
    users: &[UserId],
) -> Result<Vec<(UserId, Won)>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT user_id, balance FROM user_balances
         WHERE user_id = ANY($1) ORDER BY user_id FOR UPDATE",
    )
    .bind(users)
    .fetch_all(tx)
    .await?;
    Ok(rows)
}

/// The transaction's timestamp (every payment of a batch is paid at it) and `n` fresh payment
/// ids, so that the events naming them can be built before the payments are written.
#[tracing::instrument(target = "otel", name = "payments.reserve_ids", skip_all, fields(db.system = "postgresql"))]
pub async fn reserve_ids(
    tx: &mut PgConnection,
    n: usize,
) -> Result<(DateTime<Utc>, Vec<PaymentId>), StoreError> {
    let (now, ids): (DateTime<Utc>, Vec<PaymentId>) = sqlx::query_as(
        "SELECT now(), array(SELECT nextval(pg_get_serial_sequence('payments', 'id'))
                             FROM generate_series(1, $1))",
    )
    .bind(n as i64)
    .fetch_one(tx)
    .await?;
    Ok((now, ids))
}

pub struct PaymentRecord {
    pub id: PaymentId,
    pub order_id: OrderId,
    pub user_id: UserId,
    pub amount: Won,
    pub balance_after: Won,
    pub user_coupon_id: Option<UserCouponId>,
}

/// Writes payments in one statement: each buyer's balance debited once (by the sum of their
/// payments, whose `balance_after` were computed from the locked balance), a balance row for a
/// buyer of fully discounted orders who never charged, one USE ledger entry and one payment
/// per order, the orders as PAID at `paid_at` with their next event number taken (their
/// PaymentCompleted events carry it: the locked row's number + 1) and their coupons as USED. The orders and
/// balances must be locked by this transaction and checked. Also returns the transaction's id,
/// shared by every payment of the batch: once committed, it tells which snapshots see them
/// (the ranking counts each payment once).
///
/// Each join with the request arrays also names its keys with `= ANY(...)`: the planner
/// cannot see an UNNEST's size and would otherwise scan a large table to hash it.
#[tracing::instrument(target = "otel", name = "payments.record_batch", skip_all, fields(db.system = "postgresql"))]
pub async fn record_many(
    tx: &mut PgConnection,
    records: &[PaymentRecord],
    paid_at: DateTime<Utc>,
) -> Result<TxId, StoreError> {
    let mut debits: std::collections::BTreeMap<UserId, Won> = Default::default();
    for r in records {
        let sum = debits.entry(r.user_id).or_insert(Won::ZERO);
        *sum = sum
            .checked_add(r.amount)
            .ok_or_else(|| StoreError::Inconsistent("a batch debit overflows".into()))?;
    }
    let (debit_users, debit_sums): (Vec<UserId>, Vec<Won>) = debits.into_iter().unzip();
    let ids: Vec<PaymentId> = records.iter().map(|r| r.id).collect();
    let orders: Vec<OrderId> = records.iter().map(|r| r.order_id).collect();
    let users: Vec<UserId> = records.iter().map(|r| r.user_id).collect();
    let amounts: Vec<Won> = records.iter().map(|r| r.amount).collect();
    let afters: Vec<Won> = records.iter().map(|r| r.balance_after).collect();
    let coupons: Vec<Option<UserCouponId>> = records.iter().map(|r| r.user_coupon_id).collect();
    let tx_id: String = sqlx::query_scalar(
        "WITH req AS (
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],
                 $5::bigint[], $6::bigint[])
                 AS r(payment_id, order_id, user_id, amount, balance_after, coupon)
         ),
         opened AS (
             INSERT INTO user_balances (user_id, balance)
             SELECT DISTINCT user_id, 0 FROM req
             ON CONFLICT (user_id) DO NOTHING
         ),
         debit AS (
             UPDATE user_balances b SET balance = b.balance - d.total, updated_at = now()
             FROM unnest($7::bigint[], $8::bigint[]) AS d(user_id, total)
             WHERE b.user_id = d.user_id AND d.total > 0 AND b.user_id = ANY($7)
         ),
         ledger AS (
             INSERT INTO balance_history (user_id, kind, amount, balance_after, order_id)
             SELECT user_id, 'USE', amount, balance_after, order_id FROM req
             RETURNING id, order_id
         ),
         payment AS (
             INSERT INTO payments
                 (id, order_id, user_id, amount, balance_after, balance_history_id, paid_at)
             OVERRIDING SYSTEM VALUE
             SELECT r.payment_id, r.order_id, r.user_id, r.amount, r.balance_after, l.id, $9
             FROM req r JOIN ledger l USING (order_id)
         ),
         paid AS (
             UPDATE orders o SET status = 'PAID', paid_at = $9,
                 event_sequence = o.event_sequence + 1
             WHERE o.id = ANY($2)
         ),
         used AS (
             UPDATE user_coupons uc SET status = 'USED', used_at = now()
             FROM req r
             WHERE uc.id = r.coupon AND uc.order_id = r.order_id AND uc.status = 'RESERVED'
                 AND uc.id = ANY($6)
         )
         SELECT pg_current_xact_id()::text",
    )
    .bind(&ids)
    .bind(&orders)
    .bind(&users)
    .bind(&amounts)
    .bind(&afters)
    .bind(&coupons)
    .bind(&debit_users)
    .bind(&debit_sums)
    .bind(paid_at)
    .fetch_one(tx)
    .await?;
    TxId::parse(&tx_id).ok_or_else(|| StoreError::Inconsistent(format!("transaction id {tx_id:?}")))
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
