//! Calls abandoned by their callers are counted as what they are: CANCELLED (the caller reset
//! the stream or went away) or DEADLINE_EXCEEDED (the server's deadline passed first), in
//! `grpc_server_handled_total`, in the access log and on the call's span; never INTERNAL or
//! UNKNOWN, which an operator's alert reads as the server failing.
//!
//! Against the server binary with the Kubernetes ConfigMap's settings (JSON logs, the access log
//! on), once with tracing off and once with tracing on (an OTLP collector in the test), every
//! write RPC of the contract (from the descriptors, so one added later is abandoned too):
//! - tonic's client abandons thousands of calls at 1-10 ms deadlines, as a caller with short
//!   deadlines does (it resets a stream whose request it may not have sent in full yet);
//! - a raw HTTP/2 client resets streams with RST_STREAM(CANCEL) in three ways: right after
//!   their HEADERS, after the first bytes of the message, and after all of it but before
//!   END_STREAM.

use std::{collections::BTreeMap, time::Duration};

use ecommerce::proto::{
    CreateCouponRequest, CreateProductRequest, Discount, FixedDiscount, ProductStatus,
    admin_service_client::AdminServiceClient, discount,
};
use futures::future::join_all;
use prost::bytes::Bytes;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::support::{
    ADMIN_TOKEN, BearerToken,
    binary::ServerProcess,
    collector::{Collector, attribute},
    contract::{Contract, Method, call},
};

/// Rounds of tonic calls; each abandons CALLS_PER_METHOD calls of every write RPC at once.
const ROUNDS: i64 = 6;
const CALLS_PER_METHOD: i64 = 40;
/// Streams reset at the HTTP/2 level, in each of the three ways.
const RESETS_PER_WAY: usize = 200;

#[sqlx::test(migrations = false)]
async fn abandoned_calls_are_cancelled_never_internal(_: PgPoolOptions, db: PgConnectOptions) {
    abandon_everything(&db, None).await;
}

#[sqlx::test(migrations = false)]
async fn abandoned_calls_are_cancelled_never_internal_with_tracing_on(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    abandon_everything(&db, Some((&collector, endpoint))).await;
}

async fn abandon_everything(
    db: &PgConnectOptions,
    tracing: Option<(&Collector, std::net::SocketAddr)>,
) {
    let mut overrides = vec![(
        "RUST_LOG",
        "info,tokio_cron_scheduler=warn,access=debug".to_string(),
    )];
    if let Some((_, endpoint)) = tracing {
        overrides.extend([
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{endpoint}")),
            // Every span of the run reaches the collector: nothing dropped from a full queue.
            ("OTEL_BSP_MAX_QUEUE_SIZE", "1000000".to_string()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200".to_string()),
        ]);
    }
    let server = ServerProcess::start(db, &overrides).await;
    fixtures(&server).await;
    let contract = Contract::load();
    let writes: Vec<&Method> = contract
        .methods
        .iter()
        .filter(|m| !m.is_read() && !m.streaming)
        .collect();
    assert!(writes.len() >= 10, "write RPCs: {writes:?}");

    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for round in 0..ROUNDS {
        let calls = writes.iter().flat_map(|method| {
            (0..CALLS_PER_METHOD).map(move |i| (method, round * CALLS_PER_METHOD + i + 1))
        });
        let outcomes = join_all(calls.map(|(method, user)| {
            let request = contract.request(&method.input, None, user);
            let deadline = Duration::from_millis(1 + user as u64 % 10);
            let channel = server.channel.clone();
            async move {
                let call = call(channel, method, request, ADMIN_TOKEN, Some(deadline));
                match tokio::time::timeout(deadline, call).await {
                    Ok(Ok(_)) => "OK".to_string(),
                    Ok(Err(status)) => format!("{:?}", status.code()),
                    Err(_) => "abandoned".to_string(),
                }
            }
        }))
        .await;
        for outcome in outcomes {
            *answered.entry(outcome).or_default() += 1;
        }
    }
    eprintln!("tonic calls, as their callers saw them: {answered:?}");
    let after_tonic = settled(&server).await;
    eprintln!("recorded by the server: {after_tonic:?}");

    for way in [
        Reset::AfterHeaders,
        Reset::AfterFirstBytes,
        Reset::BeforeEndStream,
    ] {
        reset_streams(&server, &contract, &writes, way).await;
    }
    let counts = settled(&server).await;
    let log = server.stop().await;
    // Each reset stream is one call, abandoned before it was answered (even the ones whose
    // whole message arrived: without END_STREAM the request is not over).
    let mut reset = counts.clone();
    for (code, n) in &after_tonic {
        *reset.get_mut(code).unwrap() -= n;
    }
    reset.retain(|_, n| *n > 0);
    assert_eq!(
        reset,
        BTreeMap::from([("CANCELLED".to_string(), 3 * RESETS_PER_WAY as u64)]),
        "the streams reset at the HTTP/2 level, as recorded"
    );

    let logged = access_log_codes(&log);
    assert_eq!(
        logged, counts,
        "the access log has one line per call counted"
    );
    let spans = tracing.map(|(collector, _)| server_span_codes(collector));
    eprintln!("server spans by code: {spans:?}");
    for code in ["INTERNAL", "UNKNOWN"] {
        assert_eq!(counts.get(code), None, "{code} in the metrics: {counts:?}");
        if let Some(spans) = &spans {
            assert_eq!(spans.get(code), None, "{code} on spans: {spans:?}");
        }
    }
    if let Some(spans) = spans {
        // (The exporter may lose its first batch, sent while it connects: a few calls of the
        // tonic phase can lack their span; the resets come later.)
        assert!(
            spans.get("CANCELLED").copied().unwrap_or(0) >= 3 * RESETS_PER_WAY as u64,
            "the calls counted CANCELLED have spans that say so: {spans:?}, {counts:?}"
        );
    }
}

/// `grpc_server_handled_total` by code once every call the server took up is recorded: when
/// the counts stop moving.
async fn settled(server: &ServerProcess) -> BTreeMap<String, u64> {
    let mut last = handled(&server.metrics().await);
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = handled(&server.metrics().await);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the counts kept moving: {last:?}");
}

/// A product and a coupon with id 1, so that the calls (whose ids are all 1, the built requests'
/// value) do real work: reservations, the coupon gate, group commits.
async fn fixtures(server: &ServerProcess) {
    let mut admin = AdminServiceClient::with_interceptor(
        server.channel.clone(),
        BearerToken::new(Some(format!("Bearer {ADMIN_TOKEN}"))),
    );
    admin
        .create_product(CreateProductRequest {
            name: "abandoned".into(),
            price: 1,
            stock: 1_000_000,
            status: ProductStatus::Selling.into(),
            idempotency_key: String::new(),
        })
        .await
        .expect("product 1");
    let now = chrono::Utc::now().timestamp();
    let at = |seconds| prost_types::Timestamp { seconds, nanos: 0 };
    admin
        .create_coupon(CreateCouponRequest {
            name: "abandoned".into(),
            discount: Some(Discount {
                kind: Some(discount::Kind::Fixed(FixedDiscount { amount: 1 })),
            }),
            min_order_amount: 0,
            total_quantity: 1_000_000,
            issue_starts_at: Some(at(now - 3_600)),
            issue_ends_at: Some(at(now + 86_400)),
            valid_days: 1,
            idempotency_key: String::new(),
        })
        .await
        .expect("coupon 1");
}

#[derive(Clone, Copy, Debug)]
enum Reset {
    AfterHeaders,
    AfterFirstBytes,
    BeforeEndStream,
}

/// RESETS_PER_WAY streams over the write RPCs in turn, each reset with CANCEL the given way,
/// all on one HTTP/2 connection, as an independent client would.
async fn reset_streams(
    server: &ServerProcess,
    contract: &Contract,
    writes: &[&Method],
    way: Reset,
) {
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    let driver = tokio::spawn(connection);
    let streams = (0..RESETS_PER_WAY).map(|i| {
        let method = writes[i % writes.len()];
        let message = contract.request(&method.input, None, 100_000 + i as i64);
        let mut frame = vec![0];
        frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
        frame.extend_from_slice(&message);
        let request = http::Request::post(format!("http://{}{}", server.addr, method.path()))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(())
            .unwrap();
        let client = client.clone();
        async move {
            let mut client = client.ready().await.expect("the connection takes streams");
            let (_response, mut stream) = client.send_request(request, false).expect("HEADERS");
            let sent = match way {
                Reset::AfterHeaders => None,
                Reset::AfterFirstBytes => Some(Bytes::copy_from_slice(&frame[..frame.len() / 2])),
                Reset::BeforeEndStream => Some(Bytes::from(frame)),
            };
            if let Some(bytes) = sent {
                stream.send_data(bytes, false).expect("DATA");
                // Long enough for the bytes to reach the server before the reset does.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stream.send_reset(h2::Reason::CANCEL);
        }
    });
    join_all(streams).await;
    // Open until the server has taken up every stream: a connection closed first would take
    // with it the streams the server had not accepted yet.
    settled(server).await;
    drop(client);
    driver.abort();
}

/// `grpc_server_handled_total` of the ecommerce.v1 methods, summed by code.
fn handled(metrics: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in metrics.lines() {
        if !line.starts_with("grpc_server_handled_total{")
            || !line.contains("grpc_service=\"ecommerce.v1.")
        {
            continue;
        }
        let code = line
            .split("grpc_code=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("a grpc_code label");
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        *counts.entry(code.to_string()).or_default() += value as u64;
    }
    counts
}

/// The access log's lines for ecommerce.v1 calls (JSON, target `access`), counted by code.
fn access_log_codes(log: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in log.lines() {
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if entry["target"] != "access"
            || !entry["method"]
                .as_str()
                .unwrap_or("")
                .starts_with("/ecommerce.v1.")
        {
            continue;
        }
        let code = entry["code"].as_str().expect("a code");
        *counts.entry(code_name(code)).or_default() += 1;
    }
    counts
}

/// tonic's `Code` as Debug prints it (`DeadlineExceeded`) in the gRPC spelling (`DEADLINE_EXCEEDED`).
fn code_name(debug: &str) -> String {
    let mut name = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// The server spans of ecommerce.v1 calls, counted by their `rpc.status_code`. They carry the
/// current RPC conventions only (no `OTEL_SEMCONV_STABILITY_OPT_IN` here): the older integer
/// `rpc.grpc.status_code` is absent.
fn server_span_codes(collector: &Collector) -> BTreeMap<String, u64> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let spans = collector.spans.lock().unwrap();
    let mut counts = BTreeMap::new();
    for span in spans.iter().filter(|s| s.name.starts_with("ecommerce.v1.")) {
        assert_eq!(attribute(span, "rpc.grpc.status_code"), None, "{span:?}");
        let code = match attribute(span, "rpc.status_code") {
            Some(Value::StringValue(code)) => code.clone(),
            other => format!("{other:?}"),
        };
        *counts.entry(code).or_default() += 1;
    }
    counts
}
