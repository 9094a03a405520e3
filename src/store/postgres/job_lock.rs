//! Job locks: a transaction-scoped Postgres advisory lock per scheduled job, so one replica runs
//! it at a time.
//!
//! Invariant: the lock lives exactly as long as the lease's transaction. Ending the transaction
//! (commit, rollback, a dropped lease whose rollback the pool flushes, or Postgres losing the
//! connection) releases it; no pooled connection is ever handed back still holding a lock, which
//! a session-level lock would allow.

use sqlx::{PgPool, Postgres, Transaction};

use crate::store::StoreError;

/// A held job lock: an open transaction on a connection of its own.
pub struct JobLease {
    tx: Transaction<'static, Postgres>,
}

/// Takes the advisory lock `id` in a new transaction if no one holds it; `None` when another
/// session does.
pub async fn try_acquire(pg: &PgPool, id: i64) -> Result<Option<JobLease>, StoreError> {
    let mut tx = pg.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    Ok(locked.then_some(JobLease { tx }))
}

impl JobLease {
    /// Fails once the lease's connection is gone, and with it the lock.
    pub async fn check(&mut self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&mut *self.tx).await?;
        Ok(())
    }

    /// Ends the transaction, releasing the lock.
    pub async fn release(self) -> Result<(), StoreError> {
        self.tx.rollback().await?;
        Ok(())
    }
}
