//! The CloudEvents 1.0 envelope of an outbox event, as the HTTP sink sends it (the JSON event
//! format, in a batch) and as the NATS sink sends it (binary content mode: `ce-` headers and
//! the data as the message body).
//!
//! Attributes: `specversion` 1.0; `id` the event id (the receiver's deduplication key, unique
//! with `source`); `source` the configured `EVENT_SOURCE`; `type` `ecommerce.v1.` + the
//! payload's message name in events.proto; `subject` the order id; `time` the commit time of
//! the transition; `datacontenttype` `application/json`; and, while tracing is on, the
//! Distributed Tracing extension's `traceparent` and `tracestate` (the trace of the call that
//! made the transition).

use std::fmt::Write as _;

use chrono::SecondsFormat;

use crate::store::postgres::outbox::OutboxEvent;

pub const SPEC_VERSION: &str = "1.0";
/// Every `type` is the full name of the payload's message: the proto package, then its name.
pub const TYPE_PREFIX: &str = "ecommerce.v1.";
pub const DATA_CONTENT_TYPE: &str = "application/json";
/// The media type of the JSON batch format (HTTP binding, batched content mode).
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json; charset=utf-8";

/// One event in the JSON event format.
#[derive(serde::Serialize)]
pub struct Envelope<'a> {
    specversion: &'static str,
    id: uuid::Uuid,
    source: &'a str,
    #[serde(rename = "type")]
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    time: chrono::DateTime<chrono::Utc>,
    datacontenttype: &'static str,
    data: &'a serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracestate: Option<&'a str>,
}

impl<'a> Envelope<'a> {
    pub fn of(event: &'a OutboxEvent, source: &'a str) -> Self {
        Self {
            specversion: SPEC_VERSION,
            id: event.event_id,
            source,
            kind: cloud_type(&event.event_type),
            subject: event.order_id.map(|id| id.to_string()),
            time: event.created_at,
            datacontenttype: DATA_CONTENT_TYPE,
            data: &event.payload,
            traceparent: event.traceparent.as_deref(),
            tracestate: event.tracestate.as_deref(),
        }
    }

    /// The attributes as NATS headers (binary content mode): each attribute, extensions
    /// included, as `ce-<name>`, its value percent-encoded as the NATS binding asks.
    pub fn headers(&self) -> Vec<(String, String)> {
        let id = self.id.to_string();
        let time = self.time.to_rfc3339_opts(SecondsFormat::AutoSi, true);
        let mut attributes = vec![
            ("specversion", self.specversion),
            ("id", id.as_str()),
            ("source", self.source),
            ("type", self.kind.as_str()),
            ("time", time.as_str()),
            ("datacontenttype", self.datacontenttype),
        ];
        if let Some(subject) = &self.subject {
            attributes.push(("subject", subject.as_str()));
        }
        if let Some(traceparent) = self.traceparent {
            attributes.push(("traceparent", traceparent));
        }
        if let Some(tracestate) = self.tracestate {
            attributes.push(("tracestate", tracestate));
        }
        attributes
            .into_iter()
            .map(|(name, value)| (format!("ce-{name}"), percent_encode(value)))
            .collect()
    }
}

/// The CloudEvents `type` of a stored event type: `OrderPlaced` → `ecommerce.v1.OrderPlaced`.
pub fn cloud_type(event_type: &str) -> String {
    format!("{TYPE_PREFIX}{event_type}")
}

/// The NATS subject token of a stored event type: `OrderPlaced` → `order_placed`.
pub fn subject_token(event_type: &str) -> String {
    let mut token = String::with_capacity(event_type.len() + 4);
    for (i, c) in event_type.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                token.push('_');
            }
            token.push(c.to_ascii_lowercase());
        } else if c.is_ascii_alphanumeric() {
            token.push(c);
        } else {
            token.push('_');
        }
    }
    token
}

/// A header value as the NATS binding encodes it: space, `"`, `%` and anything outside
/// printable ASCII as `%XY` per UTF-8 byte.
pub fn percent_encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '!'..='~') && c != '"' && c != '%' {
            encoded.push(c);
        } else {
            let mut bytes = [0; 4];
            for byte in c.encode_utf8(&mut bytes).bytes() {
                let _ = write!(encoded, "%{byte:02X}");
            }
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(traceparent: Option<&str>) -> OutboxEvent {
        OutboxEvent {
            id: 1,
            event_id: uuid::Uuid::from_u128(7),
            event_type: "OrderPlaced".into(),
            order_id: Some(42),
            payload: serde_json::json!({"order_id": 42, "sequence": 1}),
            attempts: 0,
            created_at: chrono::DateTime::from_timestamp(1_700_000_000, 120_000_000).unwrap(),
            traceparent: traceparent.map(str::to_owned),
            tracestate: None,
        }
    }

    #[test]
    fn an_event_is_a_cloudevent_in_the_json_format() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let traced = event(Some(parent));
        let json = serde_json::to_value(Envelope::of(&traced, "/shop")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "specversion": "1.0",
                "id": "00000000-0000-0000-0000-000000000007",
                "source": "/shop",
                "type": "ecommerce.v1.OrderPlaced",
                "subject": "42",
                "time": "2023-11-14T22:13:20.120Z",
                "datacontenttype": "application/json",
                "data": {"order_id": 42, "sequence": 1},
                "traceparent": parent
            })
        );
        let untraced = event(None);
        let json = serde_json::to_value(Envelope::of(&untraced, "/shop")).unwrap();
        assert!(
            json.get("traceparent").is_none(),
            "no extension while tracing is off"
        );
    }

    #[test]
    fn nats_headers_carry_every_attribute_with_the_ce_prefix() {
        let traced = event(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        let headers = Envelope::of(&traced, "https://shop.example/ecommerce service").headers();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("ce-specversion"), Some("1.0"));
        assert_eq!(get("ce-id"), Some("00000000-0000-0000-0000-000000000007"));
        assert_eq!(get("ce-type"), Some("ecommerce.v1.OrderPlaced"));
        assert_eq!(get("ce-subject"), Some("42"));
        assert_eq!(get("ce-time"), Some("2023-11-14T22:13:20.120Z"));
        assert_eq!(get("ce-datacontenttype"), Some("application/json"));
        assert_eq!(
            get("ce-source"),
            Some("https://shop.example/ecommerce%20service")
        );
        assert!(get("ce-traceparent").is_some());
        assert_eq!(get("ce-tracestate"), None);
    }

    #[test]
    fn types_become_subject_tokens_and_values_are_percent_encoded() {
        assert_eq!(subject_token("OrderPlaced"), "order_placed");
        assert_eq!(subject_token("PaymentCompleted"), "payment_completed");
        assert_eq!(subject_token("OrderRefunded"), "order_refunded");
        assert_eq!(percent_encode("a b\"c%d"), "a%20b%22c%25d");
        assert_eq!(
            percent_encode("Euro € 😀"),
            "Euro%20%E2%82%AC%20%F0%9F%98%80"
        );
        assert_eq!(percent_encode("k=v,k2=v2"), "k=v,k2=v2");
    }
}
