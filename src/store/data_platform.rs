//! Delivery of outbox events to the external data platform.
//!
//! `log` writes one structured line per event (local runs). `http` POSTs a JSON batch:
//! `{"events": [{"event_id", "idempotency_key", "event_type", "occurred_at", "payload"}]}`.
//! Any 2xx accepts the whole batch; anything else (or a timeout) fails it, to be retried.
//! Delivery is at least once: the receiver deduplicates on `idempotency_key` (= `event_id`).

use std::time::Duration;

use crate::{config::SinkKind, store::postgres::outbox::OutboxEvent};

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("data platform answered HTTP {0}")]
    Status(u16),
    #[error("data platform unreachable: {0}")]
    Transport(#[from] reqwest::Error),
}

pub enum Sink {
    Log,
    Http {
        client: reqwest::Client,
        url: String,
    },
}

#[derive(serde::Serialize)]
struct Batch<'a> {
    events: Vec<WireEvent<'a>>,
}

#[derive(serde::Serialize)]
struct WireEvent<'a> {
    event_id: uuid::Uuid,
    idempotency_key: uuid::Uuid,
    event_type: &'a str,
    occurred_at: chrono::DateTime<chrono::Utc>,
    payload: &'a serde_json::Value,
}

impl Sink {
    pub fn new(kind: &SinkKind, timeout: Duration) -> Result<Self, reqwest::Error> {
        Ok(match kind {
            SinkKind::Log => Sink::Log,
            SinkKind::Http(url) => Sink::Http {
                client: reqwest::Client::builder()
                    .timeout(timeout)
                    .connect_timeout(timeout)
                    .build()?,
                url: url.clone(),
            },
        })
    }

    pub async fn deliver(&self, events: &[OutboxEvent]) -> Result<(), DeliveryError> {
        match self {
            Sink::Log => {
                for e in events {
                    tracing::info!(target: "data_platform", event_id = %e.event_id,
                        event_type = %e.event_type, payload = %e.payload, "event");
                }
                Ok(())
            }
            Sink::Http { client, url } => {
                let batch = Batch {
                    events: events
                        .iter()
                        .map(|e| WireEvent {
                            event_id: e.event_id,
                            idempotency_key: e.event_id,
                            event_type: &e.event_type,
                            occurred_at: e.created_at,
                            payload: &e.payload,
                        })
                        .collect(),
                };
                let response = client.post(url).json(&batch).send().await?;
                if response.status().is_success() {
                    Ok(())
                } else {
                    Err(DeliveryError::Status(response.status().as_u16()))
                }
            }
        }
    }
}
