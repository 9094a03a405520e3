//! Running a job body under its replica-wide lock.
//!
//! Invariant: the body runs only while this replica holds the job's lock, and the lock is
//! released however the body ends: returning, failing, panicking or being cancelled. The lock
//! is transaction-scoped (`store::postgres::job_lock`); while the body runs, the lease's
//! connection is checked every `check_every`, and a body whose lock is gone (its connection
//! died, so another replica may take the job) is dropped at its next await. The bodies are
//! written for that: their transactions roll back, the outbox delivers at least once, the
//! ranking and coupon rebuilds swap in whole results only.

use std::{future::Future, panic::AssertUnwindSafe, time::Duration};

use futures::FutureExt as _;
use sqlx::PgPool;

use crate::store::{StoreError, postgres::job_lock};

/// How one attempt to run a job ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exclusive<T> {
    /// The body ran to its end under the lock.
    Ran(T),
    /// Another replica holds the lock: the body did not start.
    Busy,
    /// The body panicked; the lock was released and the panic logged.
    Panicked,
    /// The lock's connection died while the body ran; the body was dropped at its next await.
    LockLost,
}

/// Runs `work` if this replica can take the advisory lock `id`, releasing it afterwards.
/// Errors only when the lock cannot be asked for (Postgres unreachable).
pub async fn exclusive<T>(
    pg: &PgPool,
    id: i64,
    name: &str,
    check_every: Duration,
    work: impl Future<Output = T>,
) -> Result<Exclusive<T>, StoreError> {
    let Some(mut lease) = job_lock::try_acquire(pg, id).await? else {
        return Ok(Exclusive::Busy);
    };
    let outcome = {
        let work = AssertUnwindSafe(work).catch_unwind();
        tokio::pin!(work);
        let lost = async {
            loop {
                tokio::time::sleep(check_every).await;
                if let Err(e) = lease.check().await {
                    return e;
                }
            }
        };
        tokio::select! {
            result = &mut work => match result {
                Ok(value) => Exclusive::Ran(value),
                Err(panic) => {
                    tracing::error!(job = name, panic = panic_message(&*panic),
                        "job panicked; its lock is released");
                    Exclusive::Panicked
                }
            },
            error = lost => {
                tracing::error!(job = name, error = %error,
                    "job lock lost (its connection failed); run abandoned");
                Exclusive::LockLost
            }
        }
    };
    if !matches!(outcome, Exclusive::LockLost)
        && let Err(e) = lease.release().await
    {
        // The transaction ends with its connection anyway, and the pool discards it.
        tracing::warn!(job = name, error = %e, "releasing the job lock failed");
    }
    Ok(outcome)
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}
