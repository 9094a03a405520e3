//! Prometheus metrics, served on their own port (`METRICS_ADDR`, `/metrics`).
//!
//! The recorder is process-wide (installed once). Per-call metrics go through a table built
//! from the service descriptors, so recording a call costs one hash lookup and two atomic
//! updates: no allocation, no lock. Unknown paths share one `other` row, so a caller cannot
//! create series at will.

use std::{
    collections::HashMap,
    sync::{LazyLock, OnceLock},
    time::Duration,
};

pub use metrics::Counter;
use metrics::{Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use prost::Message;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::error::{AppError, code_name};

/// Latency buckets, in seconds: sub-millisecond Redis answers up to slow database calls.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Calls per write batch: one alone up to the largest batch any flow allows.
const BATCH_SIZES: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// Installs the process-wide recorder (once) and returns its handle.
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("seconds".into()), BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(WRITE_BATCH_CALLS.into()), BATCH_SIZES)
            })
            .and_then(PrometheusBuilder::install_recorder)
            .unwrap_or_else(|e| {
                // Another recorder is installed (an embedding program's): ours still renders,
                // it just sees nothing.
                tracing::warn!(error = %e, "metrics recorder not installed");
                PrometheusBuilder::new().build_recorder().handle()
            });
        register_rare_events();
        handle
    })
}

/// Counters of events that may never happen are exported at 0 from the start, so a dashboard
/// or an alert (`increase(...) > 0`) sees a series before the first event, not a gap.
fn register_rare_events() {
    counter!("ecommerce_runtime_stalls_total").increment(0);
    for reason in [
        ConnectionClosed::Peer,
        ConnectionClosed::MaxAge,
        ConnectionClosed::MaxAgeGrace,
        ConnectionClosed::Shutdown,
    ] {
        counter!("grpc_server_connections_closed_total", "reason" => reason.label()).increment(0);
    }
}

/// Serves `/metrics` on `listener` until `shutdown`, and keeps histogram buffers drained.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    let handle = recorder();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || async move { handle.render() }),
    );
    let upkeep = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => handle.run_upkeep(),
                }
            }
        }
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "metrics endpoint stopped");
    }
    upkeep.abort();
}

/// The metrics of one gRPC method. Series are registered on first use.
struct MethodMetrics {
    service: &'static str,
    method: &'static str,
    calls: [OnceLock<Counter>; 17],
    latency: OnceLock<Histogram>,
}

impl MethodMetrics {
    fn new(service: &'static str, method: &'static str) -> Self {
        Self {
            service,
            method,
            calls: Default::default(),
            latency: OnceLock::new(),
        }
    }

    fn record(&self, code: Code, latency: Duration) {
        let (service, method) = (self.service, self.method);
        let slot = (code as usize).min(16);
        self.calls[slot]
            .get_or_init(|| {
                counter!("grpc_server_handled_total",
                    "grpc_service" => service, "grpc_method" => method,
                    "grpc_code" => code_name(code))
            })
            .increment(1);
        self.latency
            .get_or_init(|| {
                histogram!("grpc_server_handling_seconds",
                    "grpc_service" => service, "grpc_method" => method)
            })
            .record(latency.as_secs_f64());
    }
}

struct CallTable {
    by_path: HashMap<&'static str, MethodMetrics>,
    other: MethodMetrics,
}

/// Every method of the services this server answers, from their descriptors.
static CALLS: LazyLock<CallTable> = LazyLock::new(|| {
    let mut by_path = HashMap::new();
    for encoded in [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(encoded) else {
            continue;
        };
        for file in set.file {
            for service in &file.service {
                let full = leak(format!("{}.{}", file.package(), service.name()));
                for method in &service.method {
                    let name = leak(method.name().to_owned());
                    let path = leak(format!("/{full}/{name}"));
                    by_path.insert(path, MethodMetrics::new(full, name));
                }
            }
        }
    }
    CallTable {
        by_path,
        other: MethodMetrics::new("other", "other"),
    }
});

/// The table lives for the whole process; its names are built once.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Whether `path` is a method this server answers (`/ecommerce.v1.OrderService/PlaceOrder`).
pub fn is_served(path: &str) -> bool {
    CALLS.by_path.contains_key(path)
}

/// Records one finished call.
pub fn record_call(path: &str, code: Code, latency: Duration) {
    let table = &*CALLS;
    table
        .by_path
        .get(path)
        .unwrap_or(&table.other)
        .record(code, latency);
}

/// `ok`, or the ErrorInfo reason of the failure: the outcome label of the business counters.
pub fn outcome<T>(result: &Result<T, AppError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => e.code_and_reason().1,
    }
}

/// An error answered to a caller, by gRPC code and ErrorInfo reason.
pub fn error_answered(code: Code, reason: &'static str) {
    counter!("ecommerce_errors_total", "code" => code_name(code), "reason" => reason).increment(1);
}

pub fn coupon_issue(outcome: &'static str) {
    counter!("ecommerce_coupon_issue_total", "outcome" => outcome).increment(1);
}

/// A coupon gate rebuilt (or, for `orphan`, repaired) by this process, by reason.
pub fn coupon_gate_rebuild(reason: &'static str) {
    counter!("ecommerce_coupon_gate_rebuilds_total", "reason" => reason).increment(1);
}

/// Exports the repair counters at 0 before their first event (see `register_rare_events`).
pub fn coupon_repairs_registered(reasons: impl IntoIterator<Item = &'static str>) {
    for reason in reasons {
        counter!("ecommerce_coupon_gate_rebuilds_total", "reason" => reason).increment(0);
    }
    counter!("ecommerce_coupon_orphans_released_total").increment(0);
}

/// An orphaned coupon win released by the call that met it.
pub fn coupon_orphan_released() {
    counter!("ecommerce_coupon_orphans_released_total").increment(1);
}

/// The counter of one limited method's calls refused by the user's rate budget; registered
/// once per method, so a refusal costs one atomic add.
pub fn rate_limited(method: &'static str) -> Counter {
    counter!("ecommerce_rate_limited_total", "method" => method)
}

/// The counter of one limited method's calls let through unchecked because the rate check
/// did not answer in time.
pub fn rate_limit_fail_open(method: &'static str) -> Counter {
    counter!("ecommerce_rate_limit_fail_open_total", "method" => method)
}

pub fn order_placed(outcome: &'static str) {
    counter!("ecommerce_orders_placed_total", "outcome" => outcome).increment(1);
}

/// A cart checkout, by outcome (its order is not counted again as placed).
pub fn checkout(outcome: &'static str) {
    counter!("ecommerce_checkouts_total", "outcome" => outcome).increment(1);
}

pub fn payment(outcome: &'static str) {
    counter!("ecommerce_payments_total", "outcome" => outcome).increment(1);
}

pub fn refund(outcome: &'static str) {
    counter!("ecommerce_refunds_total", "outcome" => outcome).increment(1);
}

/// A payment's ranking bump that a rebuild's snapshot had already counted: without the
/// snapshot it would have been counted twice.
pub fn ranking_bump_already_counted() {
    counter!("ecommerce_ranking_bumps_already_counted_total").increment(1);
}

/// Bumps a rebuild carried over because its snapshot did not see their payments: replacing the
/// bucket with the snapshot's counts alone would have erased them.
pub fn ranking_bumps_carried(carried: usize) {
    counter!("ecommerce_ranking_bumps_carried_total").increment(carried as u64);
}

pub fn outbox_delivery(delivered: usize, failed: usize, parked: usize) {
    counter!("ecommerce_outbox_delivered_total").increment(delivered as u64);
    counter!("ecommerce_outbox_delivery_failures_total").increment(failed as u64);
    counter!("ecommerce_outbox_parked_total").increment(parked as u64);
}

pub fn outbox_backlog(pending: i64, parked: i64) {
    gauge!("ecommerce_outbox_backlog", "status" => "pending").set(pending as f64);
    gauge!("ecommerce_outbox_backlog", "status" => "parked").set(parked as f64);
}

/// A read that may be stale was served by a standby or the primary.
pub fn db_read(source: &'static str) {
    counter!("ecommerce_db_stale_ok_reads_total", "source" => source).increment(1);
}

pub fn db_pool(size: u32, idle: usize, max: u32) {
    gauge!("ecommerce_db_pool_connections", "state" => "idle").set(idle as f64);
    gauge!("ecommerce_db_pool_connections", "state" => "in_use").set(f64::from(size) - idle as f64);
    gauge!("ecommerce_db_pool_max_connections").set(f64::from(max));
}

const WRITE_BATCH_CALLS: &str = "ecommerce_write_batch_calls";

/// One write batch of `flow` (`orders.place_batch`) ended: how many calls it carried, how long
/// its oldest call had queued before the batch started (behind the batch holding the flow's
/// turn, for a slot, or for the batcher), and how long the batch took to commit and answer.
/// Recorded once per batch, not per call.
pub fn write_batch(flow: &'static str, calls: usize, waited: Duration, took: Duration) {
    histogram!(WRITE_BATCH_CALLS, "flow" => flow).record(calls as f64);
    histogram!("ecommerce_write_batch_wait_seconds", "flow" => flow).record(waited.as_secs_f64());
    histogram!("ecommerce_write_batch_seconds", "flow" => flow).record(took.as_secs_f64());
}

/// The liveness watchdog found the runtime not running its heartbeat.
pub fn runtime_stall() {
    counter!("ecommerce_runtime_stalls_total").increment(1);
}

/// Why the server's side of a gRPC connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionClosed {
    /// The client closed it, or it broke.
    Peer,
    /// GOAWAY at the connection's age, and its calls finished within the grace.
    MaxAge,
    /// GOAWAY at the connection's age, and calls were still running when the grace ran out.
    MaxAgeGrace,
    /// The server stopped.
    Shutdown,
}

impl ConnectionClosed {
    fn label(self) -> &'static str {
        match self {
            Self::Peer => "peer",
            Self::MaxAge => "max_age",
            Self::MaxAgeGrace => "max_age_grace",
            Self::Shutdown => "shutdown",
        }
    }
}

pub fn connection_opened() {
    gauge!("grpc_server_connections_open").increment(1.0);
}

pub fn connection_closed(reason: ConnectionClosed) {
    gauge!("grpc_server_connections_open").decrement(1.0);
    counter!("grpc_server_connections_closed_total", "reason" => reason.label()).increment(1);
}

pub fn dependency_ping(dependency: &'static str, up: bool, round_trip: Duration) {
    gauge!("ecommerce_dependency_up", "dependency" => dependency).set(if up { 1.0 } else { 0.0 });
    if up {
        histogram!("ecommerce_dependency_ping_seconds", "dependency" => dependency)
            .record(round_trip.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_method_has_a_row() {
        for path in [
            "/ecommerce.v1.CouponService/IssueCoupon",
            "/ecommerce.v1.AdminService/CreateCoupon",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(CALLS.by_path.contains_key(path), "{path}");
        }
        let row = &CALLS.by_path["/ecommerce.v1.PaymentService/Pay"];
        assert_eq!(
            (row.service, row.method),
            ("ecommerce.v1.PaymentService", "Pay")
        );
        assert!(!CALLS.by_path.contains_key("/made.up/Path"));
    }

    #[test]
    fn every_code_has_a_slot() {
        for code in 0..=16 {
            assert_ne!(code_name(Code::from_i32(code)), "");
        }
    }
}
