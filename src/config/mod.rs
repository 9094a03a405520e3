//! Configuration: every setting comes from one environment variable, listed with its default,
//! range and meaning in [`variables`] (the README's table is rendered from there), parsed and
//! validated once at start-up, every problem reported at once so an operator fixes them in one
//! go. The settings are grouped in sections, one per part of the service.

mod outbox;
mod postgres;
mod reader;
pub mod variables;

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use chrono_tz::Tz;

pub use self::outbox::{OutboxSettings, SUBJECT_TYPE_PLACEHOLDER, SinkKind};
pub use self::postgres::{Database, PostgresSettings};
use self::{outbox::outbox, reader::Reader, variables as v};
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

/// TLS for the gRPC listener: the server's certificate chain and key (PEM), and optionally a
/// CA whose client certificates are then required (mTLS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
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
/// the test harness through [`Config::from_lookup`].
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerSettings,
    pub security: SecuritySettings,
    pub postgres: PostgresSettings,
    pub redis: RedisSettings,
    pub telemetry: TelemetrySettings,
    pub orders: OrderSettings,
    pub coupons: CouponSettings,
    pub rate_limits: RateLimitSettings,
    pub outbox: OutboxSettings,
    pub retention: RetentionSettings,
    pub ranking: RankingSettings,
}

/// The gRPC and metrics listeners, and how calls and connections are admitted and ended.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub listen_addr: SocketAddr,
    /// Where `/metrics` is served (Prometheus text format).
    pub metrics_addr: SocketAddr,
    /// Requests larger than this are refused before they are decoded.
    pub max_message_bytes: usize,
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
    /// After SIGTERM, keep serving this long (readiness already NOT_SERVING) before draining.
    pub shutdown_drain: Duration,
    pub health_check_interval: Duration,
    /// Liveness turns NOT_SERVING when the runtime has not run its heartbeat task for this long.
    pub liveness_stall: Duration,
    /// Create a small demo catalog at start-up when the catalog is empty.
    pub seed_demo_data: bool,
}

/// Who may call.
#[derive(Clone, Debug)]
pub struct SecuritySettings {
    pub admin_token: Secret,
    /// When set, every call except health, reflection and AdminService needs this bearer token.
    pub service_token: Option<Secret>,
    pub tls: Option<TlsFiles>,
}

#[derive(Clone)]
pub struct RedisSettings {
    pub url: String,
    pub pool_size: usize,
    pub command_timeout: Duration,
    /// Prepended to every Redis key. Never contains `{` or `}` so hash tags stay ours.
    pub key_prefix: String,
}

impl fmt::Debug for RedisSettings {
    // The URL may hold a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("pool_size", &self.pool_size)
            .field("command_timeout", &self.command_timeout)
            .field("key_prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    pub log_filter: String,
    /// Where traces are exported (OTLP over gRPC); `None`: tracing is off.
    pub otlp_endpoint: Option<String>,
    /// `OTEL_SEMCONV_STABILITY_OPT_IN` as set (`crate::telemetry` reads `rpc/dup` from it).
    pub semconv_opt_in: String,
}

/// Balances and orders.
#[derive(Clone, Debug)]
pub struct OrderSettings {
    /// A charge that would take a balance past this is refused with OUT_OF_RANGE.
    pub max_balance: Won,
    pub order_ttl: Duration,
    pub expiry_interval: Duration,
    pub sold_out_marker_ttl: Duration,
    /// PlaceOrder, Pay and ChargeBalance calls committed by one transaction at most; 1 is no
    /// batching.
    pub write_batch_max: usize,
    /// Batches of one write flow running at once.
    pub write_batches_in_flight: usize,
    /// Whether a flow's next batch may decide while the previous one commits.
    pub write_batch_overlap_commit: bool,
    /// How long a batch holds up the next batch of its flow at most.
    pub write_batch_stall: Duration,
}

#[derive(Clone, Debug)]
pub struct CouponSettings {
    /// Coupon winners written by one statement at most; 1 is no batching. Apart from
    /// `write_batch_max`: a winner's row is one cheap insert, and a stampede's tail is set by
    /// how many batches its winners wait through (docs/BENCHMARKS.md).
    pub record_batch_max: usize,
    pub reconcile_interval: Duration,
    /// A coupon win with no row for this long is an orphan (its insert never ran), not an
    /// insert in flight: the next call of that user, or the reconciliation job, releases it.
    /// Inserts are given at most half of it.
    pub orphan_grace: Duration,
}

/// One budget per user id for the calls a bot would flood.
#[derive(Clone, Debug)]
pub struct RateLimitSettings {
    /// `None`: no limit (`USER_RATE_PER_SEC` or `USER_RATE_BURST` is 0).
    pub user: Option<UserRate>,
    /// A check Redis has not answered within this lets the call through.
    pub timeout: Duration,
}

/// `burst` calls at once, then `per_sec` a second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserRate {
    pub per_sec: u32,
    pub burst: u32,
}

/// What is deleted after a while, and how often.
#[derive(Clone, Debug)]
pub struct RetentionSettings {
    pub purge_interval: Duration,
    pub delivered_events: Duration,
    pub idempotency_keys: Duration,
}

#[derive(Clone, Debug)]
pub struct RankingSettings {
    pub reconcile_interval: Duration,
    pub timezone: Tz,
    pub retention_days: u32,
    pub popular_cache_ttl: Duration,
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
        let mut r = Reader::new(&lookup);
        let config = Config {
            server: server(&mut r),
            security: security(&mut r),
            postgres: postgres::read(&mut r),
            redis: redis(&mut r),
            telemetry: TelemetrySettings {
                log_format: r.parsed(&v::LOG_FORMAT),
                log_filter: r.text(&v::RUST_LOG),
                otlp_endpoint: r
                    .set(&v::OTEL_EXPORTER_OTLP_ENDPOINT)
                    .filter(|e| !e.is_empty()),
                semconv_opt_in: r.text(&v::OTEL_SEMCONV_STABILITY_OPT_IN),
            },
            orders: OrderSettings {
                max_balance: Won::new(r.integer(&v::MAX_BALANCE)),
                order_ttl: r.duration(&v::ORDER_TTL_SECS),
                expiry_interval: r.duration(&v::ORDER_EXPIRY_INTERVAL_SECS),
                sold_out_marker_ttl: r.duration(&v::SOLD_OUT_MARKER_TTL_MS),
                write_batch_max: r.integer(&v::WRITE_BATCH_MAX),
                write_batches_in_flight: r.integer(&v::WRITE_BATCHES_IN_FLIGHT),
                write_batch_overlap_commit: r.parsed(&v::WRITE_BATCH_OVERLAP_COMMIT),
                write_batch_stall: r.duration(&v::WRITE_BATCH_STALL_MS),
            },
            coupons: CouponSettings {
                record_batch_max: r.integer(&v::COUPON_RECORD_BATCH_MAX),
                reconcile_interval: r.duration(&v::COUPON_RECONCILE_INTERVAL_SECS),
                orphan_grace: r.duration(&v::COUPON_ORPHAN_GRACE_MS),
            },
            rate_limits: rate_limits(&mut r),
            outbox: outbox(&mut r),
            retention: RetentionSettings {
                purge_interval: r.duration(&v::PURGE_INTERVAL_SECS),
                delivered_events: r.hours(&v::OUTBOX_RETENTION_HOURS),
                idempotency_keys: r.hours(&v::IDEMPOTENCY_RETENTION_HOURS),
            },
            ranking: RankingSettings {
                reconcile_interval: r.duration(&v::RANKING_RECONCILE_INTERVAL_SECS),
                timezone: r.parsed(&v::RANKING_TIMEZONE),
                retention_days: r.integer(&v::RANKING_RETENTION_DAYS),
                popular_cache_ttl: r.duration(&v::POPULAR_CACHE_TTL_MS),
            },
        };
        if r.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError(r.errors))
        }
    }
}

fn server(r: &mut Reader<'_>) -> ServerSettings {
    let max_connection_age = r.duration(&v::MAX_CONNECTION_AGE_SECS);
    ServerSettings {
        listen_addr: r.parsed(&v::LISTEN_ADDR),
        metrics_addr: r.parsed(&v::METRICS_ADDR),
        max_message_bytes: r.integer(&v::MAX_MESSAGE_BYTES),
        max_concurrent_requests: r.integer(&v::MAX_CONCURRENT_REQUESTS),
        default_deadline: r.duration(&v::DEFAULT_DEADLINE_MS),
        // 0, the default, keeps connections for as long as the clients do.
        max_connection_age: (!max_connection_age.is_zero()).then_some(max_connection_age),
        max_connection_age_grace: r.duration(&v::MAX_CONNECTION_AGE_GRACE_SECS),
        shutdown_drain: r.duration(&v::SHUTDOWN_DRAIN_MS),
        health_check_interval: r.duration(&v::HEALTH_CHECK_INTERVAL_MS),
        liveness_stall: r.duration(&v::LIVENESS_STALL_MS),
        seed_demo_data: r.parsed(&v::SEED_DEMO_DATA),
    }
}

fn security(r: &mut Reader<'_>) -> SecuritySettings {
    let admin_token = match r.set(&v::ADMIN_TOKEN) {
        Some(token) if token.len() >= 8 => Secret(token),
        Some(_) => {
            r.error(&v::ADMIN_TOKEN, "must be at least 8 characters");
            Secret(String::new())
        }
        None => {
            r.error(
                &v::ADMIN_TOKEN,
                "required (the bearer token of AdminService)",
            );
            Secret(String::new())
        }
    };
    let service_token = match r.set(&v::SERVICE_TOKEN) {
        None => None,
        Some(t) if t.is_empty() => None,
        Some(t) if t.len() >= 16 => Some(Secret(t)),
        Some(_) => {
            r.error(&v::SERVICE_TOKEN, "must be at least 16 characters");
            None
        }
    };
    let tls = match (
        r.set(&v::TLS_CERT_PATH),
        r.set(&v::TLS_KEY_PATH),
        r.set(&v::TLS_CLIENT_CA_PATH),
    ) {
        (None, None, None) => None,
        (Some(cert), Some(key), client_ca) => Some(TlsFiles {
            cert: cert.into(),
            key: key.into(),
            client_ca: client_ca.map(Into::into),
        }),
        _ => {
            r.error(
                &v::TLS_CERT_PATH,
                "set it with TLS_KEY_PATH (and TLS_CLIENT_CA_PATH only with them)",
            );
            None
        }
    };
    SecuritySettings {
        admin_token,
        service_token,
        tls,
    }
}

fn redis(r: &mut Reader<'_>) -> RedisSettings {
    let url = r.text(&v::REDIS_URL);
    if let Err(e) = fred::types::config::Config::from_url(&url) {
        r.error(&v::REDIS_URL, e.details());
    }
    let key_prefix = r.text(&v::REDIS_KEY_PREFIX);
    if let Err(why) = validate_prefix(&key_prefix) {
        r.error(&v::REDIS_KEY_PREFIX, why);
    }
    RedisSettings {
        url,
        pool_size: r.integer(&v::REDIS_POOL_SIZE),
        command_timeout: r.duration(&v::REDIS_COMMAND_TIMEOUT_MS),
        key_prefix,
    }
}

fn rate_limits(r: &mut Reader<'_>) -> RateLimitSettings {
    let per_sec: u32 = r.integer(&v::USER_RATE_PER_SEC);
    let burst: u32 = r.integer(&v::USER_RATE_BURST);
    RateLimitSettings {
        user: (per_sec > 0 && burst > 0).then_some(UserRate { per_sec, burst }),
        timeout: r.duration(&v::USER_RATE_TIMEOUT_MS),
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

#[cfg(test)]
mod tests;
