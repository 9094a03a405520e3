//! A batch of charges in two statements and the commit: [`lock`] claims the keys and locks and
//! reads the callers' balances; the caller decides in Rust; [`write`] credits the balances,
//! writes the ledger entries and settles the keys.
//!
//! Lock order: only balances (ascending user id), after the keys' advisory locks, as in
//! [`super::pay_batch`]: the global order of `src/store/postgres` (orders → balances → coupons →
//! products) holds, since a charge locks nothing else.
//!
//! A caller without a balance row yet: [`lock`] upserts every balance it locks
//! (`INSERT … ON CONFLICT (user_id) DO UPDATE SET balance = b.balance RETURNING balance`). Under
//! READ COMMITTED an `INSERT … ON CONFLICT DO UPDATE` either inserts or updates, and when the
//! conflicting row comes from a transaction not yet visible to the statement it waits for that
//! transaction and then updates (so locks) the row's latest committed version, even though no
//! version of it is visible to its snapshot (PostgreSQL docs, "Read Committed Isolation Level";
//! isolation spec `insert-conflict-do-update`). So two batches creating one new user's row both
//! end up reading and locking the latest balance: no lost credit, no duplicate-key error.

use std::collections::BTreeMap;

use sqlx::{PgConnection, Row as _, postgres::PgRow};

use super::idempotency::{BatchClaim, ClaimRow, Operation, claim_columns, claim_ctes};
use crate::{
    domain::{IdempotencyKey, LedgerEntry, UserId, Won},
    store::StoreError,
};

/// One charge asked of a batch.
pub struct ChargeRequest<'a> {
    pub user_id: UserId,
    /// With the request's fingerprint.
    pub key: Option<(&'a IdempotencyKey, &'a str)>,
    /// Whether the charge may be credited at all (its amount is within the maximum): only then
    /// is the caller's balance locked (and its row opened).
    pub creditable: bool,
}

/// What [`lock`] found for one request.
pub struct Found {
    /// How its key was claimed (`None`: no key).
    pub claim: Option<BatchClaim>,
    /// The caller's balance, locked (0 for a row opened here), if the request is still open
    /// (no key, or a key claimed here) and creditable.
    pub balance: Option<Won>,
}

/// Claims the requests' keys without waiting (unless `wait`: a call running alone, whose keys
/// must be free of other claims first), then locks and reads the balances of the callers of
/// the creditable requests still open, ascending user id, opening a row (balance 0) for a user
/// who has none: one statement. One [`Found`] per request, in order.
///
/// The claim is [`super::idempotency::claim_ctes`]'s; a key must appear once among `requests`.
#[tracing::instrument(target = "otel", name = "balances.lock_batch", skip_all, fields(db.system = "postgresql"))]
pub async fn lock(
    tx: &mut PgConnection,
    requests: &[ChargeRequest<'_>],
    wait: bool,
) -> Result<Vec<Found>, StoreError> {
    let columns = claim_columns(
        tx,
        Operation::Charge,
        requests.iter().map(|r| (r.user_id, r.key)),
        wait,
    )
    .await?;
    let creditable: Vec<bool> = requests.iter().map(|r| r.creditable).collect();
    // The upsert's rows come from the sorted SELECT, so the locks are taken ascending. The
    // no-op update is what locks an existing row and returns its latest committed balance.
    let rows: Vec<PgRow> = sqlx::query(concat!(
        "WITH req AS (
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $6::bool[])
                 WITH ORDINALITY AS r(user_id, key, fingerprint, creditable, ord)
         ), ",
        claim_ctes!(),
        ", b AS (
             INSERT INTO user_balances AS b (user_id, balance)
             SELECT DISTINCT user_id, 0 FROM claim
             WHERE creditable AND (key IS NULL OR fresh)
             ORDER BY user_id
             ON CONFLICT (user_id) DO UPDATE SET balance = b.balance
             RETURNING user_id, balance
         )
         SELECT c.got, c.fresh, c.stored, c.result, b.balance
         FROM claim c
         LEFT JOIN b ON b.user_id = c.user_id AND c.creditable AND (c.key IS NULL OR c.fresh)
         ORDER BY c.ord"
    ))
    .bind(&columns.users)
    .bind(&columns.keys)
    .bind(&columns.fingerprints)
    .bind(Operation::Charge.as_str())
    .bind(wait)
    .bind(&creditable)
    .fetch_all(&mut *tx)
    .await?;
    if rows.len() != requests.len() {
        return Err(StoreError::Inconsistent(format!(
            "{} charges locked {} rows",
            requests.len(),
            rows.len()
        )));
    }
    let mut found = Vec::with_capacity(rows.len());
    for (row, request) in rows.iter().zip(requests) {
        found.push(Found {
            claim: ClaimRow::of(row, request.key)?,
            balance: row.try_get("balance")?,
        });
    }
    Ok(found)
}

/// A charge the batch accepted.
pub struct ChargeRecord {
    pub user_id: UserId,
    pub amount: Won,
    /// The caller's balance right after this charge (the locked balance plus the batch's
    /// accepted charges of that user up to this one).
    pub balance_after: Won,
}

/// Writes a batch's charges and settles its keys, in one statement: each caller's balance
/// credited once (by the sum of their charges), one CHARGE ledger entry per record (ids taken
/// in the records' order, so a user's later charge has the later id, as if run one by one),
/// and under each key claimed by the batch the ledger id of its record (`Some(n)`: the n-th
/// record, from 0) or nothing: the key given back (`None`). The balances must be locked by this
/// transaction. Returns the ledger entries, in the records' order.
///
/// Each join with the request arrays also names its keys with `= ANY(...)`: the planner
/// cannot see an UNNEST's size and would otherwise scan a large table to hash it.
#[tracing::instrument(target = "otel", name = "balances.write_batch", skip_all, fields(db.system = "postgresql"))]
pub async fn write(
    tx: &mut PgConnection,
    records: &[ChargeRecord],
    keys: &[(UserId, &IdempotencyKey, Option<i64>)],
) -> Result<Vec<LedgerEntry>, StoreError> {
    let mut credits: BTreeMap<UserId, Won> = BTreeMap::new();
    for r in records {
        let sum = credits.entry(r.user_id).or_insert(Won::ZERO);
        *sum = sum
            .checked_add(r.amount)
            .ok_or_else(|| StoreError::Inconsistent("a batch credit overflows".into()))?;
    }
    let (credit_users, credit_sums): (Vec<UserId>, Vec<Won>) = credits.into_iter().unzip();
    let users: Vec<UserId> = records.iter().map(|r| r.user_id).collect();
    let amounts: Vec<Won> = records.iter().map(|r| r.amount).collect();
    let afters: Vec<Won> = records.iter().map(|r| r.balance_after).collect();
    let key_users: Vec<UserId> = keys.iter().map(|k| k.0).collect();
    let key_names: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    // The records' ordinals (from 1), as `numbered` counts them.
    let key_records: Vec<Option<i64>> = keys.iter().map(|k| k.2.map(|n| n + 1)).collect();
    let entries: Vec<LedgerEntry> = sqlx::query_as(
        "WITH numbered AS MATERIALIZED (
             SELECT r.*, nextval(pg_get_serial_sequence('balance_history', 'id')) AS id
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) WITH ORDINALITY
                 AS r(user_id, amount, balance_after, ord)
         ),
         credit AS (
             UPDATE user_balances b SET balance = b.balance + c.total, updated_at = now()
             FROM unnest($4::bigint[], $5::bigint[]) AS c(user_id, total)
             WHERE b.user_id = c.user_id AND b.user_id = ANY($4)
         ),
         ledger AS (
             INSERT INTO balance_history (id, user_id, kind, amount, balance_after)
             OVERRIDING SYSTEM VALUE
             SELECT id, user_id, 'CHARGE', amount, balance_after FROM numbered
             RETURNING id, user_id, kind, amount, balance_after, order_id, created_at
         ),
         claims AS (
             SELECT * FROM unnest($6::bigint[], $7::text[], $8::bigint[]) AS r(user_id, key, ord)
         ),
         settled AS (
             UPDATE idempotency_keys k SET result_id = n.id
             FROM claims r JOIN numbered n USING (ord)
             WHERE k.user_id = r.user_id AND k.operation = $9
                 AND k.idempotency_key = r.key AND k.user_id = ANY($6)
         ),
         given_back AS (
             DELETE FROM idempotency_keys k
             USING claims r
             WHERE r.ord IS NULL AND k.user_id = r.user_id AND k.operation = $9
                 AND k.idempotency_key = r.key AND k.user_id = ANY($6)
         )
         SELECT l.* FROM ledger l JOIN numbered n USING (id) ORDER BY n.ord",
    )
    .bind(&users)
    .bind(&amounts)
    .bind(&afters)
    .bind(&credit_users)
    .bind(&credit_sums)
    .bind(&key_users)
    .bind(&key_names)
    .bind(&key_records)
    .bind(Operation::Charge.as_str())
    .fetch_all(tx)
    .await?;
    if entries.len() != records.len() {
        return Err(StoreError::Inconsistent(format!(
            "{} charges wrote {} ledger entries",
            records.len(),
            entries.len()
        )));
    }
    Ok(entries)
}
