//! Delivery of outbox events to the external data platform, with a verdict per event.
//!
//! `log` writes one structured line per event (local runs). `nats` publishes each event to a
//! JetStream stream (created if missing, file storage, a duplicate window of
//! [`DUPLICATE_WINDOW`]) with header `Nats-Msg-Id` = the event id, so the server drops a
//! re-sent event, and the body the same JSON as one event of an HTTP batch; an event is
//! accepted only by its publish ack. `http` POSTs a JSON batch:
//! `{"events": [{"event_id", "idempotency_key", "event_type", "occurred_at", "payload"}]}`.
//! A 2xx accepts the whole batch. A permanent refusal (4xx other than 408 and 429) of a batch
//! is split in halves until the refused events stand alone, so one event the platform always
//! refuses never holds back the others; an outage (5xx, 408, 429, a timeout, no connection)
//! fails the batch, to be retried. Delivery is at least once: the receiver deduplicates on
//! `idempotency_key` (= `event_id`).

use std::{
    ops::Range,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use async_nats::jetstream::{
    self,
    context::{PublishError, PublishErrorKind},
    message::PublishMessage,
    stream::{self, StorageType},
};

use crate::{config::SinkKind, store::postgres::outbox::OutboxEvent, telemetry::TraceContext};

/// How long JetStream remembers a message id: longer than the longest pause between two
/// attempts (`OUTBOX_RETRY_MAX_MS` is at most an hour), so an event re-sent because its ack was
/// lost is dropped as a duplicate. A stream that already exists keeps its own setting.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(2 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum SinkSetupError {
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("NATS client: {0}")]
    Nats(#[from] async_nats::ConnectError),
}

/// What the data platform said about one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// Refused for good (`HTTP 400`, a malformed event): retrying cannot help.
    Rejected(String),
    /// Not taken this time (an outage): retry later.
    Unavailable(String),
}

pub enum Sink {
    Log,
    Http {
        client: reqwest::Client,
        url: String,
    },
    Nats(Box<NatsSink>),
}

/// A JetStream publisher: the client reconnects by itself, and the stream is (re)created
/// before the first delivery and after the server says it is gone.
pub struct NatsSink {
    jetstream: jetstream::Context,
    subject: String,
    stream: String,
    stream_ready: AtomicBool,
}

#[derive(serde::Serialize)]
struct Batch<'a> {
    events: Vec<WireEvent<'a>>,
}

/// One event as every sink sends it.
#[derive(serde::Serialize)]
struct WireEvent<'a> {
    event_id: uuid::Uuid,
    idempotency_key: uuid::Uuid,
    event_type: &'a str,
    occurred_at: chrono::DateTime<chrono::Utc>,
    payload: &'a serde_json::Value,
    /// The payment's trace (absent while tracing is off), so the consumer can continue it.
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracestate: Option<&'a str>,
}

impl<'a> From<&'a OutboxEvent> for WireEvent<'a> {
    fn from(e: &'a OutboxEvent) -> Self {
        WireEvent {
            event_id: e.event_id,
            idempotency_key: e.event_id,
            event_type: &e.event_type,
            occurred_at: e.created_at,
            payload: &e.payload,
            traceparent: e.traceparent.as_deref(),
            tracestate: e.tracestate.as_deref(),
        }
    }
}

/// How one HTTP delivery of a batch ended.
enum Answer {
    Accepted,
    Refused(String),
    Failed(String),
}

impl Sink {
    /// Never waits for the data platform: a NATS server that is down is connected to later.
    pub async fn new(kind: &SinkKind, timeout: Duration) -> Result<Self, SinkSetupError> {
        Ok(match kind {
            SinkKind::Log => Sink::Log,
            SinkKind::Http(url) => Sink::Http {
                client: reqwest::Client::builder()
                    .timeout(timeout)
                    .connect_timeout(timeout)
                    .build()?,
                url: url.clone(),
            },
            SinkKind::Nats {
                url,
                subject,
                stream,
            } => {
                let client = async_nats::ConnectOptions::new()
                    .retry_on_initial_connect()
                    .connection_timeout(timeout)
                    .name("ecommerce-outbox")
                    .connect(url.as_str())
                    .await?;
                Sink::Nats(Box::new(NatsSink {
                    jetstream: jetstream::ContextBuilder::new()
                        .timeout(timeout)
                        .ack_timeout(timeout)
                        .build(client),
                    subject: subject.clone(),
                    stream: stream.clone(),
                    stream_ready: AtomicBool::new(false),
                }))
            }
        })
    }

    /// Delivers `events`; the verdicts come in the same order. `trace` is the delivery's own
    /// trace context, which an HTTP batch carries in its headers (each event carries its own).
    pub async fn deliver(&self, events: &[OutboxEvent], trace: &TraceContext) -> Vec<Verdict> {
        match self {
            Sink::Log => {
                for e in events {
                    tracing::info!(target: "data_platform", event_id = %e.event_id,
                        event_type = %e.event_type, payload = %e.payload, "event");
                }
                vec![Verdict::Accepted; events.len()]
            }
            Sink::Http { client, url } => deliver_split(client, url, events, trace).await,
            Sink::Nats(nats) => nats.deliver(events).await,
        }
    }
}

impl NatsSink {
    async fn ensure_stream(&self) -> Result<(), String> {
        if self.stream_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        self.jetstream
            .get_or_create_stream(stream::Config {
                name: self.stream.clone(),
                subjects: vec![self.subject.clone()],
                storage: StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("NATS: stream {}: {e}", self.stream))?;
        self.stream_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Publishes every event at once, then waits for all their acks together (each bounded by
    /// the sink's timeout).
    async fn deliver(&self, events: &[OutboxEvent]) -> Vec<Verdict> {
        if let Err(reason) = self.ensure_stream().await {
            return vec![Verdict::Unavailable(reason); events.len()];
        }
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let message = match serde_json::to_vec(&WireEvent::from(event)) {
                Ok(body) => PublishMessage::build()
                    .payload(body.into())
                    .headers(nats_headers(event)),
                Err(e) => {
                    acks.push(futures::future::Either::Left(async move {
                        Verdict::Rejected(format!("malformed event: {e}"))
                    }));
                    continue;
                }
            };
            let sent = self
                .jetstream
                .send_publish(self.subject.clone(), message)
                .await;
            acks.push(futures::future::Either::Right(async move {
                match sent {
                    Ok(ack) => ack.await.map(|_| Verdict::Accepted),
                    Err(e) => Err(e),
                }
                .unwrap_or_else(|e| self.judge(e))
            }));
        }
        futures::future::join_all(acks).await
    }

    fn judge(&self, error: PublishError) -> Verdict {
        match error.kind() {
            PublishErrorKind::MaxPayloadExceeded => Verdict::Rejected(format!("NATS: {error}")),
            PublishErrorKind::StreamNotFound => {
                // The server lost the stream (a new, empty server): create it again.
                self.stream_ready.store(false, Ordering::Release);
                Verdict::Unavailable(format!("NATS: {error}"))
            }
            _ => Verdict::Unavailable(format!("NATS: {error}")),
        }
    }
}

/// The headers of one event's message. The id lets JetStream drop a re-sent event; the
/// payment's trace context lets the consumer continue its trace.
fn nats_headers(event: &OutboxEvent) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", event.event_id.to_string().as_str());
    if let Some(traceparent) = &event.traceparent {
        headers.insert("traceparent", traceparent.as_str());
    }
    if let Some(tracestate) = &event.tracestate {
        headers.insert("tracestate", tracestate.as_str());
    }
    headers
}

/// POSTs the batch; a refused batch is split in halves until each refused event stands alone.
/// After an outage answer nothing more is sent: the rest of the batch waits for the retry.
async fn deliver_split(
    client: &reqwest::Client,
    url: &str,
    events: &[OutboxEvent],
    trace: &TraceContext,
) -> Vec<Verdict> {
    let mut verdicts = vec![None; events.len()];
    let mut pending: Vec<Range<usize>> = Vec::new();
    pending.push(0..events.len());
    let mut outage = None;
    while let Some(range) = pending.pop() {
        if let Some(reason) = &outage {
            verdicts[range].fill(Some(Verdict::Unavailable(String::clone(reason))));
            continue;
        }
        match post(client, url, &events[range.clone()], trace).await {
            Answer::Accepted => verdicts[range].fill(Some(Verdict::Accepted)),
            Answer::Refused(reason) if range.len() == 1 => {
                verdicts[range].fill(Some(Verdict::Rejected(reason)));
            }
            Answer::Refused(_) => {
                let middle = range.start + range.len() / 2;
                pending.push(middle..range.end);
                pending.push(range.start..middle);
            }
            Answer::Failed(reason) => {
                verdicts[range].fill(Some(Verdict::Unavailable(reason.clone())));
                outage = Some(reason);
            }
        }
    }
    verdicts
        .into_iter()
        .map(|v| v.expect("every range is judged"))
        .collect()
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    events: &[OutboxEvent],
    trace: &TraceContext,
) -> Answer {
    let batch = Batch {
        events: events.iter().map(WireEvent::from).collect(),
    };
    let mut request = client.post(url).json(&batch);
    if let Some(traceparent) = &trace.traceparent {
        request = request.header("traceparent", traceparent);
    }
    if let Some(tracestate) = &trace.tracestate {
        request = request.header("tracestate", tracestate);
    }
    match request.send().await {
        Ok(response) => {
            let status = response.status();
            let reason = format!("HTTP {}", status.as_u16());
            if status.is_success() {
                Answer::Accepted
            } else if status.is_client_error()
                && status != reqwest::StatusCode::REQUEST_TIMEOUT
                && status != reqwest::StatusCode::TOO_MANY_REQUESTS
            {
                Answer::Refused(reason)
            } else {
                Answer::Failed(reason)
            }
        }
        Err(e) if e.is_builder() => Answer::Refused(format!("malformed request: {e}")),
        Err(e) => Answer::Failed(describe(&e)),
    }
}

/// A transport failure in a few words: what happened and its root cause.
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "transport error"
    };
    let mut cause: &dyn std::error::Error = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    format!("{what}: {cause}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(traceparent: Option<&str>) -> OutboxEvent {
        OutboxEvent {
            id: 1,
            event_id: uuid::Uuid::from_u128(7),
            event_type: "payment.completed".into(),
            payload: serde_json::json!({"order_id": 1}),
            attempts: 0,
            created_at: chrono::Utc::now(),
            traceparent: traceparent.map(str::to_owned),
            tracestate: None,
        }
    }

    #[test]
    fn a_message_carries_its_id_and_the_payment_trace() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let headers = nats_headers(&event(Some(parent)));
        assert_eq!(
            headers.get("Nats-Msg-Id").map(|v| v.as_str()),
            Some("00000000-0000-0000-0000-000000000007")
        );
        assert_eq!(headers.get("traceparent").map(|v| v.as_str()), Some(parent));
        assert!(headers.get("tracestate").is_none());

        let untraced = nats_headers(&event(None));
        assert!(untraced.get("traceparent").is_none());
        let body = serde_json::to_value(WireEvent::from(&event(None))).unwrap();
        assert!(
            body.get("traceparent").is_none(),
            "no field while tracing is off"
        );
    }
}
