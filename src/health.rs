//! `grpc.health.v1.Health`: readiness from dependency pings, liveness from the runtime.
//!
//! Names reported, all of them from start-up: `""` (overall: Postgres and Redis), one per
//! gRPC service (the dependencies it needs), and [`LIVENESS`] (the process itself, see
//! [`crate::liveness`]).
//!
//! Invariants:
//! - a dependency-aware name reads SERVING only while every dependency it needs answered its
//!   last ping: NOT_SERVING from start-up until the first ping round, and from the start of
//!   shutdown on, for good;
//! - Postgres answers only as a primary that takes writes (not a standby, not read-only), on a
//!   connection of the probe's own: calls that hold every pooled connection (commits waiting
//!   for a synchronous standby after a failover) are load, and made readiness flap when the
//!   ping waited for the pool;
//! - [`LIVENESS`] never depends on Postgres, Redis or shutdown, so a dependency outage makes pods
//!   unready, never dead;
//! - the set of names never changes, so Check answers NOT_FOUND and Watch streams
//!   SERVICE_UNKNOWN (and stays open) for any other name, as the health-checking spec says.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt, stream};
use sqlx::PgPool;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
pub use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse,
    health_server::{self, HealthServer},
};

use crate::{
    metrics, proto,
    store::{Dependency, postgres, redis::Redis},
};

/// Every `ecommerce.v1` service with the dependencies it cannot answer without; health reports
/// each service NOT_SERVING while one of its dependencies is down.
const SERVICES: &[(&str, &[Dependency])] = &[
    (
        proto::balance_service_server::SERVICE_NAME,
        &[Dependency::Postgres],
    ),
    (
        proto::product_service_server::SERVICE_NAME,
        &[Dependency::Postgres, Dependency::Redis],
    ),
    (
        proto::coupon_service_server::SERVICE_NAME,
        &[Dependency::Postgres, Dependency::Redis],
    ),
    (
        proto::order_service_server::SERVICE_NAME,
        &[Dependency::Postgres],
    ),
    (
        proto::cart_service_server::SERVICE_NAME,
        &[Dependency::Postgres],
    ),
    (
        proto::payment_service_server::SERVICE_NAME,
        &[Dependency::Postgres],
    ),
    (
        proto::admin_service_server::SERVICE_NAME,
        &[Dependency::Postgres],
    ),
];

/// The name whose status is the process's own liveness, independent of every dependency.
pub const LIVENESS: &str = "liveness";

type Ping<'a> = Pin<Box<dyn Future<Output = Result<(), crate::store::StoreError>> + Send + 'a>>;

/// The statuses of every reported name. Cloning shares them.
#[derive(Clone)]
pub struct Health {
    statuses: Arc<[(&'static str, watch::Sender<ServingStatus>)]>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Every name, dependency-aware ones NOT_SERVING (nothing has been pinged yet) and
    /// [`LIVENESS`] SERVING (the process is running).
    pub fn new() -> Self {
        let dependency_aware = std::iter::once("").chain(SERVICES.iter().map(|(name, _)| *name));
        let statuses = dependency_aware
            .map(|name| (name, ServingStatus::NotServing))
            .chain(std::iter::once((LIVENESS, ServingStatus::Serving)))
            .map(|(name, status)| (name, watch::Sender::new(status)))
            .collect();
        Self { statuses }
    }

    /// The `grpc.health.v1.Health` service answering from these statuses. Watch streams end
    /// (UNAVAILABLE) at `stop`: a stream never ends by itself, and the server's stop waits for
    /// every call in flight.
    pub fn service(&self, stop: CancellationToken) -> HealthServer<HealthService> {
        HealthServer::new(HealthService {
            health: self.clone(),
            stop,
        })
    }

    /// Sets a reported name's status; watchers hear of changes only. Callable from any thread.
    ///
    /// # Panics
    /// If `name` is not one of the reported names: the set is fixed at start-up.
    pub fn set(&self, name: &str, status: ServingStatus) {
        let sender = self
            .sender(name)
            .unwrap_or_else(|| panic!("{name:?} is not a reported health name"));
        sender.send_if_modified(|current| std::mem::replace(current, status) != status);
    }

    pub fn get(&self, name: &str) -> Option<ServingStatus> {
        self.sender(name).map(|sender| *sender.borrow())
    }

    fn sender(&self, name: &str) -> Option<&watch::Sender<ServingStatus>> {
        self.statuses
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, sender)| sender)
    }
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

pub struct HealthService {
    health: Health,
    stop: CancellationToken,
}

#[tonic::async_trait]
impl health_server::Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let status = self
            .health
            .get(&request.get_ref().service)
            .ok_or_else(|| Status::not_found("unknown service"))?;
        Ok(Response::new(response(status)))
    }

    type WatchStream = WatchStream;

    /// The current status at once, then every change. An unknown name gets SERVICE_UNKNOWN and
    /// an open stream: the spec lets a name appear later (ours never do, but a client may not
    /// tell an unknown name from a broken server by the stream ending).
    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let Some(sender) = self.health.sender(&request.get_ref().service) else {
            let unknown = stream::once(async { Ok(response(ServingStatus::ServiceUnknown)) });
            let silent = unknown.chain(stream::pending());
            return Ok(Response::new(until_stopped(silent, &self.stop)));
        };
        let updates = stream::unfold(
            (sender.subscribe(), true),
            |(mut receiver, first)| async move {
                if !first {
                    // Ends the stream only when the statuses are gone (the server is stopping).
                    receiver.changed().await.ok()?;
                }
                let status = *receiver.borrow_and_update();
                Some((Ok(response(status)), (receiver, false)))
            },
        );
        Ok(Response::new(until_stopped(updates, &self.stop)))
    }
}

/// `updates`, then UNAVAILABLE once the server stops (or the statuses are gone with it).
fn until_stopped(
    updates: impl Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static,
    stop: &CancellationToken,
) -> WatchStream {
    let stopping = stream::once(async { Err(Status::unavailable("the server is stopping")) });
    Box::pin(
        updates
            .take_until(stop.clone().cancelled_owned())
            .chain(stopping),
    )
}

/// Pings the dependencies every `interval` and sets the dependency-aware names.
pub struct HealthWatcher {
    pub health: Health,
    /// The service's pool, for its metrics.
    pub pg: PgPool,
    /// Postgres as the probe sees it, on its own connection.
    pub postgres: postgres::Probe,
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
    /// Runs until `shutdown`, then marks every dependency-aware name NOT_SERVING.
    pub async fn run(mut self, shutdown: CancellationToken) {
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
                self.report(up);
                last = Some(up);
            }
        }
        self.report(Up::default());
    }

    async fn probe(&mut self) -> Up {
        // A ping slower than the interval counts as down: callers would time out too.
        let timeout = self.interval.max(Duration::from_millis(500));
        let timed = |ping| async move {
            let started = Instant::now();
            let up = matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(())));
            (up, started.elapsed())
        };
        let ((postgres, pg_rtt), (redis, redis_rtt)) = tokio::join!(
            timed(Box::pin(self.postgres.writable()) as Ping<'_>),
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

    fn report(&self, up: Up) {
        let status = |ok: bool| {
            if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        for (service, needs) in SERVICES {
            let ok = needs.iter().all(|d| up.has(*d));
            self.health.set(service, status(ok));
        }
        self.health.set("", status(up.postgres && up.redis));
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn every_service_of_the_contract_has_its_dependencies_listed() {
        let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
        for file in set.file.iter().filter(|f| f.package() == "ecommerce.v1") {
            for service in &file.service {
                let name = format!("ecommerce.v1.{}", service.name());
                assert!(
                    SERVICES.iter().any(|(listed, _)| *listed == name),
                    "{name} is missing from health's SERVICES"
                );
            }
        }
    }

    #[test]
    fn every_name_exists_from_the_start_and_only_liveness_serves_before_a_ping() {
        let health = Health::new();
        assert_eq!(health.get(""), Some(ServingStatus::NotServing));
        for (service, _) in SERVICES {
            assert_eq!(
                health.get(service),
                Some(ServingStatus::NotServing),
                "{service}"
            );
        }
        assert_eq!(health.get(LIVENESS), Some(ServingStatus::Serving));
        assert_eq!(health.get("no.such.Service"), None);
    }

    #[tokio::test]
    async fn watch_streams_the_current_status_then_changes_and_unknown_for_other_names() {
        use health_server::Health as _;
        let health = Health::new();
        let stop = CancellationToken::new();
        let service = Arc::new(HealthService {
            health: health.clone(),
            stop: stop.clone(),
        });
        let watch = |name: &str| {
            let request = Request::new(HealthCheckRequest {
                service: name.into(),
            });
            let service = service.clone();
            async move { service.watch(request).await.unwrap().into_inner() }
        };
        async fn next(stream: &mut WatchStream) -> Option<ServingStatus> {
            let item = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
            item.ok().flatten().map(|r| r.unwrap().status())
        }

        let mut overall = watch("").await;
        assert_eq!(next(&mut overall).await, Some(ServingStatus::NotServing));
        health.set("", ServingStatus::NotServing);
        assert_eq!(next(&mut overall).await, None, "no news without a change");
        health.set("", ServingStatus::Serving);
        assert_eq!(next(&mut overall).await, Some(ServingStatus::Serving));

        let mut unknown = watch("no.such.Service").await;
        assert_eq!(
            next(&mut unknown).await,
            Some(ServingStatus::ServiceUnknown)
        );
        assert_eq!(next(&mut unknown).await, None, "the stream stays open");

        stop.cancel();
        for stream in [&mut overall, &mut unknown] {
            let ending = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
            let status = ending.unwrap().unwrap().unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unavailable);
            assert!(stream.next().await.is_none());
        }
    }
}
