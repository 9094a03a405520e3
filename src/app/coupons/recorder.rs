//! Recording coupon winners in Postgres, on the shared group-commit batcher
//! ([`super::super::group_commit`]).
//!
//! In a stampede every winner needs its row committed before it hears "yes", and each commit
//! waits for a WAL flush. Winners that queue together are written by one multi-row INSERT over
//! `unnest`ed arrays ([`coupons::issue_many`]): one statement, one transaction, one flush, one
//! round trip. One batch runs at a time, and the next takes every winner that queued meanwhile,
//! up to `COUPON_RECORD_BATCH_MAX`; a lone winner finds no batch running and is written at once,
//! so quiet traffic gains no latency. With batching off (a maximum of 1) each winner is written
//! by its own single-row INSERT ([`coupons::issue`]). A batch changes nothing about the answer
//! each winner gets: a grant Postgres refuses is retried alone to learn why.
//!
//! Bounded wait: a grant that waited longer than `max_wait` (batcher queue, slot, pool) is
//! answered UNAVAILABLE without being written, so every batch starts well within the orphan
//! grace after its wins, and a later call that finds a win without a row may release it. (The
//! grants a batch's statement refused are then retried alone, whatever their deadline, to learn
//! why: see [`one`].)
//!
//! Cancel safety: the winner's call ([`super::Coupons::issue`]) runs in a task of its own, so the
//! gRPC caller going away never drops a grant between the gate and this recorder. Once queued, a
//! batch runs in the batcher's task and answers every grant it took: written (OK), refused (with
//! why: the caller gives the seat back), not written (UNAVAILABLE: the seat goes back), or
//! unknown (OUTCOME_UNKNOWN: the win stays pending until a row is seen or the orphan grace
//! releases it). If the batcher stops without answering, the grant is treated as unknown, never
//! as "not written": a row may have committed, and releasing its seat would leave a row the
//! gate does not know.

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use tokio::time::Instant;

use crate::{
    app::group_commit::{Callers, GroupCommit, Turn, WriteBatches},
    domain::UserCoupon,
    store::{
        Dependency, StoreError,
        postgres::coupons::{self, IssueRefusal, SeatGrant},
    },
};

pub type Outcome = Result<Result<UserCoupon, IssueRefusal>, StoreError>;

/// A grant on its way to a batch.
struct Winner {
    grant: SeatGrant,
    /// Not written after this.
    deadline: Instant,
}

pub struct CouponRecorder {
    batcher: GroupCommit<Winner, Outcome>,
    max_wait: Duration,
}

fn unavailable(why: impl Into<String>) -> StoreError {
    StoreError::Unavailable {
        dependency: Dependency::Postgres,
        source: why.into().into(),
    }
}

impl CouponRecorder {
    /// `batches`: how grants are gathered into statements ([`WriteBatches`]).
    pub fn start(pg: PgPool, batches: WriteBatches, max_wait: Duration) -> Self {
        let batcher = GroupCommit::start(
            "coupons.record_batch",
            batches,
            Arc::new(move |winners, alone, _callers: Callers, turn: Turn| {
                // A batch is one statement that commits as it ends, and its cost is mostly the
                // round trip and the flush, whatever its size: the turn is kept until it has
                // committed, so the next batch takes every winner that queued meanwhile. Fewer,
                // larger batches cut the stampede's tail (docs/BENCHMARKS.md); a batch slower
                // than the stall still lets the next one start beside it.
                let pg = pg.clone();
                Box::pin(async move {
                    let answers = record_batch(pg, winners, alone).await;
                    drop(turn);
                    answers
                })
            }),
        );
        Self { batcher, max_wait }
    }

    #[tracing::instrument(target = "otel", name = "coupons.record", skip_all)]
    pub async fn record(&self, grant: SeatGrant) -> Outcome {
        let deadline = Instant::now() + self.max_wait;
        self.batcher
            .submit(Winner { grant, deadline })
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::OutcomeUnknown(
                    "the coupon recorder stopped before answering".into(),
                ))
            })
    }
}

/// Writes `winners` (one statement, or each alone) and answers each, in the order given.
async fn record_batch(pg: PgPool, winners: Vec<Winner>, alone: bool) -> Vec<Outcome> {
    let mut answers: Vec<Option<Outcome>> = winners.iter().map(|_| None).collect();
    let now = Instant::now();
    let mut timely = Vec::with_capacity(winners.len());
    for (i, winner) in winners.iter().enumerate() {
        if winner.deadline > now {
            timely.push(i);
        } else {
            answers[i] = Some(Err(unavailable("the coupon could not be recorded in time")));
        }
    }
    if let Some(oldest) = timely.iter().map(|&i| winners[i].deadline).min() {
        write(&pg, &winners, &timely, oldest, alone, &mut answers).await;
    }
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(unavailable("a coupon grant went unanswered"))))
        .collect()
}

async fn write(
    pg: &PgPool,
    winners: &[Winner],
    timely: &[usize],
    oldest: Instant,
    alone: bool,
    answers: &mut [Option<Outcome>],
) {
    let mut conn = match tokio::time::timeout_at(oldest, pg.acquire()).await {
        Ok(Ok(conn)) => conn,
        failed => {
            let why = match failed {
                Ok(Err(e)) => StoreError::from(e).to_string(),
                _ => "no Postgres connection in time to record the coupon".into(),
            };
            answer_all(timely, answers, || unavailable(why.clone()));
            return;
        }
    };
    let conn = &mut *conn;
    if alone {
        for &i in timely {
            answers[i] = Some(one(conn, &winners[i]).await);
        }
        return;
    }
    let grants: Vec<SeatGrant> = timely.iter().map(|&i| winners[i].grant).collect();
    match coupons::issue_many(&mut *conn, &grants).await {
        Ok(recorded) => {
            for &i in timely {
                let g = winners[i].grant;
                let row = recorded
                    .iter()
                    .find(|uc| uc.coupon_id == g.coupon_id && uc.user_id == g.user_id);
                answers[i] = Some(match row {
                    Some(uc) => Ok(Ok(uc.clone())),
                    // Refused by a constraint: ask again alone, to learn which.
                    None => one(conn, &winners[i]).await,
                });
            }
        }
        Err(StoreError::OutcomeUnknown(source)) => {
            // The statement may have committed: each winner hears so, and keeps its win
            // pending until a row is seen or the orphan grace releases it.
            let why = source.to_string();
            answer_all(timely, answers, || {
                StoreError::OutcomeUnknown(why.clone().into())
            });
        }
        Err(e) if e.is_unavailable() => {
            let why = e.to_string();
            answer_all(timely, answers, || unavailable(why.clone()));
        }
        Err(e) => {
            tracing::debug!(error = %e, grants = grants.len(), "batch refused; recording one by one");
            for &i in timely {
                answers[i] = Some(one(conn, &winners[i]).await);
            }
        }
    }
}

/// Answers every grant of `timely` with the same failure.
fn answer_all(timely: &[usize], answers: &mut [Option<Outcome>], failure: impl Fn() -> StoreError) {
    for &i in timely {
        answers[i] = Some(Err(failure()));
    }
}

/// Writes one grant alone: a lone winner, or one the batch's statement refused, to learn why.
/// Not bounded by its deadline: a grant left out of the batch by a unique constraint is
/// refused again (nothing is written), and its answer (the seat is someone else's, the user holds one) tells the caller whether the
/// seat may go back to the gate; UNAVAILABLE would give back a seat Postgres gave away.
async fn one(conn: &mut sqlx::PgConnection, winner: &Winner) -> Outcome {
    let g = winner.grant;
    coupons::issue(conn, g.coupon_id, g.user_id, g.seat).await
}
