//! Group commit: concurrent calls of one write flow are gathered into batches, and each batch
//! is one Postgres transaction, so one WAL flush and one hold of a hot row's lock serve many
//! calls.
//!
//! Shape: callers queue into one batcher task. It takes the first queued call, waits for a free
//! slot (at most [`WriteBatches::in_flight`] batches run at once) and for the flow's [`Turn`],
//! then takes every call already queued behind it, up to the batch maximum, and runs them in a
//! task of their own. There is no timer on the way in: a lone caller runs at once, and under
//! load the calls that arrive while a batch runs form the next one.
//!
//! One batch of a flow holds the turn at a time, until it ends, so the next batch is as large
//! as the calls that queued meanwhile. On a machine whose cores are all busy a call's share of
//! its batch's round trips, commit and recheck of a hot row is most of what it costs, and any
//! batch started beside a running one only splits the same calls into smaller batches
//! (docs/BENCHMARKS.md). With [`WriteBatches::overlap_commit`] a batch passes the turn just
//! before its commit instead (PolarDB's alternation): the next one locks and decides while the
//! previous commit is flushed, which pays where commits wait on a network (a synchronous
//! standby) while cores idle. The next batch waits for the turn [`WriteBatches::stall`] at most:
//! past that, the batch holding it is taken for stuck (on a row lock held elsewhere: a long
//! refund, an operator's transaction) and the next starts beside it without the turn, while
//! slots remain, so one stuck batch does not stop its flow.
//!
//! Invariants: a call is answered only by its batch's runner, after that batch committed or
//! rolled back; a call whose caller has gone (deadline, disconnect: its answer channel is
//! closed) before its batch starts is dropped from it and leaves nothing. A runner may also
//! leave out calls whose callers went while it waited for row locks ([`Callers`]), as long as
//! it has written nothing for them yet. With a maximum of 1
//! there is no batcher at all: each call runs alone in its own task, as before batching.
//!
//! Cancel safety: the runner runs in a spawned task that the caller only awaits, so once a
//! batch has started, dropping a caller's future changes nothing for the batch: its calls commit
//! or roll back together.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Weak},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot},
    time::Instant,
};
use tracing::Instrument;

use crate::{error::AppError, metrics, telemetry};

/// How a flow's calls are batched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteBatches {
    /// Calls one transaction makes at most; 1 turns batching off.
    pub max: usize,
    /// Batches of one flow running at once at most, at least 1: a second starts only beside a
    /// batch that has passed its turn or stalled.
    pub in_flight: usize,
    /// Whether a batch passes its [`Turn`] when only its commit is left (rather than when it
    /// ends), so that the next batch decides while it commits.
    pub overlap_commit: bool,
    /// How long the next batch waits for the turn before it starts beside the batch holding it.
    pub stall: Duration,
}

/// A batch's turn to run, handed to its runner: the flow's next batch starts once the runner
/// drops it (the write flows' runners hold it until their commit has returned), once the next
/// batch has waited [`WriteBatches::stall`] for it, or, with [`WriteBatches::overlap_commit`],
/// once the runner says it is committing. A call run alone holds none.
#[derive(Default)]
pub struct Turn {
    permit: Option<OwnedSemaphorePermit>,
    overlap_commit: bool,
}

impl Turn {
    /// Says the batch has made and written every decision, with only its commit left: with
    /// `overlap_commit` the flow's next batch may start now.
    pub fn committing(&mut self) {
        if self.overlap_commit {
            self.permit.take();
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Runs a batch of calls in one transaction and answers each, in the order given. `alone` is
/// true for a call run by itself (batching off, or a call a batch could not take).
pub type Runner<C, A> = Arc<dyn Fn(Vec<C>, bool, Callers, Turn) -> BoxFuture<Vec<A>> + Send + Sync>;

/// Whether the callers of a batch's calls still wait for their answers: each caller holds a
/// token while it waits, and dropping its future (deadline, disconnect) drops the token. A
/// batch waits longest for row locks; a call whose caller left meanwhile can still be left
/// out if nothing was written for it.
#[derive(Clone, Default)]
pub struct Callers(Vec<Weak<()>>);

impl Callers {
    /// True when the caller of the `i`-th call has gone.
    pub fn gone(&self, i: usize) -> bool {
        self.0.get(i).is_some_and(|t| t.strong_count() == 0)
    }
}

struct Queued<C, A> {
    call: C,
    reply: oneshot::Sender<A>,
    /// The caller's span, which the batch's span links to.
    span: tracing::Span,
    /// Alive while the caller waits.
    waiting: Weak<()>,
    /// When it was queued: the batch's metrics report its oldest call's wait.
    queued_at: Instant,
}

/// The batcher is gone (the server is stopping) or a batch task panicked.
#[derive(Debug)]
pub struct Stopped;

impl From<Stopped> for AppError {
    fn from(_: Stopped) -> Self {
        AppError::internal("a write batch stopped before answering")
    }
}

/// Where one call of a batch stands while its runner decides.
pub enum Step {
    Open,
    /// Its idempotency key is being claimed by another transaction (or by an earlier call of
    /// the same batch): it must run alone, where its claim may wait.
    Busy,
    /// Its key already holds this result.
    Replay(i64),
    Refused(AppError),
    /// Accepted: the index of its row among the rows the batch writes.
    Done(usize),
}

/// The calls of `open` whose callers still wait; the others are marked refused (their callers
/// will never read it) so that nothing is written for them and their key claims are given
/// back.
pub fn left_in(open: &[usize], callers: &Callers, steps: &mut [Step]) -> Vec<usize> {
    open.iter()
        .copied()
        .filter(|&i| {
            let gone = callers.gone(i);
            if gone {
                steps[i] = Step::Refused(AppError::DeadlineExceeded);
            }
            !gone
        })
        .collect()
}

pub struct GroupCommit<C, A> {
    runner: Runner<C, A>,
    /// `None` when batching is off.
    queue: Option<mpsc::Sender<Queued<C, A>>>,
}

impl<C: Send + 'static, A: Send + 'static> GroupCommit<C, A> {
    /// A `batches.max` of 1 turns batching off. `name` names the batches' spans
    /// (`orders.place_batch`).
    pub fn start(name: &'static str, batches: WriteBatches, runner: Runner<C, A>) -> Self {
        let queue = (batches.max > 1).then(|| {
            let in_flight = batches.in_flight.max(1);
            let (queue, calls) = mpsc::channel(batches.max * in_flight * 4);
            tokio::spawn(batch_calls(
                name,
                WriteBatches {
                    in_flight,
                    ..batches
                },
                calls,
                runner.clone(),
            ));
            queue
        });
        Self { runner, queue }
    }

    /// Runs `call` in the next batch and returns its answer.
    pub async fn submit(&self, call: C) -> Result<A, Stopped> {
        let Some(queue) = &self.queue else {
            return self.alone(call).await;
        };
        let (reply, answer) = oneshot::channel();
        let waiting = Arc::new(());
        let queued = Queued {
            call,
            reply,
            span: tracing::Span::current(),
            waiting: Arc::downgrade(&waiting),
            queued_at: Instant::now(),
        };
        queue.send(queued).await.map_err(|_| Stopped)?;
        let answer = answer.await.map_err(|_| Stopped);
        drop(waiting);
        answer
    }

    /// Runs `call` by itself, in a task of its own (so that it finishes even if the caller goes).
    pub async fn alone(&self, call: C) -> Result<A, Stopped> {
        let runner = self.runner.clone();
        let waiting = Arc::new(());
        let callers = Callers(vec![Arc::downgrade(&waiting)]);
        let batch = tokio::spawn(
            async move { runner(vec![call], true, callers, Turn::default()).await }
                .in_current_span(),
        );
        let answers = batch.await.map_err(|_| Stopped);
        drop(waiting);
        let mut answers = answers?;
        answers.pop().ok_or(Stopped)
    }
}

async fn batch_calls<C: Send + 'static, A: Send + 'static>(
    name: &'static str,
    batches: WriteBatches,
    mut calls: mpsc::Receiver<Queued<C, A>>,
    runner: Runner<C, A>,
) {
    let slots = Arc::new(Semaphore::new(batches.in_flight));
    let turns = Arc::new(Semaphore::new(1));
    while let Some(first) = calls.recv().await {
        // Waiting for a slot and for the turn is what lets the next batch grow.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let turn = match tokio::time::timeout(batches.stall, turns.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Turn {
                permit: Some(permit),
                overlap_commit: batches.overlap_commit,
            },
            Ok(Err(_)) => return,
            // The batch holding the turn is stuck (a row lock held elsewhere): start beside it.
            Err(_) => Turn::default(),
        };
        let mut batch = vec![first];
        while batch.len() < batches.max {
            match calls.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let runner = runner.clone();
        tokio::spawn(async move {
            // Callers that have gone are dropped now, before anything is written for them.
            batch.retain(|q| !q.reply.is_closed());
            let Some(oldest) = batch.iter().map(|q| q.queued_at).min() else {
                return;
            };
            let (started, size) = (Instant::now(), batch.len());
            // A root of its own, linked to every caller's span: each call's trace leads to the
            // batch that did its Postgres work.
            let span = telemetry::batch(name, batch.iter().map(|q| &q.span));
            let callers = Callers(batch.iter().map(|q| q.waiting.clone()).collect());
            let (calls, waiting): (Vec<C>, Vec<_>) =
                batch.into_iter().map(|q| (q.call, q.reply)).unzip();
            let answers = runner(calls, false, callers, turn).instrument(span).await;
            for (reply, answer) in waiting.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
            drop(slot);
            metrics::write_batch(name, size, started - oldest, started.elapsed());
        });
    }
}

#[cfg(test)]
mod tests;
