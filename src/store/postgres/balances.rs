//! Balances and their ledger. A balance row and its ledger entries are always written by the
//! same statement or transaction, so the ledger sums to the balance (charges:
//! [`super::charge_batch`]).

use sqlx::{PgConnection, PgExecutor};

use super::split_page;
use crate::{
    domain::{LedgerEntry, PageSize, PageToken, UserId, Won},
    store::StoreError,
};

/// The columns that make up a row; a macro so that queries stay `&'static str`.
macro_rules! ledger_columns {
    () => {
        "id, user_id, kind, amount, balance_after, order_id, created_at"
    };
}

/// Credits `amount` and writes the CHARGE entry in one statement: a lone charge without a key.
/// `None` when the balance would pass `max_balance` (nothing is written then); `amount` must not
/// pass it by itself (a new user's row would be opened with it).
#[tracing::instrument(target = "otel", name = "balances.charge", skip_all, fields(db.system = "postgresql"))]
pub async fn charge(
    conn: &mut PgConnection,
    user_id: UserId,
    amount: Won,
    max_balance: Won,
) -> Result<Option<LedgerEntry>, StoreError> {
    // The row lock taken by the upsert serialises concurrent charges of one user; the WHERE on
    // the conflict branch refuses a credit past the maximum atomically.
    let entry = sqlx::query_as::<_, LedgerEntry>(
        "WITH credited AS (
             INSERT INTO user_balances AS b (user_id, balance) VALUES ($1, $2)
             ON CONFLICT (user_id) DO UPDATE
                 SET balance = b.balance + EXCLUDED.balance, updated_at = now()
                 WHERE b.balance + EXCLUDED.balance <= $3
             RETURNING user_id, balance
         )
         INSERT INTO balance_history (user_id, kind, amount, balance_after)
         SELECT user_id, 'CHARGE', $2, balance FROM credited
         RETURNING id, user_id, kind, amount, balance_after, order_id, created_at",
    )
    .bind(user_id)
    .bind(amount)
    .bind(max_balance)
    .fetch_optional(conn)
    .await?;
    Ok(entry)
}

#[tracing::instrument(target = "otel", name = "balances.read", skip_all, fields(db.system = "postgresql"))]
pub async fn balance(db: impl PgExecutor<'_>, user_id: UserId) -> Result<Won, StoreError> {
    let balance: Option<Won> =
        sqlx::query_scalar("SELECT balance FROM user_balances WHERE user_id = $1")
            .bind(user_id)
            .fetch_optional(db)
            .await?;
    Ok(balance.unwrap_or(Won::ZERO))
}

pub async fn ledger_entry(db: impl PgExecutor<'_>, id: i64) -> Result<LedgerEntry, StoreError> {
    let entry = sqlx::query_as(concat!(
        "SELECT ",
        ledger_columns!(),
        " FROM balance_history WHERE id = $1"
    ))
    .bind(id)
    .fetch_one(db)
    .await?;
    Ok(entry)
}

/// Newest first; `after` is the last id of the previous page.
pub async fn history_page(
    db: impl PgExecutor<'_>,
    user_id: UserId,
    page_size: PageSize,
    after: Option<PageToken>,
) -> Result<(Vec<LedgerEntry>, Option<PageToken>), StoreError> {
    let mut rows: Vec<LedgerEntry> = sqlx::query_as(concat!(
        "SELECT ",
        ledger_columns!(),
        " FROM balance_history
         WHERE user_id = $1 AND id < $2
         ORDER BY id DESC
         LIMIT $3"
    ))
    .bind(user_id)
    .bind(after.map_or(i64::MAX, PageToken::last_key))
    .bind(page_size.get() + 1)
    .fetch_all(db)
    .await?;
    let next = split_page(&mut rows, page_size, |e| e.id);
    Ok((rows, next))
}
