//! Configuration: every setting comes from one environment variable, is parsed and validated
//! once at start-up, and every problem is reported at once so an operator fixes them in one go.
//!
//! The README's configuration table lists the same variables; keep the two in step.

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

use chrono_tz::Tz;
use sqlx::postgres::PgConnectOptions;

use crate::domain::Won;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err("expected `text` or `json`".into()),
        }
    }
}

/// Where the outbox job delivers payment events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkKind {
    /// One structured log line per event (local runs).
    Log,
    /// POST a JSON batch to this URL.
    Http(String),
}

/// TLS for the gRPC listener: the server's certificate chain and key (PEM), and optionally a
/// CA whose client certificates are then required (mTLS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: Option<std::path::PathBuf>,
}

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Everything the service needs to start. Built by [`Config::from_env`] in production and by
/// the test harness directly.
#[derive(Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub database: PgConnectOptions,
    pub database_max_connections: u32,
    pub database_acquire_timeout: Duration,
    /// Apply migrations at start-up (under sqlx's advisory lock, so replicas may race safely).
    pub run_migrations: bool,
    pub redis_url: String,
    pub redis_pool_size: usize,
    pub redis_command_timeout: Duration,
    /// Prepended to every Redis key. Never contains `{` or `}` so hash tags stay ours.
    pub redis_key_prefix: String,
    pub admin_token: Secret,
    pub log_format: LogFormat,
    pub log_filter: String,
    /// A charge that would take a balance past this is refused with OUT_OF_RANGE.
    pub max_balance: Won,
    pub order_ttl: Duration,
    pub health_check_interval: Duration,
    /// Liveness turns NOT_SERVING when the runtime has not run its heartbeat task for this long.
    pub liveness_stall: Duration,
    pub coupon_reconcile_interval: Duration,
    /// A coupon win with no row for this long is an orphan (its insert never ran), not an
    /// insert in flight: the next call of that user, or the reconciliation job, releases it.
    /// Inserts are given at most half of it.
    pub coupon_orphan_grace: Duration,
    pub order_expiry_interval: Duration,
    pub outbox_interval: Duration,
    pub outbox_batch_size: u32,
    pub outbox_max_attempts: u32,
    pub outbox_retry_base: Duration,
    pub outbox_retry_max: Duration,
    pub data_platform_sink: SinkKind,
    pub data_platform_timeout: Duration,
    pub ranking_reconcile_interval: Duration,
    pub ranking_timezone: Tz,
    pub ranking_retention_days: u32,
    pub popular_cache_ttl: Duration,
    pub sold_out_marker_ttl: Duration,
    /// After SIGTERM, keep serving this long (health already NOT_SERVING) before draining.
    pub shutdown_drain: Duration,
    /// Requests larger than this are refused before they are decoded.
    pub max_message_bytes: usize,
    /// Create a small demo catalog at start-up when the catalog is empty.
    pub seed_demo_data: bool,
    /// Where `/metrics` is served (Prometheus text format).
    pub metrics_addr: SocketAddr,
    /// When set, every call except health, reflection and AdminService needs this bearer token.
    pub service_token: Option<Secret>,
    pub tls: Option<TlsFiles>,
    /// Calls handled at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// The deadline of a call whose caller sets none (and the cap of those that do).
    pub default_deadline: Duration,
    /// A connection is told to go away (GOAWAY) after about this long (±10% per connection),
    /// so clients reconnect through the Service and spread over new replicas. `None`: never.
    pub max_connection_age: Option<Duration>,
    /// After that GOAWAY, the calls in flight get this long to finish before the connection is
    /// closed under them.
    pub max_connection_age_grace: Duration,
}

impl fmt::Debug for Config {
    // Written by hand: the connection options and the Redis URL may hold passwords.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen_addr", &self.listen_addr)
            .field(
                "database",
                &format_args!(
                    "{}:{}/{}",
                    self.database.get_host(),
                    self.database.get_port(),
                    self.database.get_database().unwrap_or("")
                ),
            )
            .field("database_max_connections", &self.database_max_connections)
            .field("redis_pool_size", &self.redis_pool_size)
            .field("redis_key_prefix", &self.redis_key_prefix)
            .field("log_format", &self.log_format)
            .field("max_balance", &self.max_balance)
            .field("order_ttl", &self.order_ttl)
            .field("data_platform_sink", &self.data_platform_sink)
            .field("ranking_timezone", &self.ranking_timezone)
            .field("metrics_addr", &self.metrics_addr)
            .field("service_token", &self.service_token.as_ref().map(|_| "set"))
            .field("tls", &self.tls)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("default_deadline", &self.default_deadline)
            .field("max_connection_age", &self.max_connection_age)
            .finish_non_exhaustive()
    }
}

/// Every invalid variable, one line each.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads settings through `lookup` (the environment in production, a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut r = Reader {
            lookup: &lookup,
            errors: Vec::new(),
        };
        let database_url = r.string(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/ecommerce",
        );
        let database = match PgConnectOptions::from_str(&database_url) {
            Ok(options) => options,
            Err(e) => {
                r.errors
                    .push(format!("DATABASE_URL: not a Postgres URL ({e})"));
                PgConnectOptions::new()
            }
        };
        let redis_url = r.string("REDIS_URL", "redis://127.0.0.1:6379");
        if let Err(e) = fred::types::config::Config::from_url(&redis_url) {
            r.errors.push(format!("REDIS_URL: {}", e.details()));
        }
        let redis_key_prefix = r.string("REDIS_KEY_PREFIX", "ecommerce:");
        if let Err(why) = validate_prefix(&redis_key_prefix) {
            r.errors.push(format!("REDIS_KEY_PREFIX: {why}"));
        }
        let admin_token = match lookup("ADMIN_TOKEN") {
            Some(token) if token.len() >= 8 => Secret(token),
            Some(_) => {
                r.errors
                    .push("ADMIN_TOKEN: must be at least 8 characters".into());
                Secret(String::new())
            }
            None => {
                r.errors
                    .push("ADMIN_TOKEN: required (the bearer token of AdminService)".into());
                Secret(String::new())
            }
        };
        let sink = r.string("DATA_PLATFORM_SINK", "log");
        let data_platform_sink = match sink.as_str() {
            "log" => SinkKind::Log,
            "http" => match lookup("DATA_PLATFORM_URL") {
                Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
                    SinkKind::Http(url)
                }
                _ => {
                    r.errors.push(
                        "DATA_PLATFORM_URL: an http(s) URL is required when DATA_PLATFORM_SINK=http"
                            .into(),
                    );
                    SinkKind::Log
                }
            },
            _ => {
                r.errors
                    .push("DATA_PLATFORM_SINK: expected `log` or `http`".into());
                SinkKind::Log
            }
        };
        let service_token = match lookup("SERVICE_TOKEN") {
            None => None,
            Some(t) if t.is_empty() => None,
            Some(t) if t.len() >= 16 => Some(Secret(t)),
            Some(_) => {
                r.errors
                    .push("SERVICE_TOKEN: must be at least 16 characters".into());
                None
            }
        };
        let tls = match (
            lookup("TLS_CERT_PATH"),
            lookup("TLS_KEY_PATH"),
            lookup("TLS_CLIENT_CA_PATH"),
        ) {
            (None, None, None) => None,
            (Some(cert), Some(key), client_ca) => Some(TlsFiles {
                cert: cert.into(),
                key: key.into(),
                client_ca: client_ca.map(Into::into),
            }),
            _ => {
                r.errors.push(
                    "TLS_CERT_PATH, TLS_KEY_PATH: set both (and TLS_CLIENT_CA_PATH only with them)"
                        .into(),
                );
                None
            }
        };
        let max_balance = r.ranged("MAX_BALANCE", 1_000_000_000_000_i64, 1, i64::MAX / 4);

        let config = Config {
            listen_addr: r.parsed("LISTEN_ADDR", "0.0.0.0:50051".parse().expect("valid")),
            database,
            database_max_connections: r.ranged("DATABASE_MAX_CONNECTIONS", 16, 1, 1000),
            database_acquire_timeout: r.millis("DATABASE_ACQUIRE_TIMEOUT_MS", 2000),
            run_migrations: r.parsed("RUN_MIGRATIONS", true),
            redis_url,
            redis_pool_size: r.ranged("REDIS_POOL_SIZE", 4, 1, 256),
            redis_command_timeout: r.millis("REDIS_COMMAND_TIMEOUT_MS", 1000),
            redis_key_prefix,
            admin_token,
            log_format: r.parsed("LOG_FORMAT", LogFormat::Text),
            log_filter: r.string("RUST_LOG", "info"),
            max_balance: Won::new(max_balance),
            order_ttl: Duration::from_secs(r.ranged("ORDER_TTL_SECS", 900, 1, 86_400 * 7)),
            health_check_interval: r.millis("HEALTH_CHECK_INTERVAL_MS", 1000),
            liveness_stall: Duration::from_millis(r.ranged(
                "LIVENESS_STALL_MS",
                10_000,
                100,
                600_000,
            )),
            coupon_reconcile_interval: Duration::from_secs(r.ranged(
                "COUPON_RECONCILE_INTERVAL_SECS",
                30,
                1,
                86_400,
            )),
            coupon_orphan_grace: Duration::from_millis(r.ranged(
                "COUPON_ORPHAN_GRACE_MS",
                500,
                50,
                60_000,
            )),
            order_expiry_interval: Duration::from_secs(r.ranged(
                "ORDER_EXPIRY_INTERVAL_SECS",
                10,
                1,
                86_400,
            )),
            // tokio-cron-scheduler schedules in whole seconds; payments nudge the outbox anyway.
            outbox_interval: Duration::from_secs(r.ranged("OUTBOX_INTERVAL_SECS", 1, 1, 3600)),
            outbox_batch_size: r.ranged("OUTBOX_BATCH_SIZE", 100, 1, 10_000),
            outbox_max_attempts: r.ranged("OUTBOX_MAX_ATTEMPTS", 20, 1, 1000),
            outbox_retry_base: r.millis("OUTBOX_RETRY_BASE_MS", 500),
            outbox_retry_max: r.millis("OUTBOX_RETRY_MAX_MS", 300_000),
            data_platform_sink,
            data_platform_timeout: r.millis("DATA_PLATFORM_TIMEOUT_MS", 5000),
            ranking_reconcile_interval: Duration::from_secs(r.ranged(
                "RANKING_RECONCILE_INTERVAL_SECS",
                300,
                1,
                86_400,
            )),
            ranking_timezone: r.parsed("RANKING_TIMEZONE", chrono_tz::Asia::Seoul),
            ranking_retention_days: r.ranged("RANKING_RETENTION_DAYS", 35, 30, 366),
            popular_cache_ttl: r.millis("POPULAR_CACHE_TTL_MS", 2000),
            sold_out_marker_ttl: r.millis("SOLD_OUT_MARKER_TTL_MS", 5000),
            shutdown_drain: Duration::from_millis(r.ranged("SHUTDOWN_DRAIN_MS", 0, 0, 600_000)),
            max_message_bytes: r.ranged("MAX_MESSAGE_BYTES", 1 << 20, 1024, 64 << 20),
            seed_demo_data: r.parsed("SEED_DEMO_DATA", false),
            metrics_addr: r.parsed("METRICS_ADDR", "0.0.0.0:9090".parse().expect("valid")),
            service_token,
            tls,
            max_concurrent_requests: r.ranged("MAX_CONCURRENT_REQUESTS", 1024, 1, 1_000_000),
            default_deadline: r.millis("DEFAULT_DEADLINE_MS", 30_000),
            // 0, the default, keeps connections for as long as the clients do.
            max_connection_age: Some(r.ranged("MAX_CONNECTION_AGE_SECS", 0, 0, 86_400))
                .filter(|secs| *secs > 0)
                .map(Duration::from_secs),
            max_connection_age_grace: Duration::from_secs(r.ranged(
                "MAX_CONNECTION_AGE_GRACE_SECS",
                30,
                1,
                3600,
            )),
        };
        if r.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError(r.errors))
        }
    }
}

/// Key prefixes must leave hash tags to us: a `{` in the prefix would become the hash tag and
/// put every key of the service in one Redis Cluster slot.
pub fn validate_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.len() > 64 {
        return Err("at most 64 characters");
    }
    if prefix
        .chars()
        .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
    {
        return Err("must not contain `{`, `}`, spaces or control characters");
    }
    Ok(())
}

struct Reader<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<String>,
}

impl Reader<'_> {
    fn string(&mut self, key: &str, default: &str) -> String {
        (self.lookup)(key).unwrap_or_else(|| default.to_owned())
    }

    fn parsed<T>(&mut self, key: &str, default: T) -> T
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match (self.lookup)(key) {
            None => default,
            Some(raw) => match raw.trim().parse() {
                Ok(value) => value,
                Err(e) => {
                    self.errors
                        .push(format!("{key}: cannot parse {raw:?} ({e})"));
                    default
                }
            },
        }
    }

    fn ranged<T>(&mut self, key: &str, default: T, min: T, max: T) -> T
    where
        T: FromStr + PartialOrd + fmt::Display + Copy,
        T::Err: fmt::Display,
    {
        let value = self.parsed(key, default);
        if value < min || value > max {
            self.errors
                .push(format!("{key}: {value} is outside {min}..={max}"));
            return default;
        }
        value
    }

    fn millis(&mut self, key: &str, default: u64) -> Duration {
        Duration::from_millis(self.ranged(key, default, 1, 3_600_000))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(move |k| map.get(k).cloned())
    }

    #[test]
    fn defaults_need_only_the_admin_token() {
        let c = config(&[("ADMIN_TOKEN", "0123456789")]).expect("valid");
        assert_eq!(c.listen_addr.port(), 50051);
        assert_eq!(c.redis_key_prefix, "ecommerce:");
        assert_eq!(c.max_balance, Won::new(1_000_000_000_000));
        assert_eq!(c.order_ttl, Duration::from_secs(900));
        assert_eq!(c.data_platform_sink, SinkKind::Log);
        assert_eq!(c.ranking_timezone, chrono_tz::Asia::Seoul);
        assert_eq!(c.max_connection_age, None);
        assert_eq!(c.max_connection_age_grace, Duration::from_secs(30));
        assert_eq!(c.liveness_stall, Duration::from_secs(10));
    }

    #[test]
    fn a_connection_age_of_zero_means_none() {
        let age = |value: &str| {
            config(&[
                ("ADMIN_TOKEN", "0123456789"),
                ("MAX_CONNECTION_AGE_SECS", value),
            ])
            .map(|c| c.max_connection_age)
        };
        assert_eq!(age("0").unwrap(), None);
        assert_eq!(age("300").unwrap(), Some(Duration::from_secs(300)));
        assert!(age("-1").is_err());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = config(&[
            ("LISTEN_ADDR", "nowhere"),
            ("REDIS_KEY_PREFIX", "a{b}"),
            ("DATABASE_MAX_CONNECTIONS", "0"),
            ("LOG_FORMAT", "xml"),
            ("DATA_PLATFORM_SINK", "http"),
            ("TLS_KEY_PATH", "/only/the/key.pem"),
            ("SERVICE_TOKEN", "short"),
            ("MAX_CONNECTION_AGE_GRACE_SECS", "0"),
            ("LIVENESS_STALL_MS", "5"),
        ])
        .unwrap_err();
        let text = err.to_string();
        for key in [
            "LISTEN_ADDR",
            "REDIS_KEY_PREFIX",
            "DATABASE_MAX_CONNECTIONS",
            "LOG_FORMAT",
            "ADMIN_TOKEN",
            "DATA_PLATFORM_URL",
            "TLS_CERT_PATH",
            "SERVICE_TOKEN",
            "MAX_CONNECTION_AGE_GRACE_SECS",
            "LIVENESS_STALL_MS",
        ] {
            assert!(text.contains(key), "{key} missing from {text}");
        }
    }

    #[test]
    fn secrets_do_not_leak_through_debug() {
        let c = config(&[
            ("ADMIN_TOKEN", "super-secret-token"),
            ("SERVICE_TOKEN", "service-secret-token-123"),
            ("DATABASE_URL", "postgres://app:db-password@db:5432/shop"),
            ("REDIS_URL", "redis://:redis-password@cache:6379"),
        ])
        .expect("valid");
        let text = format!("{c:?}");
        for secret in [
            "super-secret-token",
            "service-secret-token-123",
            "db-password",
            "redis-password",
        ] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }
}
