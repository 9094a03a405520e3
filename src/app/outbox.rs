//! Delivering the outbox to the data platform.
//!
//! Invariant: an event is marked delivered only after the sink accepted it, and a batch is
//! claimed with `FOR UPDATE SKIP LOCKED` for the whole delivery, so replicas never deliver the
//! same event at the same moment. Failures back off exponentially; an event that keeps failing
//! is parked (status PARKED, a warning per event) for an operator instead of blocking the rest.

use super::App;
use crate::{error::AppError, metrics, store::postgres::outbox};

/// What one delivery pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    pub delivered: usize,
    pub failed: usize,
    pub parked: usize,
}

/// Passes per run: a large backlog is drained in batches, but one run stays bounded.
const MAX_BATCHES_PER_RUN: usize = 50;

impl App {
    /// Delivers due events, batch after batch, until none are due (or a batch fails).
    pub async fn deliver_outbox(&self) -> Result<DeliveryReport, AppError> {
        let mut report = DeliveryReport::default();
        for _ in 0..MAX_BATCHES_PER_RUN {
            let batch = self.deliver_outbox_batch().await?;
            let full = batch.delivered + batch.failed == self.settings().outbox.batch_size;
            let failed = batch.failed > 0;
            report.delivered += batch.delivered;
            report.failed += batch.failed;
            report.parked += batch.parked;
            if !full || failed {
                break;
            }
        }
        metrics::outbox_delivery(report.delivered, report.failed, report.parked);
        let (pending, parked) = outbox::backlog(self.pg()).await?;
        metrics::outbox_backlog(pending, parked);
        Ok(report)
    }

    async fn deliver_outbox_batch(&self) -> Result<DeliveryReport, AppError> {
        let settings = &self.settings().outbox;
        let mut tx = self.pg().begin().await?;
        let events = outbox::claim_due(&mut tx, settings.batch_size as i64).await?;
        if events.is_empty() {
            return Ok(DeliveryReport::default());
        }
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        let report = match self.sink().deliver(&events).await {
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
        tx.commit().await?;
        Ok(report)
    }
}
