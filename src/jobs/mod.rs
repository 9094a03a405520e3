//! Scheduled jobs (tokio-cron-scheduler). Each job runs on one replica at a time: a run first
//! takes a Postgres advisory lock named after the job and skips its turn if another replica
//! holds it. Within a replica a run never overlaps the previous one.
//!
//! Stopping waits for the runs in progress, so a job never stops halfway through a batch.

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context as _;
use sqlx::PgPool;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{app::App, config::Config, error::AppError};

/// Advisory lock ids: one per job, the same on every replica.
#[derive(Clone, Copy, Debug)]
enum JobLock {
    CouponReconcile = 0x6563_0001,
}

pub struct Jobs {
    scheduler: JobScheduler,
    tracker: TaskTracker,
    stopping: CancellationToken,
}

impl Jobs {
    pub async fn start(app: App, config: &Config) -> anyhow::Result<Self> {
        let scheduler = JobScheduler::new()
            .await
            .context("creating the scheduler")?;
        let jobs = Self {
            scheduler,
            tracker: TaskTracker::new(),
            stopping: CancellationToken::new(),
        };
        let grace = config.coupon_orphan_grace;
        jobs.every(
            "coupon-reconcile",
            config.coupon_reconcile_interval,
            JobLock::CouponReconcile,
            app.clone(),
            move |app| async move {
                let report = app.reconcile_coupon_gates(grace).await?;
                if !report.repaired.is_empty() {
                    tracing::warn!(repaired = ?report.repaired, "coupon gates repaired");
                }
                Ok(())
            },
        )
        .await?;
        jobs.scheduler
            .start()
            .await
            .context("starting the scheduler")?;
        Ok(jobs)
    }

    async fn every<F, Fut>(
        &self,
        name: &'static str,
        interval: Duration,
        lock: JobLock,
        app: App,
        run: F,
    ) -> anyhow::Result<()>
    where
        F: Fn(App) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AppError>> + Send + 'static,
    {
        let run = Arc::new(run);
        let running = Arc::new(tokio::sync::Mutex::new(()));
        let tracker = self.tracker.clone();
        let stopping = self.stopping.clone();
        let job = Job::new_repeated_async(interval, move |_, _| {
            let (app, run, running, stopping) =
                (app.clone(), run.clone(), running.clone(), stopping.clone());
            Box::pin(tracker.track_future(async move {
                if stopping.is_cancelled() {
                    return;
                }
                let Ok(_guard) = running.try_lock() else {
                    tracing::debug!(job = name, "previous run still in progress: skipping");
                    return;
                };
                let pg = app.pg().clone();
                match singleton(&pg, lock, run(app)).await {
                    Ok(Some(())) => {}
                    Ok(None) => tracing::debug!(job = name, "another replica holds the job"),
                    Err(e) => tracing::warn!(job = name, error = %e, "job run failed"),
                }
            }))
        })
        .with_context(|| format!("creating job {name}"))?;
        self.scheduler
            .add(job)
            .await
            .with_context(|| format!("scheduling job {name}"))?;
        Ok(())
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

/// Runs `work` only if this replica gets the job's advisory lock; `None` when it did not.
/// The lock is held by one pooled connection for the run and released on it afterwards (or by
/// Postgres, if the connection dies).
async fn singleton<T>(
    pg: &PgPool,
    lock: JobLock,
    work: impl Future<Output = Result<T, AppError>>,
) -> Result<Option<T>, AppError> {
    let mut conn = pg.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(lock as i64)
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        return Ok(None);
    }
    let result = work.await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(lock as i64)
        .execute(&mut *conn)
        .await;
    result.map(Some)
}
