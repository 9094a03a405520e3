//! Adapters to Postgres (the record of money, orders, payments and issued coupons) and Redis
//! (fast gates, rankings and caches that can always be rebuilt from Postgres).
//!
//! Driver errors are classified once, here: anything that means "the dependency cannot be
//! reached right now" becomes [`StoreError::Unavailable`], which callers see as UNAVAILABLE.

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
/// shutting down or restarting, lock contention resolved by aborting us.
fn postgres_unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 53: insufficient resources; 57P0x: shutdown or
            // recovery; 40001/40P01: serialization failure and deadlock, safe to retry.
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P0")
                || code == "40001"
                || code == "40P01"
        }),
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
