//! Postgres: the record. Every decision that moves money, stock or coupons is one transaction
//! whose writes are conditional (`... WHERE stock >= $n`), so a failed step leaves nothing.

pub mod balances;
pub mod carts;
pub mod charge_batch;
pub mod close_batch;
pub mod coupon_admin;
pub mod coupons;
pub mod fence;
pub mod idempotency;
pub mod job_lock;
pub mod order_pages;
pub mod orders;
pub mod outbox;
pub mod pay_batch;
pub mod payments;
pub mod place_batch;
pub mod products;
pub mod refunds;
pub mod replica;
pub mod sales;

use std::time::Duration;

use sqlx::{
    Connection as _, PgConnection, PgPool, Postgres, Transaction,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::StoreError;
use crate::domain::{PageSize, PageToken};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A lazily connecting pool to the primary: the service starts (and reports NOT_SERVING) even
/// when Postgres is down, and every acquire gives up after `acquire_timeout` instead of
/// queueing forever.
///
/// A connection is only ever to a primary: one that lands on a standby (a DNS name or a
/// pooler that still leads to a demoted server) is closed at once and the pool tries again
/// until `acquire_timeout`, so money is never read from a server that may lag; and a
/// connection opened before the [`fence`] last rose is used again only if its server still
/// takes writes.
///
/// No ping before each acquire: sqlx already pings every connection as it goes back to the
/// pool, so the one before use only caught a server lost while the connection sat idle, and
/// cost every transaction a round trip (a batch's BEGIN, two statements and COMMIT were five).
/// A connection lost while idle fails its first statement, which raises the fence: the
/// connections older than that loss are then checked before use, as after a failover.
pub fn pool(options: PgConnectOptions, max_connections: u32, acquire_timeout: Duration) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(acquire_timeout)
        .idle_timeout(Some(Duration::from_secs(60)))
        .test_before_acquire(false)
        .after_connect(|conn, _| {
            Box::pin(async move {
                let standby: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
                    .fetch_one(&mut *conn)
                    .await?;
                if standby {
                    return Err(sqlx::Error::Protocol(
                        "DATABASE_URL leads to a standby, not the primary".into(),
                    ));
                }
                Ok(())
            })
        })
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if !fence::suspects(meta.age) {
                    return Ok(true);
                }
                takes_writes(conn).await
            })
        })
        .connect_lazy_with(session(options, "ecommerce"))
}

/// The options every connection of the service uses.
pub(super) fn session(options: PgConnectOptions, application_name: &str) -> PgConnectOptions {
    options
        .application_name(application_name)
        // Statements are prepared once per connection and reused for its lifetime.
        // After five runs Postgres may settle on a generic plan, costed with the table
        // sizes of that moment and with default sizes for the batches' arrays: a plan
        // made while `orders` was small kept scanning it whole as it grew (a lone Pay
        // took 30 ms instead of 2 on a long-running server; new connections were fast).
        // A custom plan per execution sees the actual arrays and the table's current
        // size, for a fraction of a millisecond of planning per statement. The write
        // batches, whose statements are all key lookups, plan once instead (`begin_batch`).
        .options([("plan_cache_mode", "force_custom_plan")])
}

/// Begins the transaction of a write path's batch (PlaceOrder, Checkout, Pay, cancel, expiry, a
/// lone ChargeBalance), whose statements are planned once per connection instead of once per
/// execution, with the plan's shape fixed by its settings rather than by the statistics of the
/// moment it was made.
///
/// Planning each execution (the pool's `force_custom_plan`, see [`session`]) cost Postgres as much
/// CPU as running the statements on a hot product (docs/BENCHMARKS.md). A generic plan is made
/// without the batch's arrays and kept until a table's statistics change, so it must be right at
/// any batch size and table size: every statement of these transactions finds its rows by key (the
/// batch's ids, unnested or `= ANY`, or a partial index's predicate), so index probes in nested
/// loops are the right plan at every size, and the transaction allows only those: no sequential
/// scan, hash or merge join can be chosen while a table is small and kept as it grows
/// (`tests/it/batch_plans.rs` checks it). ChargeBalance's batches are left planned per execution
/// ([`begin_keyed`]): cheap statements in large batches, they cost more with nested loops only than
/// their planning did. The settings are `LOCAL`: they end with the transaction (rolled back too),
/// and they ride on BEGIN's own message, so they cost no round trip.
pub async fn begin_batch(pg: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    pg.begin_with(
        "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; \
         SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; \
         SET LOCAL enable_mergejoin = off",
    )
    .await
}

/// Begins the transaction of a ChargeBalance batch: planned per execution (see
/// [`begin_batch`] for why not once), but with sequential scans off. A custom plan is costed
/// with the statistics of the table's last ANALYZE, and a table grown a lot since looks as
/// small as it was: with the scan allowed, the batch's balances were read whole instead of by
/// key (`tests/it/batch_plans.rs`). Hash joins stay allowed, so a large batch's arrays are still
/// joined in one pass.
pub async fn begin_keyed(pg: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    pg.begin_with("BEGIN; SET LOCAL enable_seqscan = off").await
}

/// Applies pending migrations. sqlx holds a Postgres advisory lock while migrating, so replicas
/// starting together apply each migration once.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Commits: the step where a call waits for its WAL flush (and, with synchronous replication,
/// for a standby to have it), so it has a span of its own. A connection lost before the answer
/// is [`StoreError::OutcomeUnknown`].
#[tracing::instrument(target = "otel", name = "postgres.commit", skip_all, fields(db.system = "postgresql"))]
pub async fn commit(tx: Transaction<'_, Postgres>) -> Result<(), StoreError> {
    tx.commit().await.map_err(StoreError::from_commit)
}

/// Whether the server behind `conn` takes writes: a primary, not made read-only.
async fn takes_writes(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let read_only: bool = sqlx::query_scalar(
        "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::bool",
    )
    .fetch_one(conn)
    .await?;
    Ok(!read_only)
}

/// The readiness probe's own connection to the primary, apart from the pool: a pool busy with
/// calls (every connection held while a failover makes commits wait) is load, not an outage,
/// and must not turn readiness off and on.
pub struct Probe {
    options: PgConnectOptions,
    connection: Option<PgConnection>,
}

impl Probe {
    pub fn new(options: PgConnectOptions) -> Self {
        Self {
            options: session(options, "ecommerce-health"),
            connection: None,
        }
    }

    /// Ok when the server answers as a primary that takes writes: not a standby, not made
    /// read-only. Any failure drops the connection, so the next probe connects afresh (to
    /// wherever the address leads then). Cancel-safe: a probe dropped mid-query leaves no
    /// connection behind.
    pub async fn writable(&mut self) -> Result<(), StoreError> {
        let mut connection = match self.connection.take() {
            Some(connection) => connection,
            None => PgConnection::connect_with(&self.options).await?,
        };
        if !takes_writes(&mut connection).await? {
            // A read-only server may be a demoted one that the address no longer leads to.
            let _ = connection.close().await;
            return Err(StoreError::Unavailable {
                dependency: super::Dependency::Postgres,
                source: "the database takes no writes (a standby, or read-only)".into(),
            });
        }
        self.connection = Some(connection);
        Ok(())
    }
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
