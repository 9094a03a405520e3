//! The outbox section: the delivery job, the data platform it delivers to, and the CloudEvents
//! envelope's `source`.

use std::time::Duration;

use super::{reader::Reader, variables as v};

/// Where each event type's subject goes in `DATA_PLATFORM_SUBJECT`.
pub const SUBJECT_TYPE_PLACEHOLDER: &str = "{type}";

/// Where the outbox job delivers the events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkKind {
    /// One structured log line per event (local runs).
    Log,
    /// POST batches of CloudEvents to this URL.
    Http(String),
    /// Publish each event to NATS JetStream.
    Nats {
        url: String,
        /// A subject with [`SUBJECT_TYPE_PLACEHOLDER`] as one of its tokens.
        subject: String,
        stream: String,
    },
}

/// The outbox job and the data platform it delivers to.
#[derive(Clone, Debug)]
pub struct OutboxSettings {
    pub interval: Duration,
    pub batch_size: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// An event failing (an outage) for this long is parked instead of retried.
    pub park_after: Duration,
    pub sink: SinkKind,
    pub sink_timeout: Duration,
    /// The CloudEvents `source` of every event.
    pub event_source: String,
}

pub(super) fn outbox(r: &mut Reader<'_>) -> OutboxSettings {
    let sink = match r.parsed::<String>(&v::DATA_PLATFORM_SINK).as_str() {
        "http" => match r.set(&v::DATA_PLATFORM_URL) {
            Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
                SinkKind::Http(url)
            }
            _ => {
                r.error(
                    &v::DATA_PLATFORM_URL,
                    "an http(s) URL is required when DATA_PLATFORM_SINK=http",
                );
                SinkKind::Log
            }
        },
        "nats" => nats_sink(r),
        _ => SinkKind::Log,
    };
    let event_source = r.text(&v::EVENT_SOURCE);
    if event_source.is_empty()
        || event_source.len() > 256
        || event_source.contains(|c: char| c.is_whitespace() || c.is_control())
    {
        r.error(
            &v::EVENT_SOURCE,
            "expected a URI reference of 1..=256 characters without spaces",
        );
    }
    OutboxSettings {
        interval: r.duration(&v::OUTBOX_INTERVAL_SECS),
        batch_size: r.integer(&v::OUTBOX_BATCH_SIZE),
        retry_base: r.duration(&v::OUTBOX_RETRY_BASE_MS),
        retry_max: r.duration(&v::OUTBOX_RETRY_MAX_MS),
        park_after: r.hours(&v::OUTBOX_PARK_AFTER_HOURS),
        sink,
        sink_timeout: r.duration(&v::DATA_PLATFORM_TIMEOUT_MS),
        event_source,
    }
}

fn nats_sink(r: &mut Reader<'_>) -> SinkKind {
    let url = r.text(&v::NATS_URL);
    if !url.split(',').all(|u| {
        let u = u.trim();
        u.starts_with("nats://") || u.starts_with("tls://")
    }) {
        r.error(&v::NATS_URL, "expected nats:// (or tls://) URLs");
    }
    let subject = r.text(&v::DATA_PLATFORM_SUBJECT);
    if let Err(why) = check_subject_template(&subject) {
        r.error(&v::DATA_PLATFORM_SUBJECT, why);
    }
    let stream = r.text(&v::DATA_PLATFORM_STREAM);
    if stream.is_empty()
        || !stream
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        r.error(
            &v::DATA_PLATFORM_STREAM,
            "expected letters, digits, `-` and `_`",
        );
    }
    SinkKind::Nats {
        url,
        subject,
        stream,
    }
}

/// A subject of literal tokens, exactly one of which is `{type}`: so each type has its own
/// subject, and replacing `{type}` by `*` gives the stream one filter that captures them all.
fn check_subject_template(subject: &str) -> Result<(), &'static str> {
    let tokens: Vec<&str> = subject.split('.').collect();
    if tokens.iter().any(|t| {
        t.is_empty()
            || *t == "*"
            || *t == ">"
            || t.contains(|c: char| c.is_whitespace() || c.is_control())
    }) {
        return Err("expected a subject without wildcards or empty tokens");
    }
    let placeholders = tokens
        .iter()
        .filter(|t| **t == SUBJECT_TYPE_PLACEHOLDER)
        .count();
    if placeholders != 1 || tokens.iter().filter(|t| t.contains(['{', '}'])).count() != 1 {
        return Err("expected `{type}` once, as a whole token (e.g. `ecommerce.events.{type}`)");
    }
    Ok(())
}
