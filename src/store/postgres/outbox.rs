//! The transactional outbox. Events are written in the transaction of what they report, and
//! delivered later by the outbox job: at least once, with the event id as idempotency key.
//!
//! Invariant: an event is DELIVERED only after the sink accepted it; a batch is claimed with
//! `FOR UPDATE SKIP LOCKED`, so two replicas never deliver the same event at the same moment.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::store::StoreError;

#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct OutboxEvent {
    pub id: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub payload: serde_json::Value,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
}

/// An event to enqueue with others.
pub struct NewEvent<'a> {
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub aggregate_id: i64,
    pub payload: serde_json::Value,
}

/// Enqueues several events with one multi-row insert.
pub async fn enqueue_many(
    tx: &mut PgConnection,
    events: Vec<NewEvent<'_>>,
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type).collect();
    let aggregates: Vec<i64> = events.iter().map(|e| e.aggregate_id).collect();
    let payloads: Vec<serde_json::Value> = events.into_iter().map(|e| e.payload).collect();
    sqlx::query(
        "INSERT INTO outbox_events (event_id, event_type, aggregate_id, payload)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::jsonb[])",
    )
    .bind(&ids)
    .bind(&types)
    .bind(&aggregates)
    .bind(&payloads)
    .execute(tx)
    .await?;
    Ok(())
}

/// Locks up to `limit` events that are due, oldest first, skipping those another transaction
/// is delivering.
pub async fn claim_due(tx: &mut PgConnection, limit: i64) -> Result<Vec<OutboxEvent>, StoreError> {
    let events = sqlx::query_as(
        "SELECT id, event_id, event_type, payload, attempts, created_at FROM outbox_events
         WHERE status = 'PENDING' AND next_attempt_at <= now()
         ORDER BY id
         LIMIT $1
         FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(tx)
    .await?;
    Ok(events)
}

pub async fn mark_delivered(tx: &mut PgConnection, ids: &[i64]) -> Result<(), StoreError> {
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

/// Records a failed attempt: the next one waits `base * 2^attempts` (at most `max`); an event
/// that failed `max_attempts` times is PARKED for an operator. Returns the ids parked now.
pub async fn mark_failed(
    tx: &mut PgConnection,
    ids: &[i64],
    error: &str,
    max_attempts: i32,
    base: Duration,
    max: Duration,
) -> Result<Vec<i64>, StoreError> {
    let parked = sqlx::query_scalar::<_, Option<i64>>(
        "UPDATE outbox_events SET
             attempts = attempts + 1,
             last_error = left($2, 1000),
             next_attempt_at = now() + least(
                 make_interval(secs => $3 * power(2, least(attempts, 30))),
                 make_interval(secs => $4)),
             status = CASE WHEN attempts + 1 >= $5 THEN 'PARKED' ELSE 'PENDING' END
         WHERE id = ANY($1)
         RETURNING CASE WHEN status = 'PARKED' THEN id END",
    )
    .bind(ids)
    .bind(error)
    .bind(base.as_secs_f64())
    .bind(max.as_secs_f64())
    .bind(max_attempts)
    .fetch_all(tx)
    .await?
    .into_iter()
    .flatten()
    .collect();
    Ok(parked)
}

/// Events waiting for delivery, and events parked after too many failures.
pub async fn backlog(db: impl PgExecutor<'_>) -> Result<(i64, i64), StoreError> {
    let counts = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'PENDING'),
                count(*) FILTER (WHERE status = 'PARKED')
         FROM outbox_events WHERE status <> 'DELIVERED'",
    )
    .fetch_one(db)
    .await?;
    Ok(counts)
}
