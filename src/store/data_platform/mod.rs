//! Delivery of outbox events to the external data platform, with a verdict per event. Every
//! event travels as a CloudEvents 1.0 event ([`cloudevents`]).
//!
//! `log` writes one structured line per event (local runs). `http` POSTs batches in the HTTP
//! binding's batched content mode ([`http`]). `nats` publishes each event to JetStream in the
//! NATS binding's binary content mode, on a subject of its type ([`nats`]). Delivery is at
//! least once, and in no promised order: the receiver deduplicates on the CloudEvents `id`
//! (the event id) and orders an order's events by their payload's `sequence`.

mod cloudevents;
mod http;
mod nats;

use std::{sync::atomic::AtomicBool, time::Duration};

use async_nats::jetstream;

pub use nats::NatsSink;

use crate::{config::SinkKind, store::postgres::outbox::OutboxEvent, telemetry::TraceContext};

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
        /// The CloudEvents `source` of every event.
        source: String,
    },
    Nats(Box<NatsSink>),
}

impl Sink {
    /// Never waits for the data platform: a NATS server that is down is connected to later.
    /// `source` is the CloudEvents `source` of every event.
    pub async fn new(
        kind: &SinkKind,
        source: &str,
        timeout: Duration,
    ) -> Result<Self, SinkSetupError> {
        Ok(match kind {
            SinkKind::Log => Sink::Log,
            SinkKind::Http(url) => Sink::Http {
                client: reqwest::Client::builder()
                    .timeout(timeout)
                    .connect_timeout(timeout)
                    .build()?,
                url: url.clone(),
                source: source.to_owned(),
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
                    source: source.to_owned(),
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
                        event_type = %e.event_type, order_id = ?e.order_id,
                        payload = %e.payload, "event");
                }
                vec![Verdict::Accepted; events.len()]
            }
            Sink::Http {
                client,
                url,
                source,
            } => http::deliver_split(client, url, source, events, trace).await,
            Sink::Nats(nats) => nats.deliver(events).await,
        }
    }
}
