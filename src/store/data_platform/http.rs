//! The HTTP sink: the CloudEvents HTTP binding in batched content mode. Each POST carries
//! `Content-Type: application/cloudevents-batch+json` and a JSON array of events in the JSON
//! event format; a 2xx accepts every event of the request.
//!
//! A permanent refusal (4xx other than 408 and 429) of a batch is split in halves until the
//! refused events stand alone, so one event the platform always refuses never holds back the
//! others; an outage (5xx, 408, 429, a timeout, no connection) fails the rest of the batch, to
//! be retried.

use std::ops::Range;

use super::{
    Verdict,
    cloudevents::{BATCH_CONTENT_TYPE, Envelope},
};
use crate::{store::postgres::outbox::OutboxEvent, telemetry::TraceContext};

/// How one HTTP delivery of a batch ended.
enum Answer {
    Accepted,
    Refused(String),
    Failed(String),
}

/// POSTs the batch; a refused batch is split in halves until each refused event stands alone.
/// After an outage answer nothing more is sent: the rest of the batch waits for the retry.
pub(super) async fn deliver_split(
    client: &reqwest::Client,
    url: &str,
    source: &str,
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
        match post(client, url, source, &events[range.clone()], trace).await {
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
    source: &str,
    events: &[OutboxEvent],
    trace: &TraceContext,
) -> Answer {
    let batch: Vec<Envelope<'_>> = events.iter().map(|e| Envelope::of(e, source)).collect();
    let body = match serde_json::to_vec(&batch) {
        Ok(body) => body,
        Err(e) => return Answer::Refused(format!("malformed event: {e}")),
    };
    let mut request = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, BATCH_CONTENT_TYPE)
        .body(body);
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
