//! Scheduled jobs (tokio-cron-scheduler). Each job runs on one replica at a time: a run first
//! takes a transaction-scoped Postgres advisory lock named after the job ([`lock`]) and skips
//! its turn if another replica holds it. Within a replica a run never overlaps the previous one.
//!
//! The scheduler ticks every second (a cron schedule) and each job runs once its interval has
//! passed since its last start. Not the scheduler's "repeated" jobs: those compute the next
//! tick from the previous one, so a scheduler delayed by more than one interval (a starved
//! runtime) never runs the job again.
//!
//! A run holds a pooled connection for its lock and usually one more for its work, so a replica
//! runs at most `(DATABASE_MAX_CONNECTIONS - 1) / 2` jobs at once (at least one): the others
//! wait their turn, and the jobs never take the whole pool from the calls (five jobs starting
//! together on a test's five connections would otherwise each hold a lock and wait for a second
//! connection until the acquire timeout).
//!
//! Stopping waits for the runs in progress, so a job never stops halfway through a batch.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use tokio::{sync::Semaphore, time::Instant};

use anyhow::Context as _;
use sqlx::PgPool;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    app::{Coupons, Orders, Outbox, Popular, Retention},
    config::Config,
    error::AppError,
};

mod lock;

pub use lock::{Exclusive, exclusive};

/// How often a running job checks that its lock's connection is still alive.
const LOCK_CHECK: Duration = Duration::from_millis(500);

/// The least time between two outbox runs that payments rang for.
const NUDGE_PAUSE: Duration = Duration::from_millis(20);

/// The services the jobs run.
pub struct JobServices {
    pub coupons: Arc<Coupons>,
    pub orders: Arc<Orders>,
    pub outbox: Arc<Outbox>,
    pub popular: Arc<Popular>,
    pub retention: Arc<Retention>,
}

/// The scheduler's tick (seconds, minutes, hours, days, months, weekdays).
const EVERY_SECOND: &str = "* * * * * *";
/// Ticks come every second give or take the scheduler's half-second polling: a job is due a
/// little before its interval has fully passed, so a 1 s job runs on every tick.
const TICK_SLACK: Duration = Duration::from_millis(600);

/// Advisory lock ids: one per job, the same on every replica.
#[derive(Clone, Copy, Debug)]
enum JobLock {
    CouponReconcile = 0x6563_0001,
    OrderExpiry = 0x6563_0002,
    OutboxDelivery = 0x6563_0003,
    RankingReconcile = 0x6563_0004,
    RetentionPurge = 0x6563_0005,
}

pub struct Jobs {
    scheduler: JobScheduler,
    tracker: TaskTracker,
    stopping: CancellationToken,
    /// Runs at once in this replica.
    slots: Arc<Semaphore>,
}

impl Jobs {
    pub async fn start(pg: PgPool, services: JobServices, config: &Config) -> anyhow::Result<Self> {
        let JobServices {
            coupons,
            orders,
            outbox,
            popular,
            retention,
        } = services;
        let scheduler = JobScheduler::new()
            .await
            .context("creating the scheduler")?;
        let pool = config.postgres.max_connections as usize;
        let jobs = Self {
            scheduler,
            tracker: TaskTracker::new(),
            stopping: CancellationToken::new(),
            slots: Arc::new(Semaphore::new((pool.saturating_sub(1) / 2).max(1))),
        };
        let grace = config.coupons.orphan_grace;
        jobs.every(
            "coupon-reconcile",
            config.coupons.reconcile_interval,
            JobLock::CouponReconcile,
            pg.clone(),
            move || {
                let coupons = coupons.clone();
                async move {
                    let report = coupons.reconcile(grace).await?;
                    if !report.repaired.is_empty() {
                        tracing::warn!(repaired = ?report.repaired, "coupon gates repaired");
                    }
                    Ok(())
                }
            },
        )
        .await?;
        jobs.every(
            "order-expiry",
            config.orders.expiry_interval,
            JobLock::OrderExpiry,
            pg.clone(),
            move || {
                let orders = orders.clone();
                async move {
                    let expired = orders.expire_overdue().await?;
                    if expired > 0 {
                        tracing::info!(expired, "overdue orders expired");
                    }
                    Ok(())
                }
            },
        )
        .await?;
        let outbox_runner = jobs
            .every(
                "outbox-delivery",
                config.outbox.interval,
                JobLock::OutboxDelivery,
                pg.clone(),
                {
                    let outbox = outbox.clone();
                    move || {
                        let outbox = outbox.clone();
                        async move {
                            let report = outbox.deliver().await?;
                            if report.delivered > 0 {
                                tracing::debug!(delivered = report.delivered, "outbox delivered");
                            }
                            Ok(())
                        }
                    }
                },
            )
            .await?;
        // A payment nudges the outbox so its event leaves at once instead of at the next tick.
        jobs.tracker.spawn({
            let (runner, stopping) = (outbox_runner, jobs.stopping.clone());
            async move {
                loop {
                    tokio::select! {
                        _ = stopping.cancelled() => return,
                        _ = outbox.nudged() => runner.run().await,
                    }
                    // A lone payment's event leaves at once, but under load every commit
                    // rings: the pause lets the events of many commits leave in one run
                    // (one job lock, one claim, one backlog count: about eight round trips
                    // to Postgres) instead of a run per handful of events.
                    tokio::select! {
                        _ = stopping.cancelled() => return,
                        _ = tokio::time::sleep(NUDGE_PAUSE) => {}
                    }
                }
            }
        });
        let ranking = jobs
            .every(
                "ranking-reconcile",
                config.ranking.reconcile_interval,
                JobLock::RankingReconcile,
                pg.clone(),
                move || {
                    let popular = popular.clone();
                    async move {
                        let days = popular.reconcile().await?;
                        tracing::debug!(days, "ranking rebuilt from Postgres");
                        Ok(())
                    }
                },
            )
            .await?;
        jobs.every(
            "retention-purge",
            config.retention.purge_interval,
            JobLock::RetentionPurge,
            pg.clone(),
            move || {
                let retention = retention.clone();
                async move {
                    let purged = retention.purge().await?;
                    if purged != Default::default() {
                        tracing::info!(?purged, "expired rows purged");
                    }
                    Ok(())
                }
            },
        )
        .await?;
        // Once at start-up too, so a Redis that restarted empty is refilled right away.
        jobs.tracker.spawn(async move { ranking.run().await });
        jobs.scheduler
            .start()
            .await
            .context("starting the scheduler")?;
        Ok(jobs)
    }

    /// Schedules `run` every `interval`, one replica at a time, and returns a handle that runs
    /// it on demand under the same guards.
    async fn every<F, Fut>(
        &self,
        name: &'static str,
        interval: Duration,
        lock: JobLock,
        pg: PgPool,
        run: F,
    ) -> anyhow::Result<Runner>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AppError>> + Send + 'static,
    {
        let runner = Runner {
            name,
            lock,
            pg,
            run: Arc::new(move || Box::pin(run())),
            running: Arc::new(tokio::sync::Mutex::new(None)),
            stopping: self.stopping.clone(),
            slots: self.slots.clone(),
        };
        let tracker = self.tracker.clone();
        let job = Job::new_async(EVERY_SECOND, {
            let runner = runner.clone();
            move |_, _| {
                let runner = runner.clone();
                Box::pin(tracker.track_future(async move { runner.tick(interval).await }))
            }
        })
        .with_context(|| format!("creating job {name}"))?;
        self.scheduler
            .add(job)
            .await
            .with_context(|| format!("scheduling job {name}"))?;
        Ok(runner)
    }

    /// Stops scheduling and waits for the runs in progress.
    pub async fn stop(mut self) {
        self.stopping.cancel();
        if let Err(e) = self.scheduler.shutdown().await {
            tracing::warn!(error = %e, "scheduler shutdown");
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}

type JobFn = dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), AppError>> + Send>> + Send + Sync;

/// One job with its guards: never two runs at once in this process, never two replicas at once.
#[derive(Clone)]
struct Runner {
    name: &'static str,
    lock: JobLock,
    pg: PgPool,
    run: Arc<JobFn>,
    /// Held for a run; holds when the last run started.
    running: Arc<tokio::sync::Mutex<Option<Instant>>>,
    stopping: CancellationToken,
    slots: Arc<Semaphore>,
}

impl Runner {
    /// A scheduler tick: runs the job if `interval` has passed since its last start.
    async fn tick(&self, interval: Duration) {
        let due = match self.running.try_lock() {
            Ok(last) => last.is_none_or(|at| at.elapsed() + TICK_SLACK >= interval),
            Err(_) => false,
        };
        if due {
            self.run().await;
        }
    }

    async fn run(&self) {
        if self.stopping.is_cancelled() {
            return;
        }
        let Ok(mut last) = self.running.try_lock() else {
            tracing::debug!(job = self.name, "previous run still in progress: skipping");
            return;
        };
        let _slot = tokio::select! {
            slot = self.slots.acquire() => slot,
            _ = self.stopping.cancelled() => return,
        };
        *last = Some(Instant::now());
        match exclusive(
            &self.pg,
            self.lock as i64,
            self.name,
            LOCK_CHECK,
            (self.run)(),
        )
        .await
        {
            Ok(Exclusive::Ran(Ok(()))) | Ok(Exclusive::Panicked | Exclusive::LockLost) => {}
            Ok(Exclusive::Busy) => {
                tracing::debug!(job = self.name, "another replica holds the job")
            }
            Ok(Exclusive::Ran(Err(e))) => {
                tracing::warn!(job = self.name, error = %e, "job run failed")
            }
            Err(e) => tracing::warn!(job = self.name, error = %e, "job lock unavailable"),
        }
    }
}
