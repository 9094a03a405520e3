//! Postgres: the record. Every decision that moves money, stock or coupons is one transaction
//! whose writes are conditional (`... WHERE stock >= $n`), so a failed step leaves nothing.

pub mod balances;
pub mod carts;
pub mod coupon_recorder;
pub mod coupons;
pub mod idempotency;
pub mod job_lock;
pub mod orders;
pub mod outbox;
pub mod payments;
pub mod products;
pub mod refunds;
pub mod sales;

use std::time::Duration;

use sqlx::{
    PgPool, Postgres, Transaction,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::StoreError;
use crate::domain::{PageSize, PageToken};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A lazily connecting pool: the service starts (and reports NOT_SERVING) even when Postgres is
/// down, and every acquire gives up after `acquire_timeout` instead of queueing forever.
pub fn pool(options: PgConnectOptions, max_connections: u32, acquire_timeout: Duration) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(acquire_timeout)
        .idle_timeout(Some(Duration::from_secs(60)))
        .connect_lazy_with(
            options
                .application_name("ecommerce")
                // Statements are prepared once per connection and reused for its lifetime.
                // After five runs Postgres may settle on a generic plan, costed with the table
                // sizes of that moment and with default sizes for the batches' arrays: a plan
                // made while `orders` was small kept scanning it whole as it grew (a lone Pay
                // took 30 ms instead of 2 on a long-running server; new connections were fast).
                // A custom plan per execution sees the actual arrays and the table's current
                // size, for a fraction of a millisecond of planning per statement.
                .options([("plan_cache_mode", "force_custom_plan")]),
        )
}

/// Applies pending migrations. sqlx holds a Postgres advisory lock while migrating, so replicas
/// starting together apply each migration once.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Commits: the step where a call waits for its WAL flush, so it has a span of its own.
#[tracing::instrument(target = "otel", name = "postgres.commit", skip_all, fields(db.system = "postgresql"))]
pub async fn commit(tx: Transaction<'_, Postgres>) -> Result<(), StoreError> {
    tx.commit().await?;
    Ok(())
}

/// `SELECT 1`, for health checks.
pub async fn ping(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// Runs a purge `statement` whose `$1` is an age in seconds and `$2` the most rows it deletes;
/// returns how many it deleted.
async fn delete_older_than(
    db: impl sqlx::PgExecutor<'_>,
    statement: &'static str,
    age: Duration,
    limit: i64,
) -> Result<u64, StoreError> {
    let done = sqlx::query(statement)
        .bind(age.as_secs_f64())
        .bind(limit)
        .execute(db)
        .await?;
    Ok(done.rows_affected())
}

/// Keeps the first `page_size` rows of a `page_size + 1` query and says where the next page
/// starts, if there is one.
pub fn split_page<T>(
    rows: &mut Vec<T>,
    page_size: PageSize,
    key: impl Fn(&T) -> i64,
) -> Option<PageToken> {
    let size = page_size.get() as usize;
    if rows.len() > size {
        rows.truncate(size);
        rows.last().map(|last| PageToken::after(key(last)))
    } else {
        None
    }
}
