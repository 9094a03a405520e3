//! The test harness: `spawn_app` starts the server exactly as `main` does (same `Application`
//! path), on port 0, against the test's own database and Redis key prefix.
//!
//! Beside it, the helpers the test files share: `shop`, `coupons` and `refunds` drive the RPCs,
//! `rules` judges the books, `private` and `proxy` stand in for dependencies a test must kill or
//! cut, `contract` reads the descriptors and builds any request from them, `collector` receives
//! traces, `binary` runs the server binary as a deployment would, `platform` stands for the data
//! platform (an HTTP receiver, a JetStream reader, CloudEvents checks).

pub mod binary;
pub mod collector;
pub mod contract;
pub mod coupons;
pub mod ha;
pub mod lists;
pub mod metrics;
pub mod platform;
pub mod private;
pub mod proxy;
pub mod ranking;
pub mod refunds;
pub mod rules;
pub mod shop;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use ecommerce::{
    CouponGateStats,
    config::Config,
    proto::{
        admin_service_client::AdminServiceClient, balance_service_client::BalanceServiceClient,
        cart_service_client::CartServiceClient, coupon_service_client::CouponServiceClient,
        order_service_client::OrderServiceClient, payment_service_client::PaymentServiceClient,
        product_service_client::ProductServiceClient,
    },
    startup::Application,
};
use fred::interfaces::{ClientLike, KeysInterface};
use sqlx::{PgPool, postgres::PgConnectOptions};
use tokio::{runtime::Handle, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Request, Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt;

pub const ADMIN_TOKEN: &str = "test-admin-token";

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// `DATABASE_URL` pointing at the test's own database, for a server binary the test starts.
pub fn database_url(db: &PgConnectOptions) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let (server, _) = base.rsplit_once('/').expect("DATABASE_URL has a database");
    format!("{server}/{}", db.get_database().expect("test database"))
}

pub fn nats_url() -> String {
    std::env::var("TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Settings a test may change before the server starts.
pub struct TestSettings {
    pub vars: HashMap<&'static str, String>,
    pub database: PgConnectOptions,
}

impl TestSettings {
    pub fn set(&mut self, key: &'static str, value: impl ToString) -> &mut Self {
        self.vars.insert(key, value.to_string());
        self
    }
}

pub struct TestApp {
    /// Where the server listens, for clients the harness does not build (TLS, loadgen).
    pub addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
    pub channel: Channel,
    /// For assertions on what the server wrote.
    pub pg: PgPool,
    pub redis_prefix: String,
    pub redis: fred::clients::Client,
    /// What the server did to its coupon gates.
    pub gate_stats: std::sync::Arc<CouponGateStats>,
    shutdown: CancellationToken,
    server: JoinHandle<anyhow::Result<()>>,
}

pub async fn spawn_app(database: PgConnectOptions) -> TestApp {
    spawn_app_with(database, |_| {}).await
}

pub async fn spawn_app_with(
    database: PgConnectOptions,
    customize: impl FnOnce(&mut TestSettings),
) -> TestApp {
    spawn_app_on(&Handle::current(), database, customize).await
}

/// Runs the server on `runtime` (the test's own by default): a test that blocks the server's
/// runtime needs it apart from the one its client runs on.
pub async fn spawn_app_on(
    runtime: &Handle,
    database: PgConnectOptions,
    customize: impl FnOnce(&mut TestSettings),
) -> TestApp {
    let prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
    let mut settings = TestSettings {
        vars: HashMap::from([
            ("LISTEN_ADDR", "127.0.0.1:0".to_string()),
            ("ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
            ("REDIS_URL", redis_url()),
            ("REDIS_KEY_PREFIX", prefix.clone()),
            ("REDIS_POOL_SIZE", "2".to_string()),
            ("DATABASE_MAX_CONNECTIONS", "5".to_string()),
            ("HEALTH_CHECK_INTERVAL_MS", "200".to_string()),
            ("METRICS_ADDR", "127.0.0.1:0".to_string()),
            // A debug build sharing two cores with other tests can starve the coupon recorder
            // for longer than production's 500 ms grace allows (it then answers UNAVAILABLE);
            // tests of the grace itself set their own.
            ("COUPON_ORPHAN_GRACE_MS", "2000".to_string()),
            ("RUST_LOG", "warn".to_string()),
        ]),
        database: database.clone(),
    };
    customize(&mut settings);
    let vars = settings.vars;
    // Replicas of one test share a prefix the test chose.
    let prefix = vars["REDIS_KEY_PREFIX"].clone();
    let mut config = Config::from_lookup(|k| vars.get(k).cloned()).expect("valid test config");
    config.postgres.database.0 = settings.database;
    ecommerce::telemetry::init(&config.telemetry);

    // Built on `runtime` too: the pools' and the Redis client's tasks belong to the server.
    let shutdown = CancellationToken::new();
    let (built, addresses) = tokio::sync::oneshot::channel();
    let server = runtime.spawn({
        let shutdown = shutdown.clone();
        async move {
            let application = Application::build(config).await?;
            let _ = built.send((
                application.local_addr(),
                application.metrics_addr(),
                application.coupon_gate_stats(),
            ));
            application.run_until_stopped(shutdown).await
        }
    });
    let Ok((addr, metrics_addr, gate_stats)) = addresses.await else {
        panic!("the server does not build: {:?}", server.await);
    };

    // Lazy: a TLS server's tests build their own channels; this plaintext one then stays idle.
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    let pg = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .connect_with(database)
        .await
        .expect("test pool connects");
    let redis = fred::prelude::Builder::from_config(
        fred::types::config::Config::from_url(&redis_url()).expect("valid redis url"),
    )
    .build()
    .expect("redis client");
    redis.init().await.expect("redis connects");
    TestApp {
        addr,
        metrics_addr,
        channel,
        pg,
        redis_prefix: prefix,
        redis,
        gate_stats,
        shutdown,
        server,
    }
}

/// Three servers on one database and one Redis key prefix, as three Kubernetes replicas.
pub async fn replicas(db: PgConnectOptions) -> [TestApp; 3] {
    let prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
    let spawn = || {
        let prefix = prefix.clone();
        spawn_app_with(db.clone(), move |s| {
            s.set("REDIS_KEY_PREFIX", prefix);
        })
    };
    [spawn().await, spawn().await, spawn().await]
}

impl TestApp {
    pub fn balance(&self) -> BalanceServiceClient<Channel> {
        BalanceServiceClient::new(self.channel.clone())
    }

    pub fn products(&self) -> ProductServiceClient<Channel> {
        ProductServiceClient::new(self.channel.clone())
    }

    pub fn coupons(&self) -> CouponServiceClient<Channel> {
        CouponServiceClient::new(self.channel.clone())
    }

    pub fn orders(&self) -> OrderServiceClient<Channel> {
        OrderServiceClient::new(self.channel.clone())
    }

    pub fn carts(&self) -> CartServiceClient<Channel> {
        CartServiceClient::new(self.channel.clone())
    }

    pub fn payments(&self) -> PaymentServiceClient<Channel> {
        PaymentServiceClient::new(self.channel.clone())
    }

    pub fn admin(&self) -> AdminServiceClient<InterceptedService<Channel, BearerToken>> {
        self.admin_with_token(Some(ADMIN_TOKEN))
    }

    pub fn admin_with_token(
        &self,
        token: Option<&str>,
    ) -> AdminServiceClient<InterceptedService<Channel, BearerToken>> {
        AdminServiceClient::with_interceptor(
            self.channel.clone(),
            BearerToken(token.map(|t| format!("Bearer {t}"))),
        )
    }

    /// What the health service says of `service` (`""`: readiness), or `None` if the call
    /// fails.
    pub async fn health(&self, service: &str) -> Option<ServingStatus> {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        let response = HealthClient::new(self.channel.clone()).check(request).await;
        Some(response.ok()?.into_inner().status())
    }

    /// Whether `service` reads `wanted` within `within`. The server reads NOT_SERVING until
    /// its first round of dependency pings, so a test that needs it ready waits here, as a
    /// Kubernetes Service waits for the readiness probe.
    pub async fn becomes(&self, service: &str, wanted: ServingStatus, within: Duration) -> bool {
        eventually(within, || async {
            self.health(service).await == Some(wanted)
        })
        .await
    }

    /// Stops the server (draining calls in flight), closes its pools and deletes the test's
    /// Redis keys, so the test database can be dropped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.server
            .await
            .expect("server task")
            .expect("server stopped cleanly");
        self.pg.close().await;
        delete_keys(&self.redis, &self.redis_prefix).await;
        let _ = self.redis.quit().await;
    }
}

/// Deletes every key under `prefix` (never anything else: other tests share this Redis), on
/// every node of a cluster. Returns how many were deleted.
pub async fn delete_keys(redis: &fred::clients::Client, prefix: &str) -> usize {
    use futures::TryStreamExt;
    let pattern = format!("{prefix}*");
    let keys: Vec<fred::types::Key> = if redis.is_clustered() {
        redis
            .scan_cluster_buffered(pattern, Some(1000), None)
            .try_collect()
            .await
    } else {
        redis
            .scan_buffered(pattern, Some(1000), None)
            .try_collect()
            .await
    }
    .unwrap_or_default();
    let mut deleted = 0;
    for key in keys {
        let n: i64 = redis.unlink(key).await.unwrap_or(0);
        deleted += n as usize;
    }
    deleted
}

/// Deletes every key under `prefix` through a client of its own, for a server the test ran as
/// a process.
pub async fn delete_keys_of(prefix: &str) -> usize {
    let redis = fred::prelude::Builder::from_config(
        fred::types::config::Config::from_url(&redis_url()).expect("valid redis url"),
    )
    .build()
    .expect("redis client");
    redis.init().await.expect("redis connects");
    let deleted = delete_keys(&redis, prefix).await;
    let _ = redis.quit().await;
    deleted
}

/// Sends `authorization: <value>` on every call (nothing when `None`).
#[derive(Clone)]
pub struct BearerToken(Option<String>);

impl BearerToken {
    pub fn new(value: Option<String>) -> Self {
        Self(value)
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.parse().expect("ascii token"));
        }
        Ok(request)
    }
}

/// The ErrorInfo reason of a status, with its code.
pub fn reason(status: &Status) -> (Code, String) {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("status without ErrorInfo: {status:?}"));
    assert_eq!(info.domain, "ecommerce");
    (status.code(), info.reason)
}

/// Asserts a call failed with this code and reason.
#[track_caller]
pub fn assert_error<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    expected_reason: &str,
) -> Status {
    let status = result.expect_err("call should fail");
    assert_eq!(
        reason(&status),
        (code, expected_reason.to_string()),
        "unexpected status: {status:?}"
    );
    status
}

/// The `field` of an INVALID_ARGUMENT status.
pub fn invalid_field(status: &Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_error_info()
        .and_then(|info| info.metadata.get("field").cloned())
        .unwrap_or_default()
}

/// Prints every violation a property or workload test collected (all of them, not just the
/// first), then fails if there was any.
#[track_caller]
pub fn assert_no_violations(violations: &[String]) {
    for violation in violations {
        eprintln!("VIOLATION {violation}");
    }
    assert!(
        violations.is_empty(),
        "{} violations (listed above)",
        violations.len()
    );
}

/// Polls `check` every 50 ms until it is true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
