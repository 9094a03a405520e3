//! The NATS sink: each event published to JetStream in the CloudEvents NATS binding's binary
//! content mode: the attributes as `ce-` headers, the data (the payload's JSON) as the body,
//! on a subject of its type (`DATA_PLATFORM_SUBJECT` with `{type}` replaced by
//! `order_placed`, `payment_completed`, ...). Also the header `Nats-Msg-Id` = the event id, so
//! JetStream drops a re-sent event, and the W3C `traceparent` / `tracestate` headers the way
//! NATS tracing tools read them. An event is accepted only by its publish ack.
//!
//! The stream (created if missing: file storage, a duplicate window of [`DUPLICATE_WINDOW`])
//! captures every type's subject through one wildcard (`{type}` → `*`); a stream that exists
//! without it (made by an earlier version for the payment subject alone) is widened to it.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use async_nats::jetstream::{
    self,
    context::{PublishError, PublishErrorKind},
    message::PublishMessage,
    stream::{self, StorageType},
};

use super::{
    Verdict,
    cloudevents::{Envelope, subject_token},
};
use crate::{config::SUBJECT_TYPE_PLACEHOLDER, store::postgres::outbox::OutboxEvent};

/// How long JetStream remembers a message id: longer than the longest pause between two
/// attempts (`OUTBOX_RETRY_MAX_MS` is at most an hour), so an event re-sent because its ack was
/// lost is dropped as a duplicate. A stream that already exists keeps its own setting.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(2 * 3600);

/// A JetStream publisher: the client reconnects by itself, and the stream is (re)created
/// before the first delivery and after the server says it is gone.
pub struct NatsSink {
    pub(super) jetstream: jetstream::Context,
    /// `DATA_PLATFORM_SUBJECT`: a subject with [`SUBJECT_TYPE_PLACEHOLDER`] as one of its tokens.
    pub(super) subject: String,
    pub(super) stream: String,
    pub(super) source: String,
    pub(super) stream_ready: AtomicBool,
}

impl NatsSink {
    /// The subject of one type's events.
    fn subject_of(&self, event_type: &str) -> String {
        self.subject
            .replace(SUBJECT_TYPE_PLACEHOLDER, &subject_token(event_type))
    }

    /// The stream's subject: every type's.
    fn all_types(&self) -> String {
        self.subject.replace(SUBJECT_TYPE_PLACEHOLDER, "*")
    }

    async fn ensure_stream(&self) -> Result<(), String> {
        if self.stream_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let wanted = self.all_types();
        let failed = |e: &dyn std::fmt::Display| format!("NATS: stream {}: {e}", self.stream);
        let stream = self
            .jetstream
            .get_or_create_stream(stream::Config {
                name: self.stream.clone(),
                subjects: vec![wanted.clone()],
                storage: StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(|e| failed(&e))?;
        let config = &stream.cached_info().config;
        if !config.subjects.iter().any(|s| covers(s, &wanted)) {
            let mut widened = config.clone();
            widened.subjects.retain(|s| !covers(&wanted, s));
            widened.subjects.push(wanted);
            tracing::info!(stream = %self.stream, subjects = ?widened.subjects,
                "widening the event stream to every event type's subject");
            self.jetstream
                .update_stream(&widened)
                .await
                .map_err(|e| failed(&e))?;
        }
        self.stream_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Publishes every event at once, then waits for all their acks together (each bounded by
    /// the sink's timeout).
    pub(super) async fn deliver(&self, events: &[OutboxEvent]) -> Vec<Verdict> {
        if let Err(reason) = self.ensure_stream().await {
            return vec![Verdict::Unavailable(reason); events.len()];
        }
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let message = match serde_json::to_vec(&event.payload) {
                Ok(body) => PublishMessage::build()
                    .payload(body.into())
                    .headers(headers(event, &self.source)),
                Err(e) => {
                    acks.push(futures::future::Either::Left(async move {
                        Verdict::Rejected(format!("malformed event: {e}"))
                    }));
                    continue;
                }
            };
            let sent = self
                .jetstream
                .send_publish(self.subject_of(&event.event_type), message)
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

/// The headers of one event's message: its CloudEvents attributes, the id that lets JetStream
/// drop a re-sent event, and the trace context of the call that made the transition.
fn headers(event: &OutboxEvent, source: &str) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in Envelope::of(event, source).headers() {
        headers.insert(name.as_str(), value.as_str());
    }
    headers.insert("Nats-Msg-Id", event.event_id.to_string().as_str());
    if let Some(traceparent) = &event.traceparent {
        headers.insert("traceparent", traceparent.as_str());
    }
    if let Some(tracestate) = &event.tracestate {
        headers.insert("tracestate", tracestate.as_str());
    }
    headers
}

/// Whether the subject filter `pattern` captures every subject `filter` names (NATS
/// wildcards: `*` one token, `>` one or more at the end).
fn covers(pattern: &str, filter: &str) -> bool {
    let mut filter = filter.split('.');
    for token in pattern.split('.') {
        match (token, filter.next()) {
            (">", Some(_)) => return true,
            ("*", Some(t)) if t != ">" => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    filter.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(traceparent: Option<&str>) -> OutboxEvent {
        OutboxEvent {
            id: 1,
            event_id: uuid::Uuid::from_u128(7),
            event_type: "PaymentCompleted".into(),
            order_id: Some(3),
            payload: serde_json::json!({"order_id": 3}),
            attempts: 0,
            created_at: chrono::Utc::now(),
            traceparent: traceparent.map(str::to_owned),
            tracestate: None,
        }
    }

    #[test]
    fn a_message_carries_its_id_its_attributes_and_the_transition_trace() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let headers = headers(&event(Some(parent)), "/ecommerce");
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(
            get("Nats-Msg-Id").as_deref(),
            Some("00000000-0000-0000-0000-000000000007")
        );
        assert_eq!(get("ce-id"), get("Nats-Msg-Id"));
        assert_eq!(
            get("ce-type").as_deref(),
            Some("ecommerce.v1.PaymentCompleted")
        );
        assert_eq!(get("ce-subject").as_deref(), Some("3"));
        assert_eq!(get("traceparent").as_deref(), Some(parent));
        assert_eq!(get("ce-traceparent").as_deref(), Some(parent));
        assert!(headers.get("tracestate").is_none());

        let untraced = super::headers(&event(None), "/ecommerce");
        assert!(untraced.get("traceparent").is_none());
        assert!(untraced.get("ce-traceparent").is_none());
    }

    #[test]
    fn a_wildcard_covers_the_subjects_it_captures() {
        assert!(covers(
            "ecommerce.events.*",
            "ecommerce.events.payment_completed"
        ));
        assert!(covers("ecommerce.events.*", "ecommerce.events.*"));
        assert!(covers("ecommerce.>", "ecommerce.events.*"));
        assert!(!covers("ecommerce.events.*", "ecommerce.events.>"));
        assert!(!covers("ecommerce.events.*", "ecommerce.events"));
        assert!(!covers("ecommerce.events.*", "ecommerce.events.a.b"));
        assert!(!covers(
            "ecommerce.events.payment_completed",
            "ecommerce.events.*"
        ));
        assert!(!covers("other.*", "ecommerce.events"));
    }
}
