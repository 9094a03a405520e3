//! Idempotency records. Claimed first in the caller's transaction: a concurrent retry's insert
//! waits on the primary key until the first attempt commits (then it replays the stored result)
//! or rolls back (then it proceeds as the first attempt).

use sqlx::PgConnection;

use crate::{
    domain::{IdempotencyKey, UserId},
    store::StoreError,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Charge,
    PlaceOrder,
    Pay,
    Checkout,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Charge => "CHARGE",
            Operation::PlaceOrder => "PLACE_ORDER",
            Operation::Pay => "PAY",
            Operation::Checkout => "CHECKOUT",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// First use of the key: do the work, then [`complete`].
    Fresh,
    /// Already done for the same request; the id of its result.
    Replay(i64),
    /// Already used for a different request.
    Mismatch,
}

#[tracing::instrument(target = "otel", name = "idempotency.claim", skip_all, fields(db.system = "postgresql"))]
pub async fn claim(
    tx: &mut PgConnection,
    user_id: UserId,
    operation: Operation,
    key: &IdempotencyKey,
    fingerprint: &str,
) -> Result<Claim, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys (user_id, operation, idempotency_key, request_fingerprint)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(user_id)
    .bind(operation.as_str())
    .bind(key.as_str())
    .bind(fingerprint)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(Claim::Fresh);
    }
    let (stored_fingerprint, result_id): (String, Option<i64>) = sqlx::query_as(
        "SELECT request_fingerprint, result_id FROM idempotency_keys
         WHERE user_id = $1 AND operation = $2 AND idempotency_key = $3",
    )
    .bind(user_id)
    .bind(operation.as_str())
    .bind(key.as_str())
    .fetch_one(&mut *tx)
    .await?;
    if stored_fingerprint != fingerprint {
        return Ok(Claim::Mismatch);
    }
    result_id.map(Claim::Replay).ok_or_else(|| {
        StoreError::Inconsistent(format!(
            "idempotency key of user {user_id} committed without a result"
        ))
    })
}

#[tracing::instrument(target = "otel", name = "idempotency.complete", skip_all, fields(db.system = "postgresql"))]
pub async fn complete(
    tx: &mut PgConnection,
    user_id: UserId,
    operation: Operation,
    key: &IdempotencyKey,
    result_id: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE idempotency_keys SET result_id = $4
         WHERE user_id = $1 AND operation = $2 AND idempotency_key = $3",
    )
    .bind(user_id)
    .bind(operation.as_str())
    .bind(key.as_str())
    .bind(result_id)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Deletes up to `limit` keys claimed more than `age` ago, oldest first; returns how many. A
/// retry after that is treated as a new request.
pub async fn purge_expired(
    db: impl sqlx::PgExecutor<'_>,
    age: std::time::Duration,
    limit: i64,
) -> Result<u64, StoreError> {
    super::delete_older_than(
        db,
        "DELETE FROM idempotency_keys WHERE (user_id, operation, idempotency_key) IN (
             SELECT user_id, operation, idempotency_key FROM idempotency_keys
             WHERE created_at < now() - make_interval(secs => $1)
             ORDER BY created_at
             LIMIT $2)",
        age,
        limit,
    )
    .await
}
