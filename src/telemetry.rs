//! Logs and traces.
//!
//! Logs: text for people, JSON for log pipelines; the filter comes from `RUST_LOG`. Traces:
//! OpenTelemetry, exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the other
//! standard `OTEL_*` variables, such as `OTEL_TRACES_SAMPLER` or `OTEL_RESOURCE_ATTRIBUTES`,
//! are read by the SDK), and off otherwise.
//!
//! Every span meant for traces has the target [`SPANS`]. With tracing off, that target is
//! filtered out, so such a span costs one cached callsite check and nothing is recorded: the
//! hot path pays for tracing only when it is on. With tracing on, JSON log lines written inside
//! a call carry its `trace_id` and `span_id` (fields of the call's span).

use std::sync::{
    OnceLock,
    atomic::{AtomicBool, Ordering},
};

use opentelemetry::{
    global,
    trace::{TraceContextExt as _, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::{Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{
    EnvFilter, Layer, filter::Targets, fmt, layer::SubscriberExt, util::SubscriberInitExt,
};

use crate::config::{LogFormat, TelemetrySettings};

/// The target of every span exported as a trace.
pub const SPANS: &str = "otel";

/// The service name traces carry unless `OTEL_SERVICE_NAME` says otherwise.
const SERVICE_NAME: &str = "ecommerce";

static TRACING: AtomicBool = AtomicBool::new(false);
static RPC_DUP: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are exported (so call sites may skip preparing what only a trace needs).
pub fn tracing_on() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Whether call spans also carry the RPC attributes of the semantic conventions before their
/// stable version (`OTEL_SEMCONV_STABILITY_OPT_IN` holds `rpc/dup`), beside the current ones.
pub fn rpc_dup() -> bool {
    RPC_DUP.load(Ordering::Relaxed)
}

/// `rpc/dup` among the comma-separated values of `OTEL_SEMCONV_STABILITY_OPT_IN` (the other
/// values are other instrumentations' business).
fn asks_rpc_dup(opt_in: &str) -> bool {
    opt_in.split(',').any(|value| value.trim() == "rpc/dup")
}

/// Installs the global subscriber (and, with an OTLP endpoint, the trace exporter). Must run
/// inside the Tokio runtime (the exporter's gRPC client needs it). Calling it again is
/// harmless: the first installation stays (tests start many servers in one process).
pub fn init(settings: &TelemetrySettings) {
    let mut filter = settings.log_filter.clone();
    if settings.otlp_endpoint.is_none() {
        filter.push_str(&format!(",{SPANS}=off"));
    }
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match settings.log_format {
        LogFormat::Text => fmt::layer().with_target(true).boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    }
    .with_filter(filter);
    let traces = settings
        .otlp_endpoint
        .as_deref()
        .and_then(tracer_provider)
        .map(|provider| {
            let tracer = provider.tracer(SERVICE_NAME);
            let _ = PROVIDER.set(provider);
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(Targets::new().with_target(SPANS, tracing::Level::TRACE))
        });
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok();
    if installed && PROVIDER.get().is_some() {
        global::set_text_map_propagator(TraceContextPropagator::new());
        RPC_DUP.store(asks_rpc_dup(&settings.semconv_opt_in), Ordering::Relaxed);
        TRACING.store(true, Ordering::Relaxed);
    }
}

/// The OTLP/gRPC exporter behind a batch processor (its own thread: exporting never runs on a
/// request's task). `None`, with a warning, when the exporter cannot be built.
fn tracer_provider(endpoint: &str) -> Option<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build();
    let exporter = match exporter {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("tracing disabled: the OTLP exporter cannot be built ({e})");
            return None;
        }
    };
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| SERVICE_NAME.to_owned());
    Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(name).build())
            .build(),
    )
}

/// Exports what is buffered and stops the exporter (at shutdown).
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(e) = provider.shutdown()
    {
        tracing::warn!(error = %e, "trace exporter shutdown");
    }
}

/// A span for one step of a call (a use case such as `orders.place`), exported as `name`; a
/// child of the current span. With tracing off it is disabled at its callsite: nothing is
/// recorded or allocated. (Postgres statements get theirs from `#[tracing::instrument(target =
/// "otel", ...)]`, which takes only a literal target.)
pub fn step(name: &'static str) -> Span {
    tracing::info_span!(target: SPANS, "step", otel.name = name)
}

/// The span of one Redis script call, exported as `name` (`coupon_gate.decide`).
pub fn redis_script(name: &'static str) -> Span {
    tracing::info_span!(target: SPANS, "redis", otel.name = name, db.system = "redis")
}

/// The span of work done once for many calls (a batch of inserts written by one statement):
/// a root of its own, linked to each caller's span, so a call's trace leads to the batch that
/// served it and the batch lists every call it served. Disabled while tracing is off.
pub fn batch<'a>(name: &'static str, callers: impl IntoIterator<Item = &'a Span>) -> Span {
    if !tracing_on() {
        return Span::none();
    }
    let span = tracing::info_span!(target: SPANS, parent: None, "batch", otel.name = name, batch.size = Empty);
    link_all(
        &span,
        callers
            .into_iter()
            .map(|caller| Some(caller.context().span().span_context().clone())),
    );
    span
}

/// Links `span` to each valid context of `linked` and records how many there were.
fn link_all(span: &Span, linked: impl Iterator<Item = Option<opentelemetry::trace::SpanContext>>) {
    let mut size = 0_u64;
    for context in linked {
        size += 1;
        if let Some(context) = context.filter(|c| c.is_valid()) {
            span.add_link(context);
        }
    }
    span.record("batch.size", size);
}

/// A W3C trace context as it travels in headers: `traceparent` and, when set, `tracestate`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The current span's context (nothing while tracing is off: no work on the hot path).
    pub fn current() -> Self {
        if !tracing_on() {
            return Self::default();
        }
        Self::of(&Span::current().context())
    }

    fn of(context: &opentelemetry::Context) -> Self {
        let mut fields = Fields::default();
        global::get_text_map_propagator(|p| p.inject_context(context, &mut fields));
        Self {
            traceparent: fields.0.remove("traceparent"),
            tracestate: fields.0.remove("tracestate").filter(|s| !s.is_empty()),
        }
    }

    /// The span this context names, to link a later step (a delivery) to it.
    fn span_context(&self) -> Option<opentelemetry::trace::SpanContext> {
        let mut fields = Fields::default();
        fields
            .0
            .insert("traceparent".into(), self.traceparent.clone()?);
        if let Some(state) = &self.tracestate {
            fields.0.insert("tracestate".into(), state.clone());
        }
        let context = global::get_text_map_propagator(|p| p.extract(&fields));
        Some(context.span().span_context().clone())
    }
}

#[derive(Default)]
struct Fields(std::collections::HashMap<String, String>);

impl opentelemetry::propagation::Injector for Fields {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

impl opentelemetry::propagation::Extractor for Fields {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The span of one delivery to the data platform: a root linked to the trace of every event
/// it carries (each written by a payment's call), whose own context is what a batch's request
/// carries. Disabled while tracing is off, and `events` is then not even read.
pub fn delivery(events: impl IntoIterator<Item = TraceContext>) -> (Span, TraceContext) {
    if !tracing_on() {
        return (Span::none(), TraceContext::default());
    }
    let span = tracing::info_span!(target: SPANS, parent: None, "delivery",
        otel.name = "outbox.deliver", otel.kind = "producer", batch.size = Empty);
    link_all(&span, events.into_iter().map(|e| e.span_context()));
    let context = TraceContext::of(&span.context());
    (span, context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rpc_dup_asks_for_the_older_attributes() {
        assert!(asks_rpc_dup("rpc/dup"));
        assert!(asks_rpc_dup("http, rpc/dup"));
        assert!(!asks_rpc_dup(""));
        assert!(!asks_rpc_dup("rpc"));
        assert!(!asks_rpc_dup("http/dup,database"));
    }
}
