//! Purging what is kept only for a while: delivered outbox events after
//! `OUTBOX_RETENTION_HOURS`, idempotency keys after `IDEMPOTENCY_RETENTION_HOURS`.
//!
//! Invariant: each statement deletes at most [`PURGE_BATCH`] rows, oldest first, through an
//! index, so a purge never holds many locks or a long transaction, and a run stops after
//! [`MAX_BATCHES_PER_RUN`] statements per table (the next run goes on). Dropping a run at any
//! await loses nothing: each batch is its own statement.

use std::time::Duration;

use sqlx::PgPool;

use crate::{
    error::AppError,
    store::{
        StoreError,
        postgres::{idempotency, outbox},
    },
};

/// Rows deleted per statement.
const PURGE_BATCH: i64 = 1000;
/// Statements per table per run: at most 100,000 rows of each.
const MAX_BATCHES_PER_RUN: usize = 100;

/// How long things are kept.
#[derive(Clone, Copy, Debug)]
pub struct RetentionSettings {
    pub delivered_events: Duration,
    pub idempotency_keys: Duration,
}

/// What one purge deleted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PurgeReport {
    pub delivered_events: u64,
    pub idempotency_keys: u64,
}

pub struct Retention {
    pg: PgPool,
    settings: RetentionSettings,
}

impl Retention {
    pub fn new(pg: PgPool, settings: RetentionSettings) -> Self {
        Self { pg, settings }
    }

    pub async fn purge(&self) -> Result<PurgeReport, AppError> {
        let (pg, settings) = (&self.pg, self.settings);
        Ok(PurgeReport {
            delivered_events: in_batches(|| {
                outbox::purge_delivered(pg, settings.delivered_events, PURGE_BATCH)
            })
            .await?,
            idempotency_keys: in_batches(|| {
                idempotency::purge_expired(pg, settings.idempotency_keys, PURGE_BATCH)
            })
            .await?,
        })
    }
}

/// Runs `batch` until it deletes less than a full batch, or the run's bound.
async fn in_batches<F, Fut>(mut batch: F) -> Result<u64, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64, StoreError>>,
{
    let mut total = 0;
    for _ in 0..MAX_BATCHES_PER_RUN {
        let deleted = batch().await?;
        total += deleted;
        if deleted < PURGE_BATCH as u64 {
            break;
        }
    }
    Ok(total)
}
