//! Delivering the outbox to the data platform, and the operator's view of what it gave up on.
//!
//! Invariant: an event is marked delivered only after the sink accepted it, and a batch is
//! claimed with `FOR UPDATE SKIP LOCKED` for the whole delivery, so replicas never deliver the
//! same event at the same moment. Each event gets its own verdict: one the platform refuses for
//! good is parked at once with the platform's answer and never delays the others; an outage
//! retries the events with capped exponential backoff and parks none before it has lasted
//! `park_after` (from each event's first failure since its last re-drive). Parked events wait
//! for an operator's re-drive.
//!
//! Cancel safety: a delivery dropped at any await rolls its batch back; events already sent
//! are sent again (at least once, deduplicated by event id).

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use tokio::sync::Notify;

use crate::{
    domain::{PageSize, PageToken, ParkedEvent, RedriveSelection},
    error::AppError,
    metrics,
    store::{
        data_platform::{Sink, Verdict},
        postgres::{
            self,
            outbox::{self, Backoff, OutboxEvent},
        },
    },
    telemetry,
};
use tracing::Instrument as _;

/// How the outbox delivers and retries.
#[derive(Clone, Debug)]
pub struct OutboxSettings {
    pub batch_size: usize,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// An event failing (an outage) for this long is parked instead of retried.
    pub park_after: Duration,
}

/// What one delivery pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    pub delivered: usize,
    /// Attempts that failed (outage or refusal).
    pub failed: usize,
    pub parked: usize,
}

/// Passes per run: a large backlog is drained in batches, but one run stays bounded.
const MAX_BATCHES_PER_RUN: usize = 50;
/// Parked events re-driven per statement by a re-drive of all.
const REDRIVE_BATCH: i64 = 1000;

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

    /// Delivers due events, batch after batch, until none are due (or the platform is out).
    pub async fn deliver(&self) -> Result<DeliveryReport, AppError> {
        let mut report = DeliveryReport::default();
        for _ in 0..MAX_BATCHES_PER_RUN {
            let (batch, claimed, outage) = self.deliver_batch().await?;
            report.delivered += batch.delivered;
            report.failed += batch.failed;
            report.parked += batch.parked;
            if claimed < self.settings.batch_size || outage {
                break;
            }
        }
        metrics::outbox_delivery(report.delivered, report.failed, report.parked);
        let (pending, parked) = outbox::backlog(&self.pg).await?;
        metrics::outbox_backlog(pending, parked);
        Ok(report)
    }

    /// One batch: its report, how many events it claimed, and whether the platform was out.
    async fn deliver_batch(&self) -> Result<(DeliveryReport, usize, bool), AppError> {
        let mut tx = self.pg.begin().await?;
        let events = outbox::claim_due(&mut tx, self.settings.batch_size as i64).await?;
        if events.is_empty() {
            return Ok((DeliveryReport::default(), 0, false));
        }
        let (span, trace) = telemetry::delivery(events.iter().map(OutboxEvent::trace_context));
        let verdicts = self.sink.deliver(&events, &trace).instrument(span).await;
        let mut accepted = Vec::new();
        let (mut refused, mut refusals) = (Vec::new(), Vec::new());
        let (mut failed, mut failures) = (Vec::new(), Vec::new());
        for (event, verdict) in events.iter().zip(verdicts) {
            match verdict {
                Verdict::Accepted => accepted.push(event.id),
                Verdict::Rejected(reason) => {
                    tracing::error!(outbox_id = event.id, event_id = %event.event_id,
                        reason, "data platform refused the event: parked");
                    refused.push(event.id);
                    refusals.push(reason);
                }
                Verdict::Unavailable(reason) => {
                    failed.push(event.id);
                    failures.push(reason);
                }
            }
        }
        outbox::mark_delivered(&mut tx, &accepted).await?;
        outbox::park(&mut tx, &refused, &refusals).await?;
        let backoff = Backoff {
            base: self.settings.retry_base,
            max: self.settings.retry_max,
            park_after: self.settings.park_after,
        };
        let given_up = outbox::record_failures(&mut tx, &failed, &failures, backoff).await?;
        postgres::commit(tx).await?;
        if let Some(reason) = failures.first() {
            tracing::warn!(
                events = failed.len(),
                reason,
                "data platform delivery failed"
            );
        }
        for id in &given_up {
            let event = events.iter().find(|e| e.id == *id);
            tracing::error!(outbox_id = id, event_id = ?event.map(|e| e.event_id),
                "outbox event parked: failing for longer than OUTBOX_PARK_AFTER_HOURS");
        }
        let report = DeliveryReport {
            delivered: accepted.len(),
            failed: refused.len() + failed.len(),
            parked: refused.len() + given_up.len(),
        };
        Ok((report, events.len(), !failed.is_empty()))
    }

    /// A page of parked events, oldest first, and the token of the next page if there is one.
    pub async fn parked(
        &self,
        page_size: PageSize,
        after: Option<PageToken>,
    ) -> Result<(Vec<ParkedEvent>, Option<PageToken>), AppError> {
        Ok(outbox::parked_page(&self.pg, page_size, after).await?)
    }

    /// Queues parked events for delivery again, with a fresh parking horizon, and wakes the
    /// delivery. Returns how many were re-driven.
    pub async fn redrive(&self, selection: RedriveSelection) -> Result<u64, AppError> {
        let redriven = match selection {
            RedriveSelection::Events(ids) => outbox::redrive(&self.pg, &ids).await?,
            RedriveSelection::All => self.redrive_all().await?,
        };
        if redriven > 0 {
            tracing::info!(redriven, "parked outbox events re-driven");
            self.nudge.notify_one();
        }
        Ok(redriven)
    }

    /// In batches of short statements, walking the outbox ids upwards: an event re-driven and
    /// parked again meanwhile is not picked up twice.
    async fn redrive_all(&self) -> Result<u64, AppError> {
        let (mut after, mut total) = (0, 0);
        while let Some((last, count)) =
            outbox::redrive_after(&self.pg, after, REDRIVE_BATCH).await?
        {
            (after, total) = (last, total + count);
        }
        Ok(total)
    }
}
