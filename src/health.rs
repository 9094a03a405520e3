//! Dependency health: pings Postgres and Redis on an interval and reports each gRPC service
//! SERVING or NOT_SERVING through `grpc.health.v1.Health`, overall (`""`) and per service.
//!
//! Invariant: a service reads SERVING only while every dependency it needs answered its last
//! ping; once shutdown begins, everything reads NOT_SERVING and stays so.

use std::{future::Future, pin::Pin, time::Duration};

use tokio::time::Instant;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    grpc::SERVICES,
    metrics,
    store::{Dependency, postgres, redis::Redis},
};

type Ping<'a> = Pin<Box<dyn Future<Output = Result<(), crate::store::StoreError>> + Send + 'a>>;

pub struct HealthWatcher {
    pub reporter: HealthReporter,
    pub pg: PgPool,
    pub redis: Redis,
    pub interval: Duration,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Up {
    postgres: bool,
    redis: bool,
}

impl Up {
    fn has(self, dependency: Dependency) -> bool {
        match dependency {
            Dependency::Postgres => self.postgres,
            Dependency::Redis => self.redis,
        }
    }
}

impl HealthWatcher {
    /// Runs until `shutdown`, then marks everything NOT_SERVING.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut last: Option<Up> = None;
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let up = tokio::select! {
                _ = shutdown.cancelled() => break,
                up = self.probe() => up,
            };
            if last != Some(up) {
                if up.postgres && up.redis {
                    tracing::info!("dependencies reachable: serving");
                } else {
                    tracing::warn!(
                        postgres = up.postgres,
                        redis = up.redis,
                        "a dependency is unreachable: not serving"
                    );
                }
                self.report(up).await;
                last = Some(up);
            }
        }
        self.report(Up::default()).await;
    }

    async fn probe(&self) -> Up {
        // A ping slower than the interval counts as down: callers would time out too.
        let timeout = self.interval.max(Duration::from_millis(500));
        let timed = |ping| async move {
            let started = Instant::now();
            let up = matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(())));
            (up, started.elapsed())
        };
        let ((postgres, pg_rtt), (redis, redis_rtt)) = tokio::join!(
            timed(Box::pin(postgres::ping(&self.pg)) as Ping<'_>),
            timed(Box::pin(self.redis.ping()) as Ping<'_>),
        );
        metrics::dependency_ping("postgres", postgres, pg_rtt);
        metrics::dependency_ping("redis", redis, redis_rtt);
        let options = self.pg.options();
        metrics::db_pool(
            self.pg.size(),
            self.pg.num_idle(),
            options.get_max_connections(),
        );
        Up { postgres, redis }
    }

    async fn report(&self, up: Up) {
        let status = |ok: bool| {
            if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        for (service, needs) in SERVICES {
            let ok = needs.iter().all(|d| up.has(*d));
            self.reporter.set_service_status(*service, status(ok)).await;
        }
        self.reporter
            .set_service_status("", status(up.postgres && up.redis))
            .await;
    }
}
