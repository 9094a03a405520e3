//! Delivery of outbox events to the external data platform, with a verdict per event.
//!
//! `log` writes one structured line per event (local runs). `http` POSTs a JSON batch:
//! `{"events": [{"event_id", "idempotency_key", "event_type", "occurred_at", "payload"}]}`.
//! A 2xx accepts the whole batch. A permanent refusal (4xx other than 408 and 429) of a batch
//! is split in halves until the refused events stand alone, so one event the platform always
//! refuses never holds back the others; an outage (5xx, 408, 429, a timeout, no connection)
//! fails the batch, to be retried. Delivery is at least once: the receiver deduplicates on
//! `idempotency_key` (= `event_id`).

use std::{ops::Range, time::Duration};

use crate::{config::SinkKind, store::postgres::outbox::OutboxEvent};

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
}

impl<'a> From<&'a OutboxEvent> for WireEvent<'a> {
    fn from(e: &'a OutboxEvent) -> Self {
        WireEvent {
            event_id: e.event_id,
            idempotency_key: e.event_id,
            event_type: &e.event_type,
            occurred_at: e.created_at,
            payload: &e.payload,
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

    /// Delivers `events`; the verdicts come in the same order.
    pub async fn deliver(&self, events: &[OutboxEvent]) -> Vec<Verdict> {
        match self {
            Sink::Log => {
                for e in events {
                    tracing::info!(target: "data_platform", event_id = %e.event_id,
                        event_type = %e.event_type, payload = %e.payload, "event");
                }
                vec![Verdict::Accepted; events.len()]
            }
            Sink::Http { client, url } => deliver_split(client, url, events).await,
        }
    }
}

/// POSTs the batch; a refused batch is split in halves until each refused event stands alone.
/// After an outage answer nothing more is sent: the rest of the batch waits for the retry.
async fn deliver_split(
    client: &reqwest::Client,
    url: &str,
    events: &[OutboxEvent],
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
        match post(client, url, &events[range.clone()]).await {
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

async fn post(client: &reqwest::Client, url: &str, events: &[OutboxEvent]) -> Answer {
    let batch = Batch {
        events: events.iter().map(WireEvent::from).collect(),
    };
    match client.post(url).json(&batch).send().await {
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
