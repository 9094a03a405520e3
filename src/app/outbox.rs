//! Delivering the outbox to the data platform.
//!
//! Invariant: an event is marked delivered only after the sink accepted it, and a batch is
//! claimed with `FOR UPDATE SKIP LOCKED` for the whole delivery, so replicas never deliver the
//! same event at the same moment. Failures back off exponentially; an event that keeps failing
//! is parked (status PARKED, a warning per event) for an operator instead of blocking the rest.

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use tokio::sync::Notify;

use crate::{
    error::AppError,
    metrics,
    store::{
        data_platform::Sink,
        postgres::{self, outbox},
    },
};

/// How the outbox delivers and retries.
#[derive(Clone, Debug)]
pub struct OutboxSettings {
    pub batch_size: usize,
    pub max_attempts: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
}

/// What one delivery pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    pub delivered: usize,
    pub failed: usize,
    pub parked: usize,
}

/// Passes per run: a large backlog is drained in batches, but one run stays bounded.
const MAX_BATCHES_PER_RUN: usize = 50;

/// The outbox delivery flow.
pub struct Outbox {
    pg: PgPool,
    sink: Sink,
    settings: OutboxSettings,
    /// Payments ring it when they commit, so their events leave at once.
    nudge: Arc<Notify>,
}

impl Outbox {
    pub fn new(pg: PgPool, sink: Sink, settings: OutboxSettings) -> Self {
        Self {
            pg,
            sink,
            settings,
            nudge: Arc::new(Notify::new()),
        }
    }

    /// What a payment rings after its commit.
    pub fn nudge(&self) -> Arc<Notify> {
        self.nudge.clone()
    }

    /// Resolves when a payment asked for a delivery since the last call.
    pub async fn nudged(&self) {
        self.nudge.notified().await;
    }

    /// Delivers due events, batch after batch, until none are due (or a batch fails).
    pub async fn deliver(&self) -> Result<DeliveryReport, AppError> {
        let mut report = DeliveryReport::default();
        for _ in 0..MAX_BATCHES_PER_RUN {
            let batch = self.deliver_batch().await?;
            let full = batch.delivered + batch.failed == self.settings.batch_size;
            let failed = batch.failed > 0;
            report.delivered += batch.delivered;
            report.failed += batch.failed;
            report.parked += batch.parked;
            if !full || failed {
                break;
            }
        }
        metrics::outbox_delivery(report.delivered, report.failed, report.parked);
        let (pending, parked) = outbox::backlog(&self.pg).await?;
        metrics::outbox_backlog(pending, parked);
        Ok(report)
    }

    async fn deliver_batch(&self) -> Result<DeliveryReport, AppError> {
        let settings = &self.settings;
        let mut tx = self.pg.begin().await?;
        let events = outbox::claim_due(&mut tx, settings.batch_size as i64).await?;
        if events.is_empty() {
            return Ok(DeliveryReport::default());
        }
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        let report = match self.sink.deliver(&events).await {
            Ok(()) => {
                outbox::mark_delivered(&mut tx, &ids).await?;
                DeliveryReport {
                    delivered: ids.len(),
                    ..Default::default()
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, events = ids.len(), "data platform delivery failed");
                let parked = outbox::mark_failed(
                    &mut tx,
                    &ids,
                    &e.to_string(),
                    settings.max_attempts as i32,
                    settings.retry_base,
                    settings.retry_max,
                )
                .await?;
                for id in &parked {
                    let event = events.iter().find(|e| e.id == *id);
                    tracing::error!(outbox_id = id, event_id = ?event.map(|e| e.event_id),
                        "outbox event parked after too many failed deliveries");
                }
                DeliveryReport {
                    failed: ids.len(),
                    parked: parked.len(),
                    ..Default::default()
                }
            }
        };
        postgres::commit(tx).await?;
        Ok(report)
    }
}
