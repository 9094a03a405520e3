//! Recording coupon winners in Postgres, in batches.
//!
//! In a stampede every winner needs its row committed before it hears "yes", and each commit
//! waits for a WAL flush. Winners that arrive together are written by one multi-row INSERT (one
//! transaction, one flush), at most a few batches at a time; while those run, the next winners
//! queue up and form the next batch. A lone winner is written at once, so quiet traffic gains
//! no latency. A batch changes nothing about the answer each winner gets: a grant Postgres
//! refuses is retried alone to learn why.
//!
//! Bounded wait: a grant that waited longer than `max_wait` (queue and pool) is answered
//! UNAVAILABLE without being written, so every insert starts well within the orphan grace
//! after its win, and a later call that finds the win without a row may release it.

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    time::Instant,
};
use tracing::{Instrument as _, Span};

use super::coupons::{self, IssueRefusal, SeatGrant};
use crate::{
    domain::UserCoupon,
    store::{Dependency, StoreError},
    telemetry,
};

/// Grants written by one statement at most.
const MAX_BATCH: usize = 256;
/// Batches in flight at once (each holds one pooled connection).
const MAX_IN_FLIGHT: usize = 4;

pub type Outcome = Result<Result<UserCoupon, IssueRefusal>, StoreError>;

struct Pending {
    grant: SeatGrant,
    /// Not written after this.
    deadline: Instant,
    reply: oneshot::Sender<Outcome>,
    /// The winner's call, linked from the batch's span.
    caller: Span,
}

pub struct CouponRecorder {
    queue: mpsc::Sender<Pending>,
    max_wait: Duration,
}

fn unavailable(why: String) -> StoreError {
    StoreError::Unavailable {
        dependency: Dependency::Postgres,
        source: why.into(),
    }
}

impl CouponRecorder {
    /// Starts the batching task; it stops when the recorder is dropped.
    pub fn start(pg: PgPool, max_wait: Duration) -> Self {
        let (queue, pending) = mpsc::channel(MAX_BATCH * MAX_IN_FLIGHT * 4);
        tokio::spawn(run(pg, pending));
        Self { queue, max_wait }
    }

    #[tracing::instrument(target = "otel", name = "coupons.record", skip_all)]
    pub async fn record(&self, grant: SeatGrant) -> Outcome {
        let (reply, answer) = oneshot::channel();
        let deadline = Instant::now() + self.max_wait;
        self.queue
            .send(Pending {
                grant,
                deadline,
                reply,
                caller: Span::current(),
            })
            .await
            .map_err(|_| unavailable("the coupon recorder has stopped".into()))?;
        answer
            .await
            .map_err(|_| unavailable("the coupon recorder dropped a grant".into()))?
    }
}

async fn run(pg: PgPool, mut pending: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = pending.recv().await {
        // Waiting for a slot is what lets the next batch grow.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match pending.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let pg = pg.clone();
        let span = telemetry::batch("coupons.record_batch", batch.iter().map(|p| &p.caller));
        tokio::spawn(
            async move {
                record_batch(&pg, batch).await;
                drop(slot);
            }
            .instrument(span),
        );
    }
}

async fn record_batch(pg: &PgPool, batch: Vec<Pending>) {
    let now = Instant::now();
    let (batch, late): (Vec<Pending>, Vec<Pending>) =
        batch.into_iter().partition(|p| p.deadline > now);
    for pending in late {
        let _ = pending.reply.send(Err(unavailable(
            "the coupon could not be recorded in time".into(),
        )));
    }
    let Some(oldest) = batch.iter().map(|p| p.deadline).min() else {
        return;
    };
    let mut conn = match tokio::time::timeout_at(oldest, pg.acquire()).await {
        Ok(Ok(conn)) => conn,
        failed => {
            let why = match failed {
                Ok(Err(e)) => StoreError::from(e).to_string(),
                _ => "no Postgres connection in time to record the coupon".into(),
            };
            for pending in batch {
                let _ = pending.reply.send(Err(unavailable(why.clone())));
            }
            return;
        }
    };
    let pg = &mut *conn;
    let grants: Vec<SeatGrant> = batch.iter().map(|p| p.grant).collect();
    match coupons::issue_many(&mut *pg, &grants).await {
        Ok(recorded) => {
            for pending in batch {
                let g = pending.grant;
                let row = recorded
                    .iter()
                    .find(|uc| uc.coupon_id == g.coupon_id && uc.user_id == g.user_id);
                let outcome = match row {
                    Some(uc) => Ok(Ok(uc.clone())),
                    // Refused by a constraint: ask again alone, to learn which.
                    None => coupons::issue(&mut *pg, g.coupon_id, g.user_id, g.seat).await,
                };
                let _ = pending.reply.send(outcome);
            }
        }
        Err(StoreError::OutcomeUnknown(source)) => {
            // The statement may have committed: each winner hears so, and keeps its win
            // pending until a row is seen or the orphan grace releases it.
            let why = source.to_string();
            for pending in batch {
                let _ = pending
                    .reply
                    .send(Err(StoreError::OutcomeUnknown(why.clone().into())));
            }
        }
        Err(e) if e.is_unavailable() => {
            let why = e.to_string();
            for pending in batch {
                let _ = pending.reply.send(Err(unavailable(why.clone())));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, grants = batch.len(), "batch refused; recording one by one");
            for pending in batch {
                let g = pending.grant;
                let outcome = coupons::issue(&mut *pg, g.coupon_id, g.user_id, g.seat).await;
                let _ = pending.reply.send(outcome);
            }
        }
    }
}
