//! Adapters to Postgres (the record of money, orders, payments and issued coupons) and Redis
//! (fast gates, rankings and caches that can always be rebuilt from Postgres).
//!
//! Driver errors are classified once, here: anything that means "the dependency cannot be
//! reached right now" becomes [`StoreError::Unavailable`], which callers see as UNAVAILABLE.
//! That includes a Postgres that is no longer a writable primary (a failover demoted it, an
//! operator made it read-only, or the address now leads to a standby): such an answer also
//! has the pool check its older connections before their next use (`postgres::fence`), so no
//! call goes back to the old primary.
//! A connection lost while a write was being committed is [`StoreError::OutcomeUnknown`]: the
//! write may or may not be in the record, and only a keyed retry (or a read) can tell.

pub mod data_platform;
pub mod postgres;
pub mod redis;

/// An external system the service needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dependency {
    Postgres,
    Redis,
}

impl Dependency {
    pub fn name(self) -> &'static str {
        match self {
            Dependency::Postgres => "postgres",
            Dependency::Redis => "redis",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{} unavailable: {source}", .dependency.name())]
    Unavailable {
        dependency: Dependency,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The connection to Postgres was lost after a COMMIT (or a single-statement write) was
    /// sent and before its answer came back: the write may or may not have committed.
    #[error("postgres: the outcome of a commit is unknown: {0}")]
    OutcomeUnknown(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("postgres error: {0}")]
    Postgres(#[source] sqlx::Error),
    #[error("redis error: {0}")]
    Redis(#[source] fred::error::Error),
    /// Stored data that breaks an invariant the code relies on.
    #[error("inconsistent stored data: {0}")]
    Inconsistent(String),
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// The error of a statement that commits (COMMIT, or a write outside a transaction): a
    /// connection lost before its answer leaves the outcome unknown; anything else is what
    /// [`From<sqlx::Error>`] says.
    pub fn from_commit(error: sqlx::Error) -> Self {
        if connection_lost(&error) {
            StoreError::OutcomeUnknown(Box::new(error))
        } else {
            error.into()
        }
    }

    /// The constraint a Postgres statement violated, if that is what failed.
    pub fn violated_constraint(&self) -> Option<&str> {
        match self {
            StoreError::Postgres(e) => e.as_database_error()?.constraint(),
            _ => None,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        // A lost connection raises it too: its pooled siblings may be as dead (a restart, a
        // failover), and the pool no longer pings a connection before handing it out.
        if not_a_writable_primary(&error) || connection_lost(&error) {
            postgres::fence::raise();
        }
        if postgres_unreachable(&error) {
            StoreError::Unavailable {
                dependency: Dependency::Postgres,
                source: Box::new(error),
            }
        } else {
            StoreError::Postgres(error)
        }
    }
}

/// Errors that a retry a moment later may not see: lost connections, a full pool, a server
/// shutting down, restarting or no longer the primary, lock contention resolved by aborting us.
fn postgres_unreachable(error: &sqlx::Error) -> bool {
    let retryable = match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 53: insufficient resources; 40001/40P01: serialization failure and deadlock,
            // safe to retry.
            code.starts_with("53") || code == "40001" || code == "40P01"
        }),
        _ => false,
    };
    retryable || connection_lost(error) || not_a_writable_primary(error)
}

/// The connection itself failed: cut, closed by a server shutting down (57P01 admin shutdown,
/// 57P02 crash shutdown, 57P03 cannot connect now, e.g. "the database system is in recovery
/// mode"), or broken (08: connection exception). Whatever was in flight on it has an outcome
/// the client did not hear.
fn connection_lost(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P0")),
        _ => false,
    }
}

/// The server answered, but it is not (or no longer) a primary that takes writes: 25006
/// (read-only transaction: a standby, or `default_transaction_read_only` set by an operator
/// before a switchover), or one of the shutdown and recovery answers 57P0x.
fn not_a_writable_primary(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code == "25006" || code.starts_with("57P0")),
        _ => false,
    }
}

impl From<fred::error::Error> for StoreError {
    fn from(error: fred::error::Error) -> Self {
        use fred::error::ErrorKind;
        match error.kind() {
            ErrorKind::IO
            | ErrorKind::Timeout
            | ErrorKind::Canceled
            | ErrorKind::Backpressure
            | ErrorKind::Routing
            | ErrorKind::Cluster => StoreError::Unavailable {
                dependency: Dependency::Redis,
                source: Box::new(error),
            },
            _ if redis_loading(&error) => StoreError::Unavailable {
                dependency: Dependency::Redis,
                source: Box::new(error),
            },
            _ => StoreError::Redis(error),
        }
    }
}

/// A Redis that is starting up or failing over answers LOADING / MASTERDOWN / CLUSTERDOWN /
/// TRYAGAIN: it will serve again soon.
fn redis_loading(error: &fred::error::Error) -> bool {
    let details = error.details();
    [
        "LOADING",
        "MASTERDOWN",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "READONLY",
    ]
    .iter()
    .any(|prefix| details.starts_with(prefix))
}
