//! Traces: a call sent with a W3C `traceparent` arrives at an OTLP collector as spans of that
//! trace, the server span a child of the caller's span, with its status and ErrorInfo reason.
//!
//! A test binary of its own: the tracing subscriber and the exporter are process-wide and
//! installed once, so this process must install them with tracing on (the `it` binary's
//! servers run with tracing off).

#[allow(dead_code, unused_imports)]
#[path = "../it/support/mod.rs"]
mod support;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use ecommerce::proto::{IssueCouponRequest, OrderLine, PayRequest, PlaceOrderRequest};
use opentelemetry_proto::tonic::{common::v1::any_value::Value, trace::v1::Span};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::TcpListener;
use tonic::{Code, Request};

use crate::support::{
    TestApp,
    collector::{Collector, attribute},
    contract::{Method, RawCodec},
    coupons::create_coupon,
    eventually,
    shop::{charge, create_product},
    spawn_app_with,
};

fn names(spans: &[Span]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A PlaceOrder carrying `traceparent` for this trace and parent span.
fn traced(
    request: PlaceOrderRequest,
    trace_id: &[u8; 16],
    parent: &[u8; 8],
) -> Request<PlaceOrderRequest> {
    let mut request = Request::new(request);
    let header = format!("00-{}-{}-01", hex(trace_id), hex(parent));
    request
        .metadata_mut()
        .insert("traceparent", header.parse().unwrap());
    request
}

#[sqlx::test(migrations = false)]
// One test only: the exporter is process-wide and bound to the runtime of the test that
// installed it, so every scenario runs inside this one.
async fn a_call_with_a_traceparent_arrives_as_spans_of_that_trace(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let platform = Platform::default();
    let platform_addr = platform.start().await;
    let app = spawn_app_with(db, |s| {
        s.set("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{endpoint}"))
            .set("DATA_PLATFORM_SINK", "http")
            .set(
                "DATA_PLATFORM_URL",
                format!("http://{platform_addr}/events"),
            )
            .set("OUTBOX_INTERVAL_SECS", 1)
            // Both generations of RPC attributes (tests/it/abandoned.rs sees the default).
            .set("OTEL_SEMCONV_STABILITY_OPT_IN", "http,rpc/dup");
    })
    .await;
    let product = create_product(&app, "traced", 1_000, 10).await;
    charge(&app, 1, 10_000).await;

    let placed = [0x4b; 16];
    let parent = [0x11; 8];
    let order = PlaceOrderRequest {
        user_id: 1,
        items: vec![OrderLine {
            product_id: product,
            quantity: 1,
        }],
        ..Default::default()
    };
    let placed_order = app
        .orders()
        .place_order(traced(order.clone(), &placed, &parent))
        .await
        .expect("placed")
        .into_inner();
    let refused = [0x5c; 16];
    let unknown = PlaceOrderRequest {
        items: vec![OrderLine {
            product_id: 999_999,
            quantity: 1,
        }],
        ..order
    };
    let status = app
        .orders()
        .place_order(traced(unknown, &refused, &parent))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // The batch exporter sends every few seconds.
    assert!(
        eventually(Duration::from_secs(20), || async {
            !collector.of_trace(&placed).is_empty() && !collector.of_trace(&refused).is_empty()
        })
        .await,
        "the collector received the two traces"
    );
    let server = |trace: &[u8]| {
        collector
            .of_trace(trace)
            .into_iter()
            .find(|s| s.name == "ecommerce.v1.OrderService/PlaceOrder")
            .unwrap_or_else(|| panic!("no server span in {:?}", collector.of_trace(trace)))
    };
    let ok = server(&placed);
    assert_eq!(ok.parent_span_id, parent, "a child of the caller's span");
    let text = |value: &str| Some(Value::StringValue(value.into()));
    let port = i64::from(app.addr.port());
    // OpenTelemetry's current RPC conventions ...
    for (key, value) in [
        ("rpc.system.name", text("grpc")),
        ("rpc.method", text("ecommerce.v1.OrderService/PlaceOrder")),
        ("rpc.status_code", text("OK")),
        ("server.address", text("127.0.0.1")),
        ("server.port", Some(Value::IntValue(port))),
        ("error.type", None),
        // ... and, asked for with rpc/dup, the older ones.
        ("rpc.system", text("grpc")),
        ("rpc.service", text("ecommerce.v1.OrderService")),
        ("rpc.grpc.status_code", Some(Value::IntValue(0))),
    ] {
        assert_eq!(attribute(&ok, key).cloned(), value, "{key}");
    }
    // The use case is the call's child; its Postgres work is done by a group-commit batch: a
    // trace of its own, linked to the call's span, whose statements and commit are the batch's
    // children.
    let trace = collector.of_trace(&placed);
    let place = trace
        .iter()
        .find(|s| s.name == "orders.place")
        .unwrap_or_else(|| panic!("no orders.place span in {:?}", names(&trace)));
    assert_eq!(
        place.parent_span_id, ok.span_id,
        "orders.place is the call's child"
    );
    let batch_of_call = || {
        let spans = collector.spans.lock().unwrap();
        spans
            .iter()
            .find(|s| {
                s.name == "orders.place_batch"
                    && s.links
                        .iter()
                        .any(|l| l.trace_id == placed && l.span_id == place.span_id)
            })
            .cloned()
    };
    assert!(
        eventually(Duration::from_secs(20), || async {
            batch_of_call().is_some_and(|batch| {
                collector
                    .of_trace(&batch.trace_id)
                    .iter()
                    .any(|s| s.name == "postgres.commit")
            })
        })
        .await,
        "a batch linked to orders.place, with its commit"
    );
    let batch = batch_of_call().unwrap();
    assert_ne!(batch.trace_id, placed, "the batch is a trace of its own");
    let batch_trace = collector.of_trace(&batch.trace_id);
    for step in ["orders.lock_batch", "orders.write_batch", "postgres.commit"] {
        let span = batch_trace
            .iter()
            .find(|s| s.name == step)
            .unwrap_or_else(|| panic!("no {step} span in {:?}", names(&batch_trace)));
        assert_eq!(
            span.parent_span_id, batch.span_id,
            "{step} is a child of the batch"
        );
        assert_eq!(
            attribute(span, "db.system"),
            Some(&Value::StringValue("postgresql".into())),
            "{step}"
        );
    }
    let failed = server(&refused);
    for (key, value) in [
        ("rpc.status_code", text("NOT_FOUND")),
        (
            "rpc.grpc.status_code",
            Some(Value::IntValue(Code::NotFound as i64)),
        ),
        ("error.reason", text("PRODUCT_NOT_FOUND")),
        // A refusal, not a server error: no error.type, no ERROR status.
        ("error.type", None),
    ] {
        assert_eq!(attribute(&failed, key).cloned(), value, "{key}");
    }
    an_unknown_method_is_other(&app, &collector).await;

    a_coupon_call_leads_to_its_gate_script_and_the_batch_that_recorded_it(&app, &collector).await;
    a_payment_trace_reaches_the_data_platform(
        &app,
        &collector,
        &platform,
        placed_order.order.expect("the order").id,
        &placed,
    )
    .await;
    app.stop().await;
}

/// A call of a method the server does not serve: a span named `grpc`, `rpc.method` `_OTHER`
/// (so that a caller cannot make up span names), the path in `rpc.method_original`, and
/// UNIMPLEMENTED as a server error.
async fn an_unknown_method_is_other(app: &TestApp, collector: &Collector) {
    let trace_id = [0x3a; 16];
    let method = Method {
        service: "ecommerce.v1.NoSuchService".into(),
        name: "Call".into(),
        input: String::new(),
        output: String::new(),
        streaming: false,
    };
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.unwrap();
    let mut request = Request::new(Vec::new());
    let header = format!("00-{}-{}-01", hex(&trace_id), hex(&[0x44; 8]));
    request
        .metadata_mut()
        .insert("traceparent", header.parse().unwrap());
    let status = grpc
        .unary(request, method.path().parse().unwrap(), RawCodec)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(
        eventually(Duration::from_secs(20), || async {
            !collector.of_trace(&trace_id).is_empty()
        })
        .await,
        "the collector received the call"
    );
    let span = collector.of_trace(&trace_id).remove(0);
    assert_eq!(span.name, "grpc");
    let text = |value: &str| Some(Value::StringValue(value.into()));
    for (key, value) in [
        ("rpc.method", text("_OTHER")),
        (
            "rpc.method_original",
            text("ecommerce.v1.NoSuchService/Call"),
        ),
        ("rpc.status_code", text("UNIMPLEMENTED")),
        ("error.type", text("UNIMPLEMENTED")),
    ] {
        assert_eq!(attribute(&span, key).cloned(), value, "{key}");
    }
}

/// A coupon call leads to its gate script and to the batch that recorded its winner.
async fn a_coupon_call_leads_to_its_gate_script_and_the_batch_that_recorded_it(
    app: &TestApp,
    collector: &Collector,
) {
    let coupon = create_coupon(app, 10).await;
    let trace_id = [0x6d; 16];
    let mut request = Request::new(IssueCouponRequest {
        coupon_id: coupon,
        user_id: 7,
    });
    let header = format!("00-{}-{}-01", hex(&trace_id), hex(&[0x22; 8]));
    request
        .metadata_mut()
        .insert("traceparent", header.parse().unwrap());
    app.coupons().issue_coupon(request).await.expect("issued");

    let find = |name: &'static str| {
        let collector = collector.clone();
        move || {
            let spans = collector.spans.lock().unwrap();
            spans.iter().find(|s| s.name == name).cloned()
        }
    };
    assert!(
        eventually(Duration::from_secs(20), || async {
            find("coupons.record_batch")().is_some() && !collector.of_trace(&trace_id).is_empty()
        })
        .await,
        "the collector received the call and its batch"
    );
    let trace = collector.of_trace(&trace_id);
    let decide = trace
        .iter()
        .find(|s| s.name == "coupon_gate.decide")
        .unwrap_or_else(|| panic!("no gate span in {:?}", names(&trace)));
    assert_eq!(
        attribute(decide, "db.system"),
        Some(&Value::StringValue("redis".into()))
    );
    let record = trace
        .iter()
        .find(|s| s.name == "coupons.record")
        .unwrap_or_else(|| panic!("no record span in {:?}", names(&trace)));
    // The batch is a trace of its own, linked to every call it served.
    let batch = find("coupons.record_batch")().unwrap();
    assert_ne!(batch.trace_id, trace_id);
    assert!(
        batch
            .links
            .iter()
            .any(|l| l.trace_id == trace_id && l.span_id == record.span_id),
        "the batch links the call's record span: {:?}",
        batch.links
    );
    let batch_steps = collector.of_trace(&batch.trace_id);
    assert!(
        batch_steps
            .iter()
            .any(|s| s.name == "coupons.insert_winners"),
        "the batch's insert: {:?}",
        names(&batch_steps)
    );
}

/// An event as the platform received it, with its request's `traceparent` header.
type Delivered = (Option<String>, serde_json::Value);

/// The data platform's HTTP receiver: keeps each request's `traceparent` header and events.
#[derive(Clone, Default)]
struct Platform {
    received: Arc<Mutex<Vec<Delivered>>>,
}

impl Platform {
    async fn start(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = self.received.clone();
        let receive =
            move |headers: axum::http::HeaderMap,
                  axum::Json(batch): axum::Json<serde_json::Value>| {
                let received = received.clone();
                async move {
                    let header = headers
                        .get("traceparent")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let mut received = received.lock().unwrap();
                    for event in batch.as_array().cloned().unwrap_or_default() {
                        received.push((header.clone(), event));
                    }
                    axum::http::StatusCode::OK
                }
            };
        let app = axum::Router::new().route("/events", axum::routing::post(receive));
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }
}

/// A Pay sent with a `traceparent`: its event reaches the data platform carrying that trace,
/// and the delivery's span (named by the request's header) links to it. The order's
/// OrderPlaced event, written by a group-commit batch, carries the placing call's trace
/// (`placed`), not the batch's.
async fn a_payment_trace_reaches_the_data_platform(
    app: &TestApp,
    collector: &Collector,
    platform: &Platform,
    order_id: i64,
    placed: &[u8; 16],
) {
    let trace_id = [0x7e; 16];
    let mut request = Request::new(PayRequest {
        user_id: 1,
        order_id,
        ..Default::default()
    });
    let header = format!("00-{}-{}-01", hex(&trace_id), hex(&[0x33; 8]));
    request
        .metadata_mut()
        .insert("traceparent", header.parse().unwrap());
    app.payments().pay(request).await.expect("paid");

    let subject = order_id.to_string();
    let event_of = |event_type: &str| {
        let cloud_type = format!("ecommerce.v1.{event_type}");
        platform
            .received
            .lock()
            .unwrap()
            .iter()
            .find(|(_, e)| e["type"] == cloud_type.as_str() && e["subject"] == subject.as_str())
            .cloned()
    };
    let event = || event_of("PaymentCompleted");
    assert!(
        eventually(Duration::from_secs(20), || async { event().is_some() }).await,
        "the payment's event reached the platform"
    );
    let (_, placed_event) = event_of("OrderPlaced").expect("the order's event too");
    let placing = placed_event["traceparent"]
        .as_str()
        .expect("the OrderPlaced event carries its trace");
    assert_eq!(
        placing.split('-').nth(1),
        Some(hex(placed).as_str()),
        "the OrderPlaced event continues the placing call's trace: {placing}"
    );
    let (delivery_header, event) = event().unwrap();
    let carried = event["traceparent"]
        .as_str()
        .expect("the event carries its trace");
    assert_eq!(
        carried.split('-').nth(1),
        Some(hex(&trace_id).as_str()),
        "the event continues the payment's trace: {carried}"
    );
    let delivery_header = delivery_header.expect("the request carries the delivery's trace");
    let delivery_trace = delivery_header.split('-').nth(1).unwrap().to_owned();
    assert!(
        eventually(Duration::from_secs(20), || async {
            let spans = collector.spans.lock().unwrap();
            spans.iter().any(|s| {
                s.name == "outbox.deliver"
                    && hex(&s.trace_id) == delivery_trace
                    && s.links.iter().any(|l| l.trace_id == trace_id)
            })
        })
        .await,
        "an outbox.deliver span in the header's trace, linked to the payment's trace"
    );
}
