//! Idempotency records. Claimed first in the caller's transaction: a concurrent retry's insert
//! waits on the primary key until the first attempt commits (then it replays the stored result)
//! or rolls back (then it proceeds as the first attempt).

use sqlx::PgConnection;

use crate::{
    domain::{IdempotencyKey, KeyScope, UserId},
    store::StoreError,
};

/// The keyed calls. The schema ties the admin ones to [`KeyScope::Admin`] and the others to a
/// buyer's scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Charge,
    PlaceOrder,
    Pay,
    Checkout,
    Refund,
    AdjustStock,
    CreateProduct,
    CreateCoupon,
    UpdateCoupon,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Charge => "CHARGE",
            Operation::PlaceOrder => "PLACE_ORDER",
            Operation::Pay => "PAY",
            Operation::Checkout => "CHECKOUT",
            Operation::Refund => "REFUND",
            Operation::AdjustStock => "ADJUST_STOCK",
            Operation::CreateProduct => "CREATE_PRODUCT",
            Operation::CreateCoupon => "CREATE_COUPON",
            Operation::UpdateCoupon => "UPDATE_COUPON",
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
    scope: impl Into<KeyScope>,
    operation: Operation,
    key: &IdempotencyKey,
    fingerprint: &str,
) -> Result<Claim, StoreError> {
    let scope = scope.into();
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys (user_id, operation, idempotency_key, request_fingerprint)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(scope.stored_id())
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
    .bind(scope.stored_id())
    .bind(operation.as_str())
    .bind(key.as_str())
    .fetch_one(&mut *tx)
    .await?;
    if stored_fingerprint != fingerprint {
        return Ok(Claim::Mismatch);
    }
    result_id.map(Claim::Replay).ok_or_else(|| {
        StoreError::Inconsistent(format!(
            "idempotency key of {scope} committed without a result"
        ))
    })
}

#[tracing::instrument(target = "otel", name = "idempotency.complete", skip_all, fields(db.system = "postgresql"))]
pub async fn complete(
    tx: &mut PgConnection,
    scope: impl Into<KeyScope>,
    operation: Operation,
    key: &IdempotencyKey,
    result_id: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE idempotency_keys SET result_id = $4
         WHERE user_id = $1 AND operation = $2 AND idempotency_key = $3",
    )
    .bind(scope.into().stored_id())
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

/// What claiming a key in a batch found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchClaim {
    Claimed(Claim),
    /// Another transaction is claiming the key right now: the call must not wait inside a
    /// batch; it runs alone, where a claim with `wait` ([`claim_columns`]) waits for that
    /// transaction.
    Busy,
}

/// The stored request and result of `key`, if a committed call used it. Read before a call
/// joins a batch, so that a replay or a reused key is answered without one.
#[tracing::instrument(target = "otel", name = "idempotency.lookup", skip_all, fields(db.system = "postgresql"))]
pub async fn lookup(
    db: impl sqlx::PgExecutor<'_>,
    user_id: UserId,
    operation: Operation,
    key: &IdempotencyKey,
    fingerprint: &str,
) -> Result<Option<Claim>, StoreError> {
    let stored: Option<(String, Option<i64>)> = sqlx::query_as(
        "SELECT request_fingerprint, result_id FROM idempotency_keys
         WHERE user_id = $1 AND operation = $2 AND idempotency_key = $3",
    )
    .bind(user_id)
    .bind(operation.as_str())
    .bind(key.as_str())
    .fetch_optional(db)
    .await?;
    Ok(match stored {
        Some((stored, _)) if stored != fingerprint => Some(Claim::Mismatch),
        Some((_, Some(id))) => Some(Claim::Replay(id)),
        _ => None,
    })
}

/// What the claim statement found for one key.
#[derive(sqlx::FromRow)]
pub(super) struct ClaimRow {
    got: bool,
    fresh: bool,
    stored: Option<String>,
    result: Option<i64>,
}

/// The CTEs that claim keys, after a CTE `req` with the columns `user_id`, `key` (NULL: the
/// request has none), `fingerprint` and `ord`; `$4` is the operation and `$5` tells whether the
/// keys' locks are held already (see [`claim_columns`]). They give `claim`: each request's `req`
/// row, whether it holds its key's lock (`got`), whether it claimed the key here (`fresh`), and
/// the request and result stored under the key by a committed call (`stored`, `result`).
macro_rules! claim_ctes {
    () => {
        "locked AS MATERIALIZED (
             SELECT ord, CASE WHEN key IS NULL THEN false ELSE $5 OR pg_try_advisory_xact_lock(
                 hashtextextended(user_id || ':' || $4 || ':' || key, 0)) END AS got
             FROM req
         ),
         ins AS (
             INSERT INTO idempotency_keys
                 (user_id, operation, idempotency_key, request_fingerprint)
             SELECT r.user_id, $4, r.key, r.fingerprint
             FROM req r JOIN locked l USING (ord) WHERE l.got
             ON CONFLICT DO NOTHING
             RETURNING user_id, idempotency_key
         ),
         claim AS MATERIALIZED (
             SELECT r.*, l.got, i.user_id IS NOT NULL AS fresh,
                 k.request_fingerprint AS stored, k.result_id AS result
             FROM req r JOIN locked l USING (ord)
             LEFT JOIN ins i ON i.user_id = r.user_id AND i.idempotency_key = r.key
             LEFT JOIN LATERAL (
                 SELECT request_fingerprint, result_id FROM idempotency_keys
                 WHERE user_id = r.user_id AND operation = $4 AND idempotency_key = r.key
                     AND user_id = ANY($1)
             ) k ON true
         )"
    };
}
pub(super) use claim_ctes;

/// The claim columns of a batch's requests, as [`claim_ctes`] reads them (`$1` users, `$2`
/// keys, `$3` fingerprints).
pub(super) struct ClaimColumns<'a> {
    pub users: Vec<UserId>,
    pub keys: Vec<Option<&'a str>>,
    pub fingerprints: Vec<Option<&'a str>>,
}

/// The columns of `requests` (each one's caller, and key with its fingerprint); with `wait` (a
/// call running alone), after waiting until no other transaction is claiming those keys
/// ([`wait_for_claims`]).
pub(super) async fn claim_columns<'a>(
    tx: &mut PgConnection,
    operation: Operation,
    requests: impl Iterator<Item = (UserId, Option<(&'a IdempotencyKey, &'a str)>)>,
    wait: bool,
) -> Result<ClaimColumns<'a>, StoreError> {
    let mut columns = ClaimColumns {
        users: Vec::new(),
        keys: Vec::new(),
        fingerprints: Vec::new(),
    };
    for (user, key) in requests {
        columns.users.push(user);
        columns.keys.push(key.map(|(k, _)| k.as_str()));
        columns.fingerprints.push(key.map(|(_, f)| f));
    }
    if wait {
        let claims: Vec<(UserId, &str)> = columns
            .users
            .iter()
            .zip(&columns.keys)
            .filter_map(|(&u, k)| Some((u, (*k)?)))
            .collect();
        wait_for_claims(tx, operation, &claims).await?;
    }
    Ok(columns)
}

/// Waits until no other transaction is claiming `claims` (user, key), holding their advisory
/// locks from then on. Its own statement: the claim that follows must read with a snapshot
/// taken after the wait.
pub(super) async fn wait_for_claims(
    tx: &mut PgConnection,
    operation: Operation,
    claims: &[(UserId, &str)],
) -> Result<(), StoreError> {
    if claims.is_empty() {
        return Ok(());
    }
    let (users, keys): (Vec<UserId>, Vec<&str>) = claims.iter().copied().unzip();
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended(u || ':' || $3 || ':' || k, 0))
         FROM unnest($1::bigint[], $2::text[]) AS r(u, k) ORDER BY u, k",
    )
    .bind(&users)
    .bind(&keys)
    .bind(operation.as_str())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

impl ClaimRow {
    /// The claim read from a batch statement's `row` (its `got`, `fresh`, `stored` and
    /// `result` columns) for a request with `key` and its fingerprint; `None` without a key.
    pub(super) fn of(
        row: &sqlx::postgres::PgRow,
        key: Option<(&IdempotencyKey, &str)>,
    ) -> Result<Option<BatchClaim>, StoreError> {
        let Some((_, fingerprint)) = key else {
            return Ok(None);
        };
        let claim: ClaimRow = sqlx::FromRow::from_row(row)?;
        Ok(Some(claim.claim(fingerprint)))
    }

    /// The claim of a request with `fingerprint`.
    pub(super) fn claim(self, fingerprint: &str) -> BatchClaim {
        match (self.got, self.fresh, self.stored) {
            (_, true, _) => BatchClaim::Claimed(Claim::Fresh),
            (true, false, Some(stored)) if stored != fingerprint => {
                BatchClaim::Claimed(Claim::Mismatch)
            }
            (true, false, Some(_)) => match self.result {
                Some(id) => BatchClaim::Claimed(Claim::Replay(id)),
                None => BatchClaim::Busy,
            },
            // The lock was taken, or the key was committed after this statement's snapshot.
            _ => BatchClaim::Busy,
        }
    }
}

/// The CTEs that settle the keys a batch claimed, for a batch statement's writes: under each
/// key its call's result, or the key given back (deleted) for a call refused. The arguments
/// name the statement's parameters: the keys' users (`bigint[]`), keys (`text[]`), results
/// (`bigint[]`, NULL: give back; [`SettleColumns`]) and the operation. Every key must have been
/// claimed by this transaction.
///
/// Each join with the request arrays also names its keys with `= ANY(...)`: the planner
/// cannot see an UNNEST's size and would otherwise scan a large table to hash it.
macro_rules! settle_ctes {
    ($users:literal, $keys:literal, $results:literal, $operation:literal) => {
        concat!(
            "claims AS (
                 SELECT * FROM unnest(",
            $users,
            "::bigint[], ",
            $keys,
            "::text[], ",
            $results,
            "::bigint[]) AS r(user_id, key, result)
             ),
             settled AS (
                 UPDATE idempotency_keys k SET result_id = r.result
                 FROM claims r
                 WHERE r.result IS NOT NULL AND k.user_id = r.user_id
                     AND k.operation = ",
            $operation,
            " AND k.idempotency_key = r.key
                     AND k.user_id = ANY(",
            $users,
            ")
             ),
             given_back AS (
                 DELETE FROM idempotency_keys k
                 USING claims r
                 WHERE r.result IS NULL AND k.user_id = r.user_id
                     AND k.operation = ",
            $operation,
            " AND k.idempotency_key = r.key
                     AND k.user_id = ANY(",
            $users,
            ")
             )"
        )
    };
}
pub(super) use settle_ctes;

/// The keys a batch settles, as the columns [`settle_ctes`] reads: for each key claimed by the
/// batch, its caller, the key and the result (`None`: the key is given back).
pub(super) struct SettleColumns<'a> {
    users: Vec<UserId>,
    keys: Vec<&'a str>,
    results: Vec<Option<i64>>,
}

impl<'a> SettleColumns<'a> {
    pub fn of(claims: &[(UserId, &'a IdempotencyKey, Option<i64>)]) -> Self {
        Self {
            users: claims.iter().map(|c| c.0).collect(),
            keys: claims.iter().map(|c| c.1.as_str()).collect(),
            results: claims.iter().map(|c| c.2).collect(),
        }
    }

    /// Binds the columns as the next three parameters of `query`: users, keys, results.
    pub fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query.bind(&self.users).bind(&self.keys).bind(&self.results)
    }
}
