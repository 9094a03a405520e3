//! Building and running the service: the same path for `main` and for the tests, which bind
//! port 0 and read the address back.
//!
//! Shutdown order: readiness (every health name but `liveness`) goes NOT_SERVING at once, the
//! server keeps answering for the drain period (so load balancers stop routing here first),
//! then it stops accepting, sends GOAWAY, ends health Watch streams, finishes the calls in
//! flight, and only then the jobs stop and the pools close.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::{
    app::{App, Settings},
    config::Config,
    connections::{self, Ageing},
    grpc::{
        self, AdminAuth, Limits,
        middleware::{DeadlineLayer, ServiceAuthLayer, ShedLayer, TooLargeLayer},
        observe::ObserveLayer,
    },
    health::{Health, HealthWatcher},
    jobs::Jobs,
    liveness::Watchdog,
    store::{data_platform::Sink, postgres, redis::Redis},
};

pub struct Application {
    listener: TcpListener,
    metrics_listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: App,
    config: Config,
}

impl Application {
    /// Connects the stores, applies migrations and binds the listen address. Postgres must be
    /// reachable for the migrations (retried for a while); Redis may come later.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        // Before anything records a metric: handles registered earlier would go nowhere.
        crate::metrics::recorder();
        let tls = config
            .tls
            .as_ref()
            .map(connections::tls_acceptor)
            .transpose()?;
        let pg = postgres::pool(
            config.database.clone(),
            config.database_max_connections,
            config.database_acquire_timeout,
        );
        if config.run_migrations {
            migrate_with_retry(&pg).await?;
        }
        let redis = Redis::connect(
            &config.redis_url,
            config.redis_pool_size,
            config.redis_command_timeout,
            &config.redis_key_prefix,
        )
        .context("configuring the Redis client")?;
        if !redis.wait_connected(Duration::from_secs(5)).await {
            tracing::warn!("Redis is not reachable yet; starting anyway (NOT_SERVING until it is)");
        }
        let sink = Sink::new(&config.data_platform_sink, config.data_platform_timeout)
            .context("configuring the data platform sink")?;
        let app = App::new(pg, redis, Settings::from_config(&config), sink);
        if config.seed_demo_data {
            let created = app
                .seed_demo_catalog()
                .await
                .map_err(|e| anyhow::anyhow!("seeding the demo catalog: {e}"))?;
            tracing::info!(created, "demo catalog");
        }
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("binding {}", config.listen_addr))?;
        let metrics_listener = TcpListener::bind(config.metrics_addr)
            .await
            .with_context(|| format!("binding the metrics address {}", config.metrics_addr))?;
        Ok(Self {
            listener,
            metrics_listener,
            tls,
            app,
            config,
        })
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` is cancelled, then drains and returns.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            metrics_listener,
            tls,
            app,
            config,
        } = self;
        let metrics_task = tokio::spawn(crate::metrics::serve(metrics_listener, shutdown.clone()));
        let health = Health::new();
        // Held to the end: dropping it stops the heartbeat and the watchdog thread.
        let _watchdog = Watchdog::start(health.clone(), config.liveness_stall)
            .context("starting the liveness watchdog")?;
        let watcher = HealthWatcher {
            health: health.clone(),
            pg: app.pg().clone(),
            redis: app.redis().clone(),
            interval: config.health_check_interval,
        };
        let health_task = tokio::spawn(watcher.run(shutdown.clone()));
        let jobs = Jobs::start(app.clone(), &config).await?;

        let stop_serving = CancellationToken::new();
        let drain = config.shutdown_drain;
        tokio::spawn({
            let shutdown = shutdown.clone();
            let stop_serving = stop_serving.clone();
            async move {
                shutdown.cancelled().await;
                tracing::info!(
                    drain_ms = drain.as_millis() as u64,
                    "shutting down: draining"
                );
                tokio::time::sleep(drain).await;
                stop_serving.cancel();
            }
        });

        let routes = grpc::routes(
            app.clone(),
            AdminAuth::new(config.admin_token.expose()),
            Limits {
                max_message_bytes: config.max_message_bytes,
            },
        )
        .add_service(health.service(stop_serving.clone()));
        // Outermost first: every call is observed, then authenticated, admitted, given a
        // deadline, and finally routed.
        let service = tower::ServiceBuilder::new()
            .layer(ObserveLayer)
            .layer(ServiceAuthLayer::new(
                config.service_token.as_ref().map(|t| t.expose()),
            ))
            .layer(ShedLayer::new(config.max_concurrent_requests))
            .layer(DeadlineLayer::new(config.default_deadline))
            .layer(TooLargeLayer)
            .service(routes.prepare());
        let ageing = config.max_connection_age.map(|max_age| Ageing {
            max_age,
            grace: config.max_connection_age_grace,
        });
        tracing::info!(addr = %config.listen_addr, "serving gRPC");
        connections::serve(listener, tls, service, ageing, stop_serving).await;

        jobs.stop().await;
        let _ = health_task.await;
        let _ = metrics_task.await;
        close(app.pg(), &app).await;
        tracing::info!("stopped");
        Ok(())
    }
}

async fn close(pg: &PgPool, app: &App) {
    app.redis().quit().await;
    pg.close().await;
}

/// Postgres may still be starting (a fresh pod next to a fresh database): retry for a minute.
async fn migrate_with_retry(pg: &PgPool) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match postgres::migrate(pg).await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "migrations failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e).context("applying migrations"),
        }
    }
}
