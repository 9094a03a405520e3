//! Payments: the balances they lock and the payments they made. A batch of payments is written
//! by [`super::pay_batch`].
//!
//! Invariants: a balance never goes negative (checked against the locked row, plus the schema's
//! CHECK); one payment per order (unique constraint); every deduction has its USE ledger entry,
//! written by the same statement.

use sqlx::{PgConnection, PgExecutor};

use crate::{
    domain::{Payment, PaymentId, UserId, Won},
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
