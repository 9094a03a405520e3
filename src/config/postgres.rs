//! The Postgres section: the primary, the standbys the catalog may read from, the pool.

use std::{fmt, str::FromStr, time::Duration};

use sqlx::postgres::PgConnectOptions;

use super::{reader::Reader, variables as v, variables::Variable};

/// Postgres connection options, which may hold a password: `Debug` shows only where they point.
#[derive(Clone)]
pub struct Database(pub PgConnectOptions);

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.0.get_host(),
            self.0.get_port(),
            self.0.get_database().unwrap_or("")
        )
    }
}

#[derive(Clone, Debug)]
pub struct PostgresSettings {
    /// The primary: every write, and every read that must be fresh.
    pub database: Database,
    /// A standby the catalog may read from, and how far behind it may be.
    pub read: Option<(Database, Duration)>,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// Apply migrations at start-up (under sqlx's advisory lock, so replicas may race safely).
    pub run_migrations: bool,
}

/// `url` as connection options, or an error on `variable`.
fn parse(r: &mut Reader<'_>, variable: &Variable, url: &str) -> Option<Database> {
    match PgConnectOptions::from_str(url) {
        Ok(options) => Some(Database(options)),
        Err(e) => {
            r.error(variable, format!("not a Postgres URL ({e})"));
            None
        }
    }
}

pub(super) fn read(r: &mut Reader<'_>) -> PostgresSettings {
    let url = r.text(&v::DATABASE_URL);
    let database =
        parse(r, &v::DATABASE_URL, &url).unwrap_or_else(|| Database(PgConnectOptions::new()));
    let read_max_lag = r.duration(&v::READ_MAX_LAG_MS);
    let read = r
        .set(&v::DATABASE_READ_URL)
        .filter(|url| !url.is_empty())
        .and_then(|url| parse(r, &v::DATABASE_READ_URL, &url))
        .map(|standby| (standby, read_max_lag));
    PostgresSettings {
        database,
        read,
        max_connections: r.integer(&v::DATABASE_MAX_CONNECTIONS),
        acquire_timeout: r.duration(&v::DATABASE_ACQUIRE_TIMEOUT_MS),
        run_migrations: r.parsed(&v::RUN_MIGRATIONS),
    }
}
