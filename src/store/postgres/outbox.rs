//! The transactional outbox. Events are written in the transaction of what they report (one
//! per order transition), and delivered later by the outbox job: at least once, with the event
//! id as idempotency key.
//!
//! Invariant: an event is DELIVERED only after the sink accepted it; a batch is claimed with
//! `FOR UPDATE SKIP LOCKED`, so two replicas never deliver the same event at the same moment.
//! An event is PARKED (with `parked_at` and its reason in `last_error`) only when the sink
//! refused it for good or it kept failing past the parking horizon; a re-drive makes it
//! PENDING again with a fresh horizon.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor, Postgres, postgres::PgArguments, query::Query};
use uuid::Uuid;

use super::{delete_older_than, split_page};
use crate::{
    domain::{OrderEvent, OrderId, PageSize, PageToken, ParkedEvent},
    store::StoreError,
    telemetry::TraceContext,
};

#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct OutboxEvent {
    pub id: i64,
    pub event_id: Uuid,
    /// The name of the payload's message in events.proto (`OrderPlaced`, ...).
    pub event_type: String,
    /// The order it is about (the CloudEvents `subject`): the column, or for an event written
    /// before it existed, its payload's `order_id`.
    pub order_id: Option<i64>,
    pub payload: serde_json::Value,
    pub attempts: i32,
    /// When its transition committed (the transaction's time): the CloudEvents `time`.
    pub created_at: DateTime<Utc>,
    /// The trace context of the call that wrote the event, sent along with it.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl OutboxEvent {
    pub fn trace_context(&self) -> TraceContext {
        TraceContext {
            traceparent: self.traceparent.clone(),
            tracestate: self.tracestate.clone(),
        }
    }
}

/// An event to enqueue with others: its columns, ready to be bound as arrays.
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: &'static str,
    pub aggregate_id: i64,
    pub order_id: OrderId,
    pub payload: serde_json::Value,
    /// The trace context of the call that made the transition, captured in the caller's task.
    pub trace: TraceContext,
}

impl NewEvent {
    /// The row of `event`, with a fresh id unless its payload carries one.
    pub fn of<E: OrderEvent>(event: &E, trace: TraceContext) -> Result<Self, StoreError> {
        let payload = serde_json::to_value(event)
            .map_err(|e| StoreError::Inconsistent(format!("{} payload: {e}", E::TYPE)))?;
        Ok(Self {
            event_id: event.event_id().unwrap_or_else(Uuid::new_v4),
            event_type: E::TYPE,
            aggregate_id: event.aggregate_id(),
            order_id: event.order_id(),
            payload,
            trace,
        })
    }
}

/// Events as the columns of their rows, to bind as arrays.
pub(super) struct EventColumns {
    pub ids: Vec<Uuid>,
    pub types: Vec<&'static str>,
    pub aggregates: Vec<i64>,
    pub orders: Vec<OrderId>,
    pub payloads: Vec<serde_json::Value>,
    pub traceparents: Vec<Option<String>>,
    pub tracestates: Vec<Option<String>>,
}

impl EventColumns {
    pub fn of(events: Vec<NewEvent>) -> Self {
        let mut columns = Self {
            ids: Vec::with_capacity(events.len()),
            types: Vec::with_capacity(events.len()),
            aggregates: Vec::with_capacity(events.len()),
            orders: Vec::with_capacity(events.len()),
            payloads: Vec::with_capacity(events.len()),
            traceparents: Vec::with_capacity(events.len()),
            tracestates: Vec::with_capacity(events.len()),
        };
        for e in events {
            columns.ids.push(e.event_id);
            columns.types.push(e.event_type);
            columns.aggregates.push(e.aggregate_id);
            columns.orders.push(e.order_id);
            columns.payloads.push(e.payload);
            columns.traceparents.push(e.trace.traceparent);
            columns.tracestates.push(e.trace.tracestate);
        }
        columns
    }

    /// Binds the columns as the next seven parameters of `query`, in the order of the
    /// `outbox_events` insert: event_id, event_type, aggregate_id, order_id, payload,
    /// traceparent, tracestate.
    pub fn bind<'q>(
        &'q self,
        query: Query<'q, Postgres, PgArguments>,
    ) -> Query<'q, Postgres, PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.types)
            .bind(&self.aggregates)
            .bind(&self.orders)
            .bind(&self.payloads)
            .bind(&self.traceparents)
            .bind(&self.tracestates)
    }
}

/// The insert of events bound by [`EventColumns::bind`] as `$1` to `$7`: a statement of its
/// own, or a batch statement's CTE.
macro_rules! insert_events {
    () => {
        "INSERT INTO outbox_events (event_id, event_type, aggregate_id, order_id, payload,
                                    traceparent, tracestate)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::bigint[],
                              $5::jsonb[], $6::text[], $7::text[])"
    };
}
pub(super) use insert_events;

/// Enqueues several events with one multi-row insert.
#[tracing::instrument(target = "otel", name = "outbox.enqueue_batch", skip_all, fields(db.system = "postgresql"))]
pub async fn enqueue_many(tx: &mut PgConnection, events: Vec<NewEvent>) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let events = EventColumns::of(events);
    events
        .bind(sqlx::query(insert_events!()))
        .execute(tx)
        .await?;
    Ok(())
}

/// The order of an event: its column, or the payload's for a row written before the column.
macro_rules! event_order {
    () => {
        "coalesce(order_id, (payload->>'order_id')::bigint)"
    };
}

/// Locks up to `limit` events that are due, oldest first, skipping those another transaction
/// is delivering.
#[tracing::instrument(target = "otel", name = "outbox.claim_due", skip_all, fields(db.system = "postgresql"))]
pub async fn claim_due(tx: &mut PgConnection, limit: i64) -> Result<Vec<OutboxEvent>, StoreError> {
    let events = sqlx::query_as(concat!(
        "SELECT id, event_id, event_type, ",
        event_order!(),
        " AS order_id, payload, attempts, created_at, traceparent, tracestate
         FROM outbox_events
         WHERE status = 'PENDING' AND next_attempt_at <= now()
         ORDER BY id
         LIMIT $1
         FOR UPDATE SKIP LOCKED"
    ))
    .bind(limit)
    .fetch_all(tx)
    .await?;
    Ok(events)
}

pub async fn mark_delivered(tx: &mut PgConnection, ids: &[i64]) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE outbox_events
         SET status = 'DELIVERED', delivered_at = now(), attempts = attempts + 1, last_error = NULL
         WHERE id = ANY($1)",
    )
    .bind(ids)
    .execute(tx)
    .await?;
    Ok(())
}

/// Parks events the sink refused for good, each with its reason, at once.
pub async fn park(
    tx: &mut PgConnection,
    ids: &[i64],
    reasons: &[String],
) -> Result<(), StoreError> {
    // Most batches park nothing: no round trip (nor planning) for them.
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE outbox_events o SET
             status = 'PARKED', parked_at = now(), attempts = attempts + 1,
             last_error = left(r.reason, 1000)
         FROM unnest($1::bigint[], $2::text[]) AS r(id, reason)
         WHERE o.id = r.id",
    )
    .bind(ids)
    .bind(reasons)
    .execute(tx)
    .await?;
    Ok(())
}

/// How failed attempts are retried and when they give up.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// The first pause; each consecutive failure doubles it.
    pub base: Duration,
    /// The longest pause.
    pub max: Duration,
    /// An event failing for this long since its first failure (since the last re-drive) is
    /// parked instead of retried.
    pub park_after: Duration,
}

/// Records failed attempts (an outage: the sink did not take them this time): the next one
/// waits `base * 2^failures` (at most `max`), unless the event has been failing for
/// `park_after`, in which case it is PARKED. Returns the ids parked now.
pub async fn record_failures(
    tx: &mut PgConnection,
    ids: &[i64],
    reasons: &[String],
    backoff: Backoff,
) -> Result<Vec<i64>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let parked = sqlx::query_scalar::<_, Option<i64>>(
        "WITH failed AS (
             SELECT o.id, r.reason,
                    coalesce(o.failing_since, now()) <= now() - make_interval(secs => $5) AS give_up
             FROM outbox_events o
             JOIN unnest($1::bigint[], $2::text[]) AS r(id, reason) ON o.id = r.id
         )
         UPDATE outbox_events o SET
             attempts = attempts + 1,
             failures = failures + 1,
             failing_since = coalesce(failing_since, now()),
             last_error = left(f.reason, 1000),
             next_attempt_at = now() + least(
                 make_interval(secs => $3 * power(2, least(failures, 30))),
                 make_interval(secs => $4)),
             status = CASE WHEN f.give_up THEN 'PARKED' ELSE 'PENDING' END,
             parked_at = CASE WHEN f.give_up THEN now() END
         FROM failed f
         WHERE o.id = f.id
         RETURNING CASE WHEN f.give_up THEN o.id END",
    )
    .bind(ids)
    .bind(reasons)
    .bind(backoff.base.as_secs_f64())
    .bind(backoff.max.as_secs_f64())
    .bind(backoff.park_after.as_secs_f64())
    .fetch_all(tx)
    .await?
    .into_iter()
    .flatten()
    .collect();
    Ok(parked)
}

/// Events waiting for delivery, and parked events. Each count reads only its partial index
/// (`outbox_pending_idx`, `outbox_parked_idx`), never the delivered rows.
pub async fn backlog(db: impl PgExecutor<'_>) -> Result<(i64, i64), StoreError> {
    let counts = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox_events WHERE status = 'PENDING'),
                (SELECT count(*) FROM outbox_events WHERE status = 'PARKED')",
    )
    .fetch_one(db)
    .await?;
    Ok(counts)
}

/// A page of parked events, oldest first.
pub async fn parked_page(
    db: impl PgExecutor<'_>,
    page_size: PageSize,
    after: Option<PageToken>,
) -> Result<(Vec<ParkedEvent>, Option<PageToken>), StoreError> {
    let mut rows: Vec<ParkedEvent> = sqlx::query_as(concat!(
        "SELECT id, event_id, event_type,
                CASE WHEN event_type = 'PaymentCompleted' THEN aggregate_id END AS payment_id, ",
        event_order!(),
        " AS order_id, attempts, coalesce(last_error, '') AS reason, created_at, parked_at
         FROM outbox_events
         WHERE status = 'PARKED' AND id > $1
         ORDER BY id
         LIMIT $2"
    ))
    .bind(after.map_or(0, PageToken::last_key))
    .bind(page_size.get() + 1)
    .fetch_all(db)
    .await?;
    let next = split_page(&mut rows, page_size, |e| e.id);
    Ok((rows, next))
}

/// What a re-drive sets: due now, with a fresh parking horizon and backoff.
macro_rules! requeue {
    () => {
        "status = 'PENDING', parked_at = NULL, failing_since = NULL, failures = 0,
         next_attempt_at = now()"
    };
}

/// Queues these parked events again; ids that are not parked are left alone. Returns how many
/// were re-driven.
pub async fn redrive(db: impl PgExecutor<'_>, event_ids: &[Uuid]) -> Result<u64, StoreError> {
    let done = sqlx::query(concat!(
        "UPDATE outbox_events SET ",
        requeue!(),
        " WHERE status = 'PARKED' AND event_id = ANY($1)"
    ))
    .bind(event_ids)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Queues again up to `limit` parked events after the outbox row `after`; returns the last row
/// re-driven, or `None` when there were none left.
pub async fn redrive_after(
    db: impl PgExecutor<'_>,
    after: i64,
    limit: i64,
) -> Result<Option<(i64, u64)>, StoreError> {
    let (last, count): (Option<i64>, i64) = sqlx::query_as(concat!(
        "WITH requeued AS (
             UPDATE outbox_events SET ",
        requeue!(),
        "
             WHERE id IN (SELECT id FROM outbox_events WHERE status = 'PARKED' AND id > $1
                          ORDER BY id LIMIT $2)
             RETURNING id
         )
         SELECT max(id), count(*) FROM requeued"
    ))
    .bind(after)
    .bind(limit)
    .fetch_one(db)
    .await?;
    Ok(last.map(|last| (last, count as u64)))
}

/// Deletes up to `limit` events delivered more than `age` ago, oldest first; returns how many.
pub async fn purge_delivered(
    db: impl PgExecutor<'_>,
    age: Duration,
    limit: i64,
) -> Result<u64, StoreError> {
    delete_older_than(
        db,
        "DELETE FROM outbox_events WHERE id IN (
             SELECT id FROM outbox_events
             WHERE status = 'DELIVERED' AND delivered_at < now() - make_interval(secs => $1)
             ORDER BY delivered_at
             LIMIT $2)",
        age,
        limit,
    )
    .await
}
