//! Stand-ins for the data platform: a real HTTP receiver of CloudEvents batches, and a reader
//! of the JetStream stream the NATS sink publishes to; and the checks both sides share: the
//! CloudEvents attributes of an event, and its payload parsed as its events.proto message.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use async_nats::jetstream;
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header::CONTENT_TYPE},
    routing::post,
};
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, ReflectMessage};
use tokio::{net::TcpListener, task::JoinHandle};

use super::TestSettings;

/// The CloudEvents `source` every test server sends (its default).
pub const SOURCE: &str = "/ecommerce";

/// What the HTTP receiver saw. It answers 503 while `down`, 500 to the first `fail_first`
/// deliveries, 400 to any batch holding an event of `refuse_user`, and records the events of
/// the batches it accepts.
#[derive(Default)]
pub struct Received {
    pub calls: usize,
    pub fail_first: usize,
    pub down: bool,
    pub refuse_user: Option<i64>,
    /// Sizes of the batches answered 400.
    pub refused_batches: Vec<usize>,
    /// The events of the accepted batches, in the JSON event format, in arrival order.
    pub events: Vec<serde_json::Value>,
}

pub type Shared = Arc<Mutex<Received>>;

/// One POST: a CloudEvents batch (HTTP binding, batched content mode).
async fn receive(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mut received = state.lock().unwrap();
    received.calls += 1;
    if received.down {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if received.calls <= received.fail_first {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    assert_eq!(
        content_type,
        Some("application/cloudevents-batch+json; charset=utf-8"),
        "the batched content mode's media type"
    );
    let batch: Vec<serde_json::Value> =
        serde_json::from_slice(&body).expect("a batch is a JSON array of events");
    if let Some(user) = received.refuse_user
        && batch.iter().any(|e| e["data"]["user_id"] == user)
    {
        received.refused_batches.push(batch.len());
        return StatusCode::BAD_REQUEST;
    }
    received.events.extend(batch);
    StatusCode::OK
}

pub async fn start_receiver(listener: TcpListener, state: Shared) -> JoinHandle<()> {
    let app = Router::new()
        .route("/events", post(receive))
        .with_state(state);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

/// Starts the receiver on an address reserved earlier, where nothing answered until now.
pub async fn start_receiver_at(addr: SocketAddr, state: Shared) -> JoinHandle<()> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    start_receiver(socket.listen(64).unwrap(), state).await
}

/// The distinct event ids received (a re-sent event counts once).
pub fn unique_ids(state: &Shared) -> HashSet<String> {
    state
        .lock()
        .unwrap()
        .events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The events received of one type (`PaymentCompleted`), in arrival order.
pub fn events_of(state: &Shared, event_type: &str) -> Vec<serde_json::Value> {
    let cloud_type = format!("ecommerce.v1.{event_type}");
    state
        .lock()
        .unwrap()
        .events
        .iter()
        .filter(|e| e["type"] == cloud_type.as_str())
        .cloned()
        .collect()
}

/// Settings of a server delivering to the receiver at `addr`, retrying fast.
pub fn http_sink(s: &mut TestSettings, addr: SocketAddr) {
    s.set("DATA_PLATFORM_SINK", "http")
        .set("DATA_PLATFORM_URL", format!("http://{addr}/events"))
        .set("DATA_PLATFORM_TIMEOUT_MS", 500)
        .set("OUTBOX_RETRY_BASE_MS", 50)
        .set("OUTBOX_RETRY_MAX_MS", 200)
        .set("OUTBOX_INTERVAL_SECS", 1);
}

/// An event as a consumer sees it, whatever the transport: its CloudEvents attributes, checked
/// against the spec, and its payload, parsed as its events.proto message.
#[derive(Debug)]
pub struct CloudEvent {
    pub id: String,
    /// The events.proto message name: `OrderPlaced`, `PaymentCompleted`, ...
    pub event_type: String,
    pub order_id: i64,
    pub time: chrono::DateTime<chrono::FixedOffset>,
    /// The payload as sent.
    pub data: serde_json::Value,
    /// The payload parsed as its message (unknown fields refused).
    pub message: DynamicMessage,
}

impl CloudEvent {
    /// An event of an HTTP batch, in the JSON event format.
    pub fn from_json(event: &serde_json::Value) -> Self {
        let attribute = |name: &str| -> Option<String> {
            event.get(name).map(|v| {
                v.as_str()
                    .unwrap_or_else(|| panic!("attribute {name} is a string: {event}"))
                    .to_owned()
            })
        };
        Self::check(attribute, event["data"].clone())
    }

    /// A JetStream message in binary content mode: the attributes are its `ce-` headers
    /// (percent-encoded), the data its body.
    pub fn from_nats(headers: &async_nats::HeaderMap, body: &[u8]) -> Self {
        let attribute = |name: &str| -> Option<String> {
            headers
                .get(format!("ce-{name}").as_str())
                .map(|v| percent_decode(v.as_str()))
        };
        let event = Self::check(attribute, serde_json::from_slice(body).expect("JSON data"));
        assert_eq!(
            headers.get("Nats-Msg-Id").map(|v| v.as_str()),
            Some(event.id.as_str()),
            "JetStream deduplicates on the event id"
        );
        event
    }

    fn check(attribute: impl Fn(&str) -> Option<String>, data: serde_json::Value) -> Self {
        let required = |name: &str| {
            attribute(name).unwrap_or_else(|| panic!("the REQUIRED attribute {name} is present"))
        };
        assert_eq!(required("specversion"), "1.0");
        let id = required("id");
        uuid::Uuid::try_parse(&id).expect("the id is the event's UUID");
        assert_eq!(required("source"), SOURCE);
        let cloud_type = required("type");
        let event_type = cloud_type
            .strip_prefix("ecommerce.v1.")
            .unwrap_or_else(|| panic!("type {cloud_type} is an ecommerce.v1 message"))
            .to_owned();
        let order_id: i64 = required("subject")
            .parse()
            .expect("the subject is the order id");
        let time = chrono::DateTime::parse_from_rfc3339(&required("time"))
            .expect("time is an RFC 3339 timestamp");
        assert_eq!(required("datacontenttype"), "application/json");
        let message = parse_payload(&event_type, &data);
        assert_eq!(
            field_i64(&message, "order_id"),
            order_id,
            "the subject names the payload's order"
        );
        Self {
            id,
            event_type,
            order_id,
            time,
            data,
            message,
        }
    }

    /// The payload's per-order number.
    pub fn sequence(&self) -> i64 {
        field_i64(&self.message, "sequence")
    }
}

/// Parses `data` as the events.proto message `event_type` under the proto3 JSON mapping,
/// refusing unknown fields.
pub fn parse_payload(event_type: &str, data: &serde_json::Value) -> DynamicMessage {
    let pool = DescriptorPool::decode(ecommerce::proto::FILE_DESCRIPTOR_SET).unwrap();
    let descriptor = pool
        .get_message_by_name(&format!("ecommerce.v1.{event_type}"))
        .unwrap_or_else(|| panic!("{event_type} is a message of events.proto"));
    let message = DynamicMessage::deserialize_with_options(
        descriptor,
        data.clone(),
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .unwrap_or_else(|e| panic!("the {event_type} payload parses as its message: {e}\n{data}"));
    assert_eq!(
        message.descriptor().full_name(),
        format!("ecommerce.v1.{event_type}")
    );
    message
}

/// An integer field of a parsed payload.
pub fn field_i64(message: &DynamicMessage, name: &str) -> i64 {
    let value = message
        .get_field_by_name(name)
        .unwrap_or_else(|| panic!("{} has a field {name}", message.descriptor().name()));
    value
        .as_i64()
        .or_else(|| value.as_i32().map(i64::from))
        .unwrap_or_else(|| panic!("{name} is an integer: {value:?}"))
}

/// Percent-decoding of a NATS header value (the binding encodes space, `"`, `%` and
/// non-printable characters).
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            decoded.push(u8::from_str_radix(hex, 16).expect("a %XY escape"));
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(decoded).expect("percent-encoded UTF-8")
}

/// A JetStream stream and subject template no other test uses, on a server every test shares
/// (or a private one).
pub struct TestStream {
    pub url: String,
    pub name: String,
    /// `test.<id>.{type}`.
    pub subject: String,
}

/// One message of the stream.
pub struct StreamMessage {
    pub subject: String,
    pub headers: async_nats::HeaderMap,
    pub body: Vec<u8>,
}

impl TestStream {
    pub fn on(url: String) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            url,
            name: format!("TEST_{id}"),
            subject: format!("test.{id}.{{type}}"),
        }
    }

    /// The subject of one type's events: `test.<id>.payment_completed`.
    pub fn subject_of(&self, token: &str) -> String {
        self.subject.replace("{type}", token)
    }

    pub fn settings(&self, s: &mut TestSettings) {
        s.set("DATA_PLATFORM_SINK", "nats")
            .set("NATS_URL", &self.url)
            .set("DATA_PLATFORM_STREAM", &self.name)
            .set("DATA_PLATFORM_SUBJECT", &self.subject)
            .set("DATA_PLATFORM_TIMEOUT_MS", 1000)
            .set("OUTBOX_RETRY_BASE_MS", 50)
            .set("OUTBOX_RETRY_MAX_MS", 500);
    }

    pub async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(async_nats::connect(&self.url).await.expect("NATS answers"))
    }

    /// Every message in the stream, in stream order.
    pub async fn messages(&self) -> Vec<StreamMessage> {
        let mut stream = self
            .jetstream()
            .await
            .get_stream(&self.name)
            .await
            .expect("the sink created the stream");
        let state = stream.info().await.unwrap().state.clone();
        let mut messages = Vec::new();
        for sequence in state.first_sequence..=state.last_sequence {
            let message = stream.get_raw_message(sequence).await.unwrap();
            messages.push(StreamMessage {
                subject: message.subject.to_string(),
                headers: message.headers,
                body: message.payload.to_vec(),
            });
        }
        messages
    }

    pub async fn delete(&self) {
        let _ = self.jetstream().await.delete_stream(&self.name).await;
    }
}
