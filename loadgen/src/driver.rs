//! Runs the workers until the budget is spent: a number of units of work, a deadline, or both
//! (whichever comes first). The only state shared while running is one atomic counter that
//! hands out unit numbers; the progress bar reads it from its own task.
//!
//! The deadline is counted from the end of the warm-up, so `--duration 10s --warmup 2s` measures
//! ten seconds. A unit of work already started when the budget runs out is finished, so every
//! call made is recorded.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use super::{
    stats::Recorder,
    timeline::{SharedTimeline, Timeline},
    worker::Worker,
};

/// How often the progress bar is redrawn.
const PROGRESS_TICK: Duration = Duration::from_millis(100);

/// Hands out unit-of-work numbers until the limit or the deadline.
pub struct Budget {
    next: AtomicU64,
    limit: u64,
    deadline: Option<Instant>,
}

impl Budget {
    pub fn new(limit: Option<u64>, deadline: Option<Instant>) -> Self {
        Self {
            next: AtomicU64::new(0),
            limit: limit.unwrap_or(u64::MAX),
            deadline,
        }
    }

    /// The next unit's number, or `None` when the run is over.
    pub fn take(&self) -> Option<u64> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        // Relaxed: the counter only has to hand out distinct numbers.
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (n < self.limit).then_some(n)
    }

    /// Units handed out so far.
    pub fn taken(&self) -> u64 {
        self.next.load(Ordering::Relaxed).min(self.limit)
    }
}

pub struct Driven {
    pub workers: Vec<Worker>,
    pub recorder: Recorder,
    /// The measured calls second by second.
    pub timeline: Timeline,
    /// From the end of the warm-up to the end of the last call.
    pub measured: Duration,
    /// Where that span starts on the wall clock; it ends `measured` later, read on the
    /// monotonic clock (a thread descheduled between two wall-clock readings on a loaded
    /// machine cannot stretch the span, nor can a clock step).
    pub measured_from: SystemTime,
    pub units: u64,
}

pub async fn drive(
    workers: Vec<Worker>,
    requests: Option<u64>,
    duration: Option<Duration>,
    warmup: Duration,
    progress: bool,
) -> anyhow::Result<Driven> {
    let started = Instant::now();
    let started_at = SystemTime::now();
    let measure_from = started + warmup;
    let budget = Arc::new(Budget::new(requests, duration.map(|d| measure_from + d)));
    let bar = progress.then(|| progress_bar(requests, duration.map(|d| d + warmup)));
    let ticker = bar.clone().map(|bar| {
        let budget = budget.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROGRESS_TICK);
            loop {
                tick.tick().await;
                let units = budget.taken();
                let elapsed = started.elapsed();
                let rate = units as f64 / elapsed.as_secs_f64().max(1e-3);
                if requests.is_some() {
                    bar.set_position(units);
                    bar.set_message(format!("{rate:.0}/s"));
                } else {
                    bar.set_position(elapsed.as_millis() as u64);
                    bar.set_message(format!("{units} units of work, {rate:.0}/s"));
                }
            }
        })
    });

    let timeline = SharedTimeline::default();
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|mut worker| {
            let budget = budget.clone();
            let timeline = timeline.clone();
            tokio::spawn(async move {
                let mut recorder = Recorder::with_timeline(measure_from, timeline);
                while let Some(n) = budget.take() {
                    worker.step(n, &mut recorder).await;
                }
                recorder.flush_timeline();
                (worker, recorder)
            })
        })
        .collect();
    let mut workers = Vec::with_capacity(tasks.len());
    let mut recorder = Recorder::new(measure_from);
    for task in tasks {
        let (worker, theirs) = task.await.context("a worker panicked")?;
        recorder.merge(&theirs);
        workers.push(worker);
    }
    let finished = Instant::now();
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(Driven {
        workers,
        recorder,
        timeline: timeline.take(),
        measured: finished.saturating_duration_since(measure_from),
        measured_from: started_at + warmup,
        units: budget.taken(),
    })
}

/// A bar over units of work when their number is known, else over time.
fn progress_bar(requests: Option<u64>, total_time: Option<Duration>) -> ProgressBar {
    let (length, template) = match (requests, total_time) {
        (Some(n), _) => (
            n,
            "{elapsed_precise} [{wide_bar}] {human_pos}/{human_len} {msg}, eta {eta}",
        ),
        (None, Some(t)) => (t.as_millis() as u64, "{elapsed_precise} [{wide_bar}] {msg}"),
        (None, None) => (0, "{elapsed_precise} {msg}"),
    };
    let bar = ProgressBar::new(length);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_hands_out_each_number_once_up_to_the_limit() {
        let budget = Budget::new(Some(3), None);
        let taken: Vec<Option<u64>> = (0..5).map(|_| budget.take()).collect();
        assert_eq!(taken, vec![Some(0), Some(1), Some(2), None, None]);
        assert_eq!(budget.taken(), 3);
    }

    #[test]
    fn the_budget_ends_at_the_deadline() {
        let budget = Budget::new(None, Some(Instant::now()));
        assert_eq!(budget.take(), None);
        let open = Budget::new(None, Some(Instant::now() + Duration::from_secs(60)));
        assert_eq!(open.take(), Some(0));
    }
}
