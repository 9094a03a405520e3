//! Building and running the service: the same path for `main` and for the tests, which bind
//! port 0 and read the address back.
//!
//! Shutdown order: readiness (every health name but `liveness`) goes NOT_SERVING at once, the
//! server keeps answering for the drain period (so load balancers stop routing here first),
//! then it stops accepting, sends GOAWAY, ends health Watch streams, finishes the calls in
//! flight, and only then the jobs stop and the pools close.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::{
    app::{
        Balances, Carts, Catalog, CouponGateStats, Coupons, Orders, Outbox, OutboxSettings,
        Payments, Popular, RankingSettings, Refunds, Retention, RetentionSettings, SoldOut,
        UserRateLimit, WriteBatches, seed_demo,
    },
    config::Config,
    connections::{self, Ageing},
    domain::Calendar,
    grpc::{
        self, AdminAuth, Limits, Services,
        access::AccessLayer,
        middleware::{DeadlineLayer, ServiceAuthLayer, ShedLayer, TooLargeLayer},
    },
    health::{Health, HealthWatcher},
    jobs::{JobServices, Jobs},
    liveness::Watchdog,
    store::{
        data_platform::Sink,
        postgres,
        redis::{
            Redis, coupon_gate::CouponGate, ranking::Ranking, sold_out::SoldOutMarkers,
            user_rate::Gcra,
        },
    },
};

pub struct Application {
    listener: TcpListener,
    metrics_listener: TcpListener,
    tls: Option<TlsAcceptor>,
    pg: PgPool,
    redis: Redis,
    services: Services,
    config: Config,
}

impl Application {
    /// Connects the stores, applies migrations and binds the listen address. Postgres must be
    /// reachable for the migrations (retried for a while); Redis may come later.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        // Before anything records a metric: handles registered earlier would go nowhere.
        crate::metrics::recorder();
        let tls = config
            .security
            .tls
            .as_ref()
            .map(connections::tls_acceptor)
            .transpose()?;
        let pg = postgres::pool(
            config.postgres.database.0.clone(),
            config.postgres.max_connections,
            config.postgres.acquire_timeout,
        );
        if config.postgres.run_migrations {
            migrate_with_retry(&pg).await?;
        }
        let redis = Redis::connect(
            &config.redis.url,
            config.redis.pool_size,
            config.redis.command_timeout,
            &config.redis.key_prefix,
        )
        .context("configuring the Redis client")?;
        if !redis.wait_connected(Duration::from_secs(5)).await {
            tracing::warn!("Redis is not reachable yet; starting anyway (NOT_SERVING until it is)");
        }
        let sink = Sink::new(
            &config.outbox.sink,
            &config.outbox.event_source,
            config.outbox.sink_timeout,
        )
        .await
        .context("configuring the data platform sink")?;
        let services = build_services(&pg, &redis, sink, &config);
        if config.server.seed_demo_data {
            let seeded = seed_demo(&services.catalog, &services.coupons)
                .await
                .map_err(|e| anyhow::anyhow!("seeding the demo data: {e}"))?;
            tracing::info!(
                products = seeded.products,
                coupons = seeded.coupons,
                "demo data"
            );
        }
        let listener = TcpListener::bind(config.server.listen_addr)
            .await
            .with_context(|| format!("binding {}", config.server.listen_addr))?;
        let metrics_listener = TcpListener::bind(config.server.metrics_addr)
            .await
            .with_context(|| {
                format!("binding the metrics address {}", config.server.metrics_addr)
            })?;
        Ok(Self {
            listener,
            metrics_listener,
            tls,
            pg,
            redis,
            services,
            config,
        })
    }

    /// What this server does to its coupon gates (repairs, checks), for its operators' tests.
    pub fn coupon_gate_stats(&self) -> Arc<CouponGateStats> {
        self.services.coupons.stats().clone()
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
            pg,
            redis,
            services,
            config,
        } = self;
        let metrics_task = tokio::spawn(crate::metrics::serve(metrics_listener, shutdown.clone()));
        let health = Health::new();
        // Held to the end: dropping it stops the heartbeat and the watchdog thread.
        let _watchdog = Watchdog::start(health.clone(), config.server.liveness_stall)
            .context("starting the liveness watchdog")?;
        let watcher = HealthWatcher {
            health: health.clone(),
            pg: pg.clone(),
            postgres: postgres::Probe::new(config.postgres.database.0.clone()),
            redis: redis.clone(),
            interval: config.server.health_check_interval,
        };
        let health_task = tokio::spawn(watcher.run(shutdown.clone()));
        let job_services = JobServices {
            coupons: services.coupons.clone(),
            orders: services.orders.clone(),
            outbox: services.outbox.clone(),
            popular: services.popular.clone(),
            retention: Arc::new(Retention::new(
                pg.clone(),
                RetentionSettings {
                    delivered_events: config.retention.delivered_events,
                    idempotency_keys: config.retention.idempotency_keys,
                },
            )),
        };
        let jobs = Jobs::start(pg.clone(), job_services, &config).await?;

        let stop_serving = CancellationToken::new();
        let drain = config.server.shutdown_drain;
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
            services,
            AdminAuth::new(config.security.admin_token.expose()),
            Limits {
                max_message_bytes: config.server.max_message_bytes,
            },
        )
        .add_service(health.service(stop_serving.clone()));
        // Outermost first: every call is observed, then authenticated, admitted, given a
        // deadline, and finally routed.
        let service = tower::ServiceBuilder::new()
            .layer(AccessLayer)
            .layer(ServiceAuthLayer::new(
                config.security.service_token.as_ref().map(|t| t.expose()),
            ))
            .layer(ShedLayer::new(config.server.max_concurrent_requests))
            .layer(DeadlineLayer::new(config.server.default_deadline))
            .layer(TooLargeLayer)
            .service(routes.prepare());
        let ageing = config.server.max_connection_age.map(|max_age| Ageing {
            max_age,
            grace: config.server.max_connection_age_grace,
        });
        tracing::info!(addr = %config.server.listen_addr, "serving gRPC");
        connections::serve(
            listener,
            tls,
            service,
            ageing,
            config.server.max_concurrent_requests,
            stop_serving,
        )
        .await;

        jobs.stop().await;
        let _ = health_task.await;
        let _ = metrics_task.await;
        redis.quit().await;
        pg.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Every use case, built once over the shared pools.
fn build_services(pg: &PgPool, redis: &Redis, sink: Sink, config: &Config) -> Services {
    let sold_out = Arc::new(SoldOut::new(
        SoldOutMarkers::new(redis.clone()),
        config.orders.sold_out_marker_ttl,
    ));
    let reads = match &config.postgres.read {
        Some((standby, max_lag)) => postgres::replica::Reads::with_standby(
            pg.clone(),
            standby.0.clone(),
            config.postgres.max_connections,
            *max_lag,
        ),
        None => postgres::replica::Reads::primary_only(pg.clone()),
    };
    let popular = Arc::new(Popular::new(
        pg.clone(),
        reads.clone(),
        Ranking::new(redis.clone()),
        RankingSettings {
            calendar: Calendar::new(config.ranking.timezone),
            retention_days: config.ranking.retention_days,
            cache_ttl: config.ranking.popular_cache_ttl,
        },
    ));
    let outbox = Arc::new(Outbox::new(
        pg.clone(),
        sink,
        OutboxSettings {
            batch_size: config.outbox.batch_size as usize,
            retry_base: config.outbox.retry_base,
            retry_max: config.outbox.retry_max,
            park_after: config.outbox.park_after,
        },
    ));
    // One budget per user, shared by every flow a bot would flood.
    let rate = Arc::new(UserRateLimit::new(
        redis.clone(),
        config
            .rate_limits
            .user
            .map(|user| Gcra::new(user.per_sec, user.burst)),
        config.rate_limits.timeout,
    ));
    let batches = WriteBatches {
        max: config.orders.write_batch_max,
        in_flight: config.orders.write_batches_in_flight,
        overlap_commit: config.orders.write_batch_overlap_commit,
        stall: config.orders.write_batch_stall,
    };
    let orders = Arc::new(Orders::new(
        pg.clone(),
        sold_out.clone(),
        config.orders.order_ttl,
        batches,
        rate.clone(),
        outbox.nudge(),
    ));
    Services {
        balances: Arc::new(Balances::new(
            pg.clone(),
            config.orders.max_balance,
            batches,
            rate.clone(),
        )),
        carts: Arc::new(Carts::new(pg.clone(), orders.clone(), rate.clone())),
        refunds: Arc::new(Refunds::new(
            pg.clone(),
            sold_out.clone(),
            popular.clone(),
            outbox.nudge(),
        )),
        catalog: Arc::new(Catalog::new(pg.clone(), reads, sold_out)),
        coupons: Arc::new(Coupons::new(
            pg.clone(),
            CouponGate::new(redis.clone()),
            config.coupons.orphan_grace,
            WriteBatches {
                max: config.coupons.record_batch_max,
                ..batches
            },
            rate.clone(),
        )),
        orders,
        payments: Arc::new(Payments::new(
            pg.clone(),
            popular.clone(),
            outbox.nudge(),
            batches,
            rate,
        )),
        popular,
        outbox,
    }
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
