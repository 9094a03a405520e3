//! A batch of payments in two statements and the commit: [`lock`] claims the keys and locks and
//! reads every row the decisions need; the caller decides in Rust; [`write`] makes every write
//! of the accepted payments and settles the keys.
//!
//! Each statement is one round trip, whatever the batch's size: a batch made ten (one per
//! step, each waiting for the last), and a round trip is what a hot batch spends most of its
//! time on while it holds its rows locked.
//!
//! Lock order: the statement locks orders (ascending id) before balances (ascending user id),
//! the global order of `src/store/postgres` (orders → balances → coupons → products) that
//! refunds, cancels and expiry follow too. Within one statement the order is forced by the
//! data flow, not by the order the CTEs are written in: the balances' key list is a subquery
//! that joins every locked order, so it can only be read once all the orders are locked.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row as _, postgres::PgRow};

use super::{
    idempotency::{
        BatchClaim, ClaimRow, Operation, SettleColumns, claim_columns, claim_ctes, settle_ctes,
    },
    orders::{OrderRow, item_arrays, items_from_arrays, order_columns},
    outbox::{EventColumns, NewEvent, insert_events},
};
use crate::{
    domain::{IdempotencyKey, OrderId, OrderItem, PaymentId, TxId, UserCouponId, UserId, Won},
    store::StoreError,
};

/// One payment asked of a batch.
pub struct PayRequest<'a> {
    pub user_id: UserId,
    pub order_id: OrderId,
    /// With the request's fingerprint.
    pub key: Option<(&'a IdempotencyKey, &'a str)>,
}

/// What [`lock`] found for one request.
pub struct Found {
    /// How its key was claimed (`None`: no key).
    pub claim: Option<BatchClaim>,
    /// Its order, locked, with its items, if the request is still open (no key, or a key
    /// claimed here) and the order exists.
    pub order: Option<(OrderRow, Vec<OrderItem>)>,
    /// The caller's balance, locked, if the order is the caller's and they have a balance row.
    pub balance: Option<Won>,
    /// A payment id reserved for it, if its order was found (refused payments leave a gap).
    pub payment_id: Option<PaymentId>,
}

/// Claims the requests' keys without waiting (unless `wait`: a call running alone, whose keys
/// must be free of other claims first), locks the orders of the requests still open and their
/// callers' balances, and reads their items, the transaction's time and a payment id for each
/// order found: one statement. The answer is one [`Found`] per request, in order, and the time.
///
/// The claim is [`super::idempotency::claim_ctes`]'s; a key must appear once among `requests`.
#[tracing::instrument(target = "otel", name = "payments.lock_batch", skip_all, fields(db.system = "postgresql"))]
pub async fn lock(
    tx: &mut PgConnection,
    requests: &[PayRequest<'_>],
    wait: bool,
) -> Result<(DateTime<Utc>, Vec<Found>), StoreError> {
    let columns = claim_columns(
        tx,
        Operation::Pay,
        requests.iter().map(|r| (r.user_id, r.key)),
        wait,
    )
    .await?;
    let orders: Vec<OrderId> = requests.iter().map(|r| r.order_id).collect();
    let rows: Vec<PgRow> = sqlx::query(concat!(
        "WITH req AS (
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $6::bigint[])
                 WITH ORDINALITY AS r(user_id, key, fingerprint, order_id, ord)
         ), ",
        claim_ctes!(),
        ", open AS (SELECT * FROM claim WHERE key IS NULL OR fresh),
         o AS MATERIALIZED (
             SELECT ",
        order_columns!(),
        " FROM orders WHERE id = ANY(ARRAY(SELECT order_id FROM open))
             ORDER BY id FOR UPDATE
         ),
         b AS MATERIALIZED (
             SELECT user_id, balance FROM user_balances
             WHERE user_id = ANY(ARRAY(
                 SELECT c.user_id FROM open c JOIN o ON o.id = c.order_id AND o.user_id = c.user_id))
             ORDER BY user_id FOR UPDATE
         )
         SELECT c.got, c.fresh, c.stored, c.result, now() AS now, b.balance,
             CASE WHEN o.id IS NOT NULL
                 THEN nextval(pg_get_serial_sequence('payments', 'id')) END AS payment_id,
             it.*, o.*
         FROM claim c
         LEFT JOIN o ON o.id = c.order_id AND (c.key IS NULL OR c.fresh)
         LEFT JOIN b ON b.user_id = c.user_id AND o.user_id = c.user_id ",
        item_arrays!(),
        " ORDER BY c.ord"
    ))
    .bind(&columns.users)
    .bind(&columns.keys)
    .bind(&columns.fingerprints)
    .bind(Operation::Pay.as_str())
    .bind(wait)
    .bind(&orders)
    .fetch_all(&mut *tx)
    .await?;
    let mut now = None;
    let mut found = Vec::with_capacity(rows.len());
    for (row, request) in rows.iter().zip(requests) {
        now = Some(row.try_get("now")?);
        found.push(Found {
            claim: ClaimRow::of(row, request.key)?,
            order: match row.try_get::<Option<OrderId>, _>("id")? {
                Some(_) => Some((sqlx::FromRow::from_row(row)?, items_from_arrays(row)?)),
                None => None,
            },
            balance: row.try_get("balance")?,
            payment_id: row.try_get("payment_id")?,
        });
    }
    let now = now.ok_or_else(|| StoreError::Inconsistent("a batch of no payments".into()))?;
    Ok((now, found))
}

pub struct PaymentRecord {
    pub id: PaymentId,
    pub order_id: OrderId,
    pub user_id: UserId,
    pub amount: Won,
    pub balance_after: Won,
    pub user_coupon_id: Option<UserCouponId>,
}

/// Writes a batch's payments and settles its keys, in one statement: each buyer's balance
/// debited once (by the sum of their payments, whose `balance_after` were computed from the
/// locked balance), a balance row for a buyer of fully discounted orders who never charged, one
/// USE ledger entry and one payment per order, the orders as PAID at `paid_at` with their next
/// event number taken (their PaymentCompleted `events` carry it: the locked row's number + 1),
/// their coupons as USED, the events in the outbox, and under each key claimed by the batch its
/// payment's id (`Some`) or nothing: the key given back (`None`). The orders and balances must
/// be locked by this transaction and checked. Also returns the transaction's id, shared by
/// every payment of the batch: once committed, it tells which snapshots see them (the ranking
/// counts each payment once).
///
/// Each join with the request arrays also names its keys with `= ANY(...)`: the planner
/// cannot see an UNNEST's size and would otherwise scan a large table to hash it.
#[tracing::instrument(target = "otel", name = "payments.write_batch", skip_all, fields(db.system = "postgresql"))]
pub async fn write(
    tx: &mut PgConnection,
    records: &[PaymentRecord],
    paid_at: DateTime<Utc>,
    events: Vec<NewEvent>,
    keys: &[(UserId, &IdempotencyKey, Option<i64>)],
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
    let keys = SettleColumns::of(keys);
    let events = EventColumns::of(events);
    let query = sqlx::query(concat!(
        "WITH req AS (
             SELECT * FROM unnest($8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[],
                 $12::bigint[], $13::bigint[])
                 AS r(payment_id, order_id, user_id, amount, balance_after, coupon)
         ),
         opened AS (
             INSERT INTO user_balances (user_id, balance)
             SELECT DISTINCT user_id, 0 FROM req
             ON CONFLICT (user_id) DO NOTHING
         ),
         debit AS (
             UPDATE user_balances b SET balance = b.balance - d.total, updated_at = now()
             FROM unnest($14::bigint[], $15::bigint[]) AS d(user_id, total)
             WHERE b.user_id = d.user_id AND d.total > 0 AND b.user_id = ANY($14)
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
             SELECT r.payment_id, r.order_id, r.user_id, r.amount, r.balance_after, l.id, $16
             FROM req r JOIN ledger l USING (order_id)
         ),
         paid AS (
             UPDATE orders o SET status = 'PAID', paid_at = $16,
                 event_sequence = o.event_sequence + 1
             WHERE o.id = ANY($9)
         ),
         used AS (
             UPDATE user_coupons uc SET status = 'USED', used_at = now()
             FROM req r
             WHERE uc.id = r.coupon AND uc.order_id = r.order_id AND uc.status = 'RESERVED'
                 AND uc.id = ANY($13)
         ),
         events AS (",
        insert_events!(),
        "), ",
        settle_ctes!("$17", "$18", "$19", "$20"),
        " SELECT pg_current_xact_id()::text"
    ));
    let query = events
        .bind(query)
        .bind(&ids)
        .bind(&orders)
        .bind(&users)
        .bind(&amounts)
        .bind(&afters)
        .bind(&coupons)
        .bind(&debit_users)
        .bind(&debit_sums)
        .bind(paid_at);
    let tx_id: String = keys
        .bind(query)
        .bind(Operation::Pay.as_str())
        .fetch_one(tx)
        .await?
        .try_get(0)?;
    TxId::parse(&tx_id).ok_or_else(|| StoreError::Inconsistent(format!("transaction id {tx_id:?}")))
}
