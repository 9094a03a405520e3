//! The table of every environment variable the server reads: name, default, accepted range and
//! meaning. The reader (`super::reader`) reads only through these entries, the README's
//! configuration table is rendered from them (a test keeps the two equal), and the deployment
//! manifests are checked against them, so the three cannot drift apart.

use std::fmt;

/// One environment variable.
#[derive(Debug)]
pub struct Variable {
    pub name: &'static str,
    pub default: Default,
    pub range: Range,
    pub meaning: &'static str,
}

/// What an unset variable means.
#[derive(Debug, PartialEq, Eq)]
pub enum Default {
    /// This value, written as it would be in the environment.
    Value(&'static str),
    /// The server does not start without it.
    Required,
    /// Off, or needed only together with another setting (see the meaning).
    Unset,
}

/// The values a variable accepts.
#[derive(Debug, PartialEq, Eq)]
pub enum Range {
    /// A whole number in `min..=max`.
    Integer { min: i64, max: i64 },
    /// A whole number of milliseconds in `min..=max`.
    Millis { min: u64, max: u64 },
    /// A whole number of seconds in `min..=max`.
    Seconds { min: u64, max: u64 },
    /// A number of hours above 0 and at most `max`, decimals allowed (`0.001` is 3.6 s).
    Hours { max: u64 },
    /// One of these words.
    OneOf(&'static [&'static str]),
    /// `true` or `false`.
    Bool,
    /// Anything this sentence describes.
    Described(&'static str),
}

impl fmt::Display for Default {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Default::Value(value) => write!(f, "`{value}`"),
            Default::Required => f.write_str("required"),
            Default::Unset => f.write_str("unset"),
        }
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Range::Integer { min, max } => write!(f, "{min}..={max}"),
            Range::Millis { min, max } => write!(f, "{min}..={max} ms"),
            Range::Seconds { min, max } => write!(f, "{min}..={max} s"),
            Range::Hours { max } => write!(f, "0 < h <= {max} hours, decimals allowed"),
            Range::OneOf(words) => {
                let words: Vec<String> = words.iter().map(|w| format!("`{w}`")).collect();
                f.write_str(&words.join(", "))
            }
            Range::Bool => f.write_str("`true`, `false`"),
            Range::Described(what) => f.write_str(what),
        }
    }
}

macro_rules! variables {
    ($($(#[$section:meta])* $ident:ident = $name:literal, $default:expr, $range:expr, $meaning:literal;)*) => {
        $(
            $(#[$section])*
            pub const $ident: Variable = Variable {
                name: $name,
                default: $default,
                range: $range,
                meaning: $meaning,
            };
        )*
        /// Every variable, in the order of the README's table.
        pub const VARIABLES: &[Variable] = &[$($ident),*];
    };
}

use self::Default::{Required, Unset, Value};

variables! {
    // Server
    LISTEN_ADDR = "LISTEN_ADDR", Value("0.0.0.0:50051"), Range::Described("a socket address"),
        "gRPC listen address";
    METRICS_ADDR = "METRICS_ADDR", Value("0.0.0.0:9090"), Range::Described("a socket address"),
        "Prometheus `/metrics` (HTTP)";
    MAX_MESSAGE_BYTES = "MAX_MESSAGE_BYTES", Value("1048576"),
        Range::Integer { min: 1024, max: 67_108_864 },
        "larger requests are refused before decoding";
    MAX_CONCURRENT_REQUESTS = "MAX_CONCURRENT_REQUESTS", Value("1024"),
        Range::Integer { min: 1, max: 1_000_000 },
        "calls handled at once; more are refused at once with RESOURCE_EXHAUSTED (`OVERLOADED`)";
    DEFAULT_DEADLINE_MS = "DEFAULT_DEADLINE_MS", Value("30000"),
        Range::Millis { min: 1, max: 3_600_000 },
        "deadline of a call that sets no `grpc-timeout`, and the cap of those that do; past it the call is abandoned (its transaction rolls back) with DEADLINE_EXCEEDED";
    MAX_CONNECTION_AGE_SECS = "MAX_CONNECTION_AGE_SECS", Value("0"),
        Range::Seconds { min: 0, max: 86_400 },
        "a connection gets GOAWAY after this long, ±10% per connection, so clients reconnect (through a Service, to any replica); 0: never; the Kubernetes manifests set 300";
    MAX_CONNECTION_AGE_GRACE_SECS = "MAX_CONNECTION_AGE_GRACE_SECS", Value("30"),
        Range::Seconds { min: 1, max: 3600 },
        "after that GOAWAY, the calls in flight get this long to finish before the connection is closed under them; keep it at least `DEFAULT_DEADLINE_MS`";
    SHUTDOWN_DRAIN_MS = "SHUTDOWN_DRAIN_MS", Value("0"), Range::Millis { min: 0, max: 600_000 },
        "after SIGTERM, keep serving this long (readiness already NOT_SERVING)";
    HEALTH_CHECK_INTERVAL_MS = "HEALTH_CHECK_INTERVAL_MS", Value("1000"),
        Range::Millis { min: 1, max: 3_600_000 },
        "dependency ping interval";
    LIVENESS_STALL_MS = "LIVENESS_STALL_MS", Value("10000"),
        Range::Millis { min: 100, max: 600_000 },
        "health name `liveness` turns NOT_SERVING when the runtime has not run its heartbeat for this long, and stays so for as long again after it recovers";
    SEED_DEMO_DATA = "SEED_DEMO_DATA", Value("false"), Range::Bool,
        "create a demo catalog at start-up if the catalog is empty";
    // Security
    ADMIN_TOKEN = "ADMIN_TOKEN", Required, Range::Described("at least 8 characters"),
        "bearer token of AdminService";
    SERVICE_TOKEN = "SERVICE_TOKEN", Unset, Range::Described("at least 16 characters"),
        "when set, every call except health, reflection and AdminService needs `authorization: Bearer <SERVICE_TOKEN>`";
    TLS_CERT_PATH = "TLS_CERT_PATH", Unset, Range::Described("a PEM file"),
        "certificate chain: with `TLS_KEY_PATH`, the gRPC port speaks TLS";
    TLS_KEY_PATH = "TLS_KEY_PATH", Unset, Range::Described("a PEM file"),
        "private key of `TLS_CERT_PATH`";
    TLS_CLIENT_CA_PATH = "TLS_CLIENT_CA_PATH", Unset, Range::Described("a PEM file"),
        "with TLS: require client certificates signed by this CA (mTLS)";
    // Postgres
    DATABASE_URL = "DATABASE_URL", Value("postgres://postgres@127.0.0.1:5432/ecommerce"),
        Range::Described("a Postgres URL"), "Postgres: the primary (with Patroni, HAProxy's primary port)";
    DATABASE_READ_URL = "DATABASE_READ_URL", Unset,
        Range::Described("a Postgres URL: a standby, or HAProxy's replica port"),
        "when set, ListProducts, GetProduct and the product details of GetPopularProducts read from here while it lags at most `READ_MAX_LAG_MS` (from `DATABASE_URL` otherwise); everything else reads from `DATABASE_URL`";
    READ_MAX_LAG_MS = "READ_MAX_LAG_MS", Value("1000"), Range::Millis { min: 100, max: 600_000 },
        "a `DATABASE_READ_URL` server that has not replayed what the primary had this long ago is not read from";
    DATABASE_MAX_CONNECTIONS = "DATABASE_MAX_CONNECTIONS", Value("16"),
        Range::Integer { min: 1, max: 1000 }, "pool size per replica";
    DATABASE_ACQUIRE_TIMEOUT_MS = "DATABASE_ACQUIRE_TIMEOUT_MS", Value("2000"),
        Range::Millis { min: 1, max: 3_600_000 },
        "waiting longer for a connection answers UNAVAILABLE";
    RUN_MIGRATIONS = "RUN_MIGRATIONS", Value("true"), Range::Bool, "apply migrations at start-up";
    // Redis
    REDIS_URL = "REDIS_URL", Value("redis://127.0.0.1:6379"),
        Range::Described("a Redis URL; a cluster is `redis-cluster://host1:port1?node=host2:port2&node=host3:port3`; behind Sentinels `redis-sentinel://sentinel1:26379?sentinelServiceName=NAME&node=sentinel2:26379&node=sentinel3:26379`"),
        "Redis";
    REDIS_POOL_SIZE = "REDIS_POOL_SIZE", Value("4"), Range::Integer { min: 1, max: 256 },
        "Redis connections (each multiplexes many calls)";
    REDIS_COMMAND_TIMEOUT_MS = "REDIS_COMMAND_TIMEOUT_MS", Value("1000"),
        Range::Millis { min: 1, max: 3_600_000 },
        "a Redis command slower than this fails (UNAVAILABLE)";
    REDIS_KEY_PREFIX = "REDIS_KEY_PREFIX", Value("ecommerce:"),
        Range::Described("at most 64 characters, no `{`, `}`, spaces or control characters"),
        "every key starts with it";
    // Telemetry
    LOG_FORMAT = "LOG_FORMAT", Value("text"), Range::OneOf(&["text", "json"]), "log line format";
    RUST_LOG = "RUST_LOG", Value("info,tokio_cron_scheduler=warn"),
        Range::Described("a tracing filter"),
        "log filter; `access=debug` logs one line per call (method, code, latency); the \
        scheduler's INFO lines say nothing to an operator";
    OTEL_EXPORTER_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT", Unset,
        Range::Described("an OTLP/gRPC URL, e.g. `http://otel-collector:4317`"),
        "when set, traces are exported there (service name `ecommerce`; the SDK reads the other standard `OTEL_*` variables); unset, tracing is off and costs nothing";
    OTEL_SEMCONV_STABILITY_OPT_IN = "OTEL_SEMCONV_STABILITY_OPT_IN", Unset,
        Range::Described("a comma-separated list; `rpc/dup` is read, other values are ignored"),
        "call spans carry OpenTelemetry's current RPC attributes (`rpc.system.name`, `rpc.method` in full, `rpc.status_code`, `error.type`, `server.address`, `server.port`); with `rpc/dup` also the older ones (`rpc.system`, `rpc.service`, `rpc.grpc.status_code`) for dashboards still reading them";
    // Balances and orders
    MAX_BALANCE = "MAX_BALANCE", Value("1000000000000"),
        Range::Integer { min: 1, max: 2_305_843_009_213_693_951 },
        "a charge past this balance is OUT_OF_RANGE";
    ORDER_TTL_SECS = "ORDER_TTL_SECS", Value("900"), Range::Seconds { min: 1, max: 604_800 },
        "an unpaid order expires after this";
    ORDER_EXPIRY_INTERVAL_SECS = "ORDER_EXPIRY_INTERVAL_SECS", Value("10"),
        Range::Seconds { min: 1, max: 86_400 }, "how often the expiry job runs";
    SOLD_OUT_MARKER_TTL_MS = "SOLD_OUT_MARKER_TTL_MS", Value("5000"),
        Range::Millis { min: 1, max: 3_600_000 },
        "how long a sold-out product is refused from Redis without asking Postgres";
    WRITE_BATCH_MAX = "WRITE_BATCH_MAX", Value("128"), Range::Integer { min: 1, max: 1024 },
        "PlaceOrder, Pay and ChargeBalance calls committed by one Postgres transaction at most (group commit); `1` turns batching off (coupon winners: `COUPON_RECORD_BATCH_MAX`)";
    WRITE_BATCHES_IN_FLIGHT = "WRITE_BATCHES_IN_FLIGHT", Value("2"), Range::Integer { min: 1, max: 64 },
        "batches of one write flow (PlaceOrder and Checkout, Pay, ChargeBalance, coupon winners) running at once at most: beside a batch stalled or committing (see below)";
    WRITE_BATCH_OVERLAP_COMMIT = "WRITE_BATCH_OVERLAP_COMMIT", Value("false"), Range::Bool,
        "`false`: a write flow runs one batch at a time, each as large as the calls that queued meanwhile; `true`: the next batch locks and decides while the previous one commits (for commits that wait on a network, a synchronous standby, while cores idle)";
    WRITE_BATCH_STALL_MS = "WRITE_BATCH_STALL_MS", Value("50"), Range::Millis { min: 1, max: 60_000 },
        "how long a flow's next batch waits at most for the running one to end (or, with `WRITE_BATCH_OVERLAP_COMMIT`, to reach its commit); then it starts beside it, up to `WRITE_BATCHES_IN_FLIGHT`: a row lock held elsewhere, by a long refund or an operator, stops one batch, not the flow";
    // Coupons
    COUPON_RECORD_BATCH_MAX = "COUPON_RECORD_BATCH_MAX", Value("1024"),
        Range::Integer { min: 1, max: 4096 },
        "coupon winners written by one INSERT at most (one batch at a time, like the other write flows); `1` writes each alone";
    COUPON_RECONCILE_INTERVAL_SECS = "COUPON_RECONCILE_INTERVAL_SECS", Value("30"),
        Range::Seconds { min: 1, max: 86_400 },
        "how often coupon gates are compared with Postgres";
    COUPON_ORPHAN_GRACE_MS = "COUPON_ORPHAN_GRACE_MS", Value("500"),
        Range::Millis { min: 50, max: 60_000 },
        "a coupon win without its row for this long is an orphan, released by the user's next call or the reconciliation job; a win's insert gets at most half of it, or the call answers UNAVAILABLE";
    // Per-user rate limits
    USER_RATE_PER_SEC = "USER_RATE_PER_SEC", Value("0"), Range::Integer { min: 0, max: 1_000_000 },
        "calls a second one user id may make to IssueCoupon, PlaceOrder, Checkout, Pay and ChargeBalance together, after a burst of `USER_RATE_BURST` (one budget per user, shared by every replica through Redis); more are refused with RESOURCE_EXHAUSTED (`RATE_LIMITED`) and a `google.rpc.RetryInfo` delay; 0: no limit; the Kubernetes manifests set 20";
    USER_RATE_BURST = "USER_RATE_BURST", Value("0"), Range::Integer { min: 0, max: 1_000_000 },
        "calls one user id may make at once before `USER_RATE_PER_SEC` paces them; 0: no limit; the Kubernetes manifests set 40";
    USER_RATE_TIMEOUT_MS = "USER_RATE_TIMEOUT_MS", Value("50"), Range::Millis { min: 1, max: 10_000 },
        "a rate check Redis has not answered within this lets the call through (fails open), with a warning and `ecommerce_rate_limit_fail_open_total`";
    // Outbox and the data platform
    DATA_PLATFORM_SINK = "DATA_PLATFORM_SINK", Value("log"), Range::OneOf(&["log", "http", "nats"]),
        "`log` (one line per event), `http` (CloudEvents batches POSTed to `DATA_PLATFORM_URL`) or `nats` (NATS JetStream, a subject per event type)";
    DATA_PLATFORM_URL = "DATA_PLATFORM_URL", Unset, Range::Described("an http(s) URL"),
        "required with `http`: where event batches (`application/cloudevents-batch+json`) are POSTed";
    NATS_URL = "NATS_URL", Value("nats://127.0.0.1:4222"),
        Range::Described("a `nats://` URL, or several separated by commas"),
        "with `nats`: the NATS server (the client reconnects by itself)";
    DATA_PLATFORM_SUBJECT = "DATA_PLATFORM_SUBJECT", Value("ecommerce.events.{type}"),
        Range::Described("a NATS subject without wildcards, with `{type}` as one whole token"),
        "with `nats`: each event's subject, `{type}` replaced by its type in snake case (`order_placed`, `order_cancelled`, `order_expired`, `payment_completed`, `order_refunded`)";
    DATA_PLATFORM_STREAM = "DATA_PLATFORM_STREAM", Value("ECOMMERCE_EVENTS"),
        Range::Described("letters, digits, `-` and `_`"),
        "with `nats`: the JetStream stream capturing every type's subject (`DATA_PLATFORM_SUBJECT` with `{type}` as `*`); created if missing (file storage, a 2-hour duplicate window), and widened to that filter if it exists without it; an event counts as delivered once the stream acknowledged it";
    EVENT_SOURCE = "EVENT_SOURCE", Value("/ecommerce"),
        Range::Described("a URI reference, 1..=256 characters, no spaces"),
        "the CloudEvents `source` of every event (with the event id, what a receiver deduplicates on); e.g. `https://shop.example.com/ecommerce`";
    DATA_PLATFORM_TIMEOUT_MS = "DATA_PLATFORM_TIMEOUT_MS", Value("5000"),
        Range::Millis { min: 1, max: 3_600_000 }, "timeout of one delivery";
    OUTBOX_INTERVAL_SECS = "OUTBOX_INTERVAL_SECS", Value("1"),
        Range::Seconds { min: 1, max: 3600 },
        "delivery job interval (every commit that writes events also nudges it)";
    OUTBOX_BATCH_SIZE = "OUTBOX_BATCH_SIZE", Value("100"), Range::Integer { min: 1, max: 10_000 },
        "events per delivery";
    OUTBOX_RETRY_BASE_MS = "OUTBOX_RETRY_BASE_MS", Value("500"),
        Range::Millis { min: 1, max: 3_600_000 },
        "first pause of the exponential backoff between attempts";
    OUTBOX_RETRY_MAX_MS = "OUTBOX_RETRY_MAX_MS", Value("300000"),
        Range::Millis { min: 1, max: 3_600_000 }, "longest pause between attempts";
    OUTBOX_PARK_AFTER_HOURS = "OUTBOX_PARK_AFTER_HOURS", Value("72"), Range::Hours { max: 8760 },
        "an event the data platform keeps failing to take (an outage: 5xx, 408, 429, timeouts, no connection) is parked after failing for this long since its first failure (since its last re-drive); one it refuses for good (any other 4xx) is parked at once; AdminService/RedriveEvents re-queues parked events";
    OUTBOX_RETENTION_HOURS = "OUTBOX_RETENTION_HOURS", Value("168"), Range::Hours { max: 87_600 },
        "delivered events are deleted this long after their delivery";
    IDEMPOTENCY_RETENTION_HOURS = "IDEMPOTENCY_RETENTION_HOURS", Value("72"),
        Range::Hours { max: 87_600 },
        "an idempotency key is forgotten this long after its first use: a retry after that is a new request";
    PURGE_INTERVAL_SECS = "PURGE_INTERVAL_SECS", Value("300"),
        Range::Seconds { min: 1, max: 86_400 },
        "how often delivered events and expired idempotency keys are deleted (1,000 rows per statement, at most 100,000 of each per run)";
    // Ranking
    RANKING_TIMEZONE = "RANKING_TIMEZONE", Value("Asia/Seoul"),
        Range::Described("an IANA time zone"), "the day boundary of the ranking buckets";
    RANKING_RETENTION_DAYS = "RANKING_RETENTION_DAYS", Value("35"),
        Range::Integer { min: 30, max: 366 }, "day buckets kept";
    RANKING_RECONCILE_INTERVAL_SECS = "RANKING_RECONCILE_INTERVAL_SECS", Value("300"),
        Range::Seconds { min: 1, max: 86_400 },
        "how often the buckets are rebuilt from Postgres";
    POPULAR_CACHE_TTL_MS = "POPULAR_CACHE_TTL_MS", Value("2000"),
        Range::Millis { min: 1, max: 3_600_000 },
        "how long a window's top sellers are cached in memory";
}

/// The README's configuration table, rendered from [`VARIABLES`].
pub fn markdown_table() -> String {
    let mut table = String::from("| variable | default | accepts | meaning |\n|---|---|---|---|\n");
    for v in VARIABLES {
        table.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            v.name, v.default, v.range, v.meaning
        ));
    }
    table
}

/// The variable called `name`.
pub fn find(name: &str) -> Option<&'static Variable> {
    VARIABLES.iter().find(|v| v.name == name)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn names_are_unique() {
        let names: HashSet<&str> = VARIABLES.iter().map(|v| v.name).collect();
        assert_eq!(names.len(), VARIABLES.len());
    }

    #[test]
    fn the_readme_shows_exactly_this_table() {
        let readme = include_str!("../../README.md");
        let table = markdown_table();
        assert!(
            readme.contains(&table),
            "README.md's configuration table differs from src/config/variables.rs; \
             replace it with:\n\n{table}"
        );
    }
}
