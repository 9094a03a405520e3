//! One record per call: method, gRPC status code and latency, as a log line and as metrics,
//! and, with tracing on, the call's server span: its parent is the caller's W3C
//! `traceparent`/`tracestate`, it runs the whole call (every span below is its child) and it
//! records the status code and the ErrorInfo reason.
//!
//! The span follows OpenTelemetry's RPC semantic conventions for a gRPC server span: named
//! after the full method (`ecommerce.v1.OrderService/PlaceOrder`, or `grpc` for a method this
//! server does not serve, then `rpc.method` `_OTHER` and `rpc.method_original` the path), with
//! `rpc.system.name`, `rpc.method`, `server.address` and `server.port` (from the request's
//! `:authority`) at creation, and `rpc.status_code` (the code's name) and, for the codes the
//! conventions count as server errors, `error.type` (the same name) and an ERROR status at the
//! end. With `OTEL_SEMCONV_STABILITY_OPT_IN=rpc/dup` it also carries the older attributes
//! (`rpc.system`, `rpc.service`, the integer `rpc.grpc.status_code`; `rpc.method` keeps its
//! current, full value).
//!
//! The code of a successful call travels in the HTTP/2 trailers, after the body, so the record
//! is made when the trailers pass by (or when the response headers already carry `grpc-status`,
//! as in a trailers-only error). The per-call cost is one `Instant::now()`, a reference-counted
//! copy of the path and a metrics update (see `crate::metrics`); the log line itself is at DEBUG
//! level (target `access`), so under load it costs a level check unless asked for.
//!
//! A call its caller abandons (RST_STREAM, a closed connection, the caller's own deadline) is
//! recorded as CANCELLED, whenever it goes: hyper drops the call's future (or its response
//! body) when it sees the stream reset, and both record CANCELLED when dropped before their
//! status. One path needs help: a request body reset before tonic has read it all. tonic's
//! decoder takes a body failing with CANCEL for a clean end of the request, so a unary call then
//! answers INTERNAL ("Missing request message.", the message cut short), or runs its handler
//! for a caller who is gone (the message whole, END_STREAM never sent); a connection that dies
//! instead answers UNKNOWN. Those answers come back at once, before hyper looks for the reset.
//! [`CallerBody`] therefore holds a body failure back for one poll: hyper, which polls the
//! call before it checks for a reset, sees the reset and drops the call, recorded CANCELLED.
//! A failure hyper does not drop the call for is handed on at the next poll, as before.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use http::{HeaderMap, Request, Response, uri::PathAndQuery};
use http_body::{Body, Frame};
use opentelemetry::{global, propagation::Extractor, trace::TraceContextExt as _};
use pin_project_lite::pin_project;
use tonic::Code;
use tower::{Layer, Service};
use tracing::{Instrument as _, Span, field::Empty, instrument::Instrumented};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::{error::code_name, telemetry};

#[derive(Clone, Copy, Debug, Default)]
pub struct AccessLayer;

impl<S> Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Access { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Access<S> {
    inner: S,
}

/// What is known of a call while it runs.
struct CallStart {
    path: Option<PathAndQuery>,
    started: Instant,
    /// The call's server span (disabled while tracing is off).
    span: Span,
}

impl CallStart {
    fn finish(self, code: Code) {
        let method = self.path.as_ref().map_or("", PathAndQuery::path);
        record(method, code, self.started.elapsed());
        if !self.span.is_disabled() {
            self.span.record("rpc.status_code", code_name(code));
            if telemetry::rpc_dup() {
                self.span.record("rpc.grpc.status_code", code as i64);
            }
            if is_server_error(code) {
                self.span.record("error.type", code_name(code));
                self.span.record("otel.status_code", "ERROR");
            }
        }
    }
}

/// The codes OpenTelemetry's gRPC conventions count as a server span's error (and name in
/// `error.type`).
fn is_server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// The request's headers as the propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The server span of a call, child of the caller's trace context; disabled while tracing is
/// off, so nothing is parsed or allocated then.
fn call_span<B>(request: &Request<B>) -> Span {
    if !telemetry::tracing_on() {
        return Span::none();
    }
    let path = request.uri().path();
    let served = crate::metrics::is_served(path);
    let full = path.trim_start_matches('/');
    let (name, method) = if served {
        (full, full)
    } else {
        ("grpc", "_OTHER")
    };
    let span = tracing::info_span!(
        target: telemetry::SPANS,
        "grpc.server",
        otel.name = name,
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system.name = "grpc",
        rpc.method = method,
        rpc.method_original = Empty,
        rpc.status_code = Empty,
        error.type = Empty,
        server.address = Empty,
        server.port = Empty,
        rpc.system = Empty,
        rpc.service = Empty,
        rpc.grpc.status_code = Empty,
        error.reason = Empty,
        trace_id = Empty,
        span_id = Empty,
    );
    if !served {
        span.record("rpc.method_original", full);
    }
    if let Some(authority) = request.uri().authority() {
        span.record("server.address", authority.host());
        if let Some(port) = authority.port_u16() {
            span.record("server.port", i64::from(port));
        }
    }
    if telemetry::rpc_dup() {
        span.record("rpc.system", "grpc");
        if served && let Some((service, _)) = full.split_once('/') {
            span.record("rpc.service", service);
        }
    }
    let parent = global::get_text_map_propagator(|p| p.extract(&Headers(request.headers())));
    let _ = span.set_parent(parent);
    let context = span.context();
    let ids = context.span().span_context().clone();
    if ids.is_valid() {
        // Fields of the span, so the log lines written inside the call carry them.
        span.record("trace_id", tracing::field::display(ids.trace_id()));
        span.record("span_id", tracing::field::display(ids.span_id()));
    }
    span
}

fn record(method: &str, code: Code, latency: Duration) {
    crate::metrics::record_call(method, code, latency);
    let latency_us = latency.as_micros() as u64;
    match code {
        Code::Internal | Code::Unknown | Code::DataLoss => {
            tracing::warn!(target: "access", method, code = ?code, latency_us, "call failed")
        }
        _ => tracing::debug!(target: "access", method, code = ?code, latency_us, "call"),
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?;
    let code: i32 = std::str::from_utf8(value.as_bytes()).ok()?.parse().ok()?;
    Some(Code::from_i32(code))
}

impl<S, B, ResBody> Service<Request<B>> for Access<S>
where
    S: Service<Request<CallerBody<B>>, Response = Response<ResBody>>,
    B: Body,
{
    type Response = Response<LoggedBody<ResBody>>;
    type Error = S::Error;
    type Future = LoggedFuture<Instrumented<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let span = call_span(&request);
        let start = CallStart {
            path: request.uri().path_and_query().cloned(),
            started: Instant::now(),
            span: span.clone(),
        };
        let request = request.map(CallerBody::new);
        let inner = span.in_scope(|| self.inner.call(request));
        LoggedFuture {
            inner: inner.instrument(span),
            start: Some(start),
        }
    }
}

pin_project! {
    pub struct LoggedFuture<F> {
        #[pin]
        inner: F,
        start: Option<CallStart>,
    }

    impl<F> PinnedDrop for LoggedFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its answer: hyper saw the caller reset the stream or close the
            // connection (or the server is closing it under the call).
            if let Some(start) = this.project().start.take() {
                start.finish(Code::Cancelled);
            }
        }
    }
}

impl<F, ResBody, E> Future for LoggedFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<LoggedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let start = this.start.take();
        Poll::Ready(match result {
            Ok(response) => {
                let start = match grpc_status(response.headers()) {
                    Some(code) => {
                        if let Some(start) = start {
                            start.finish(code);
                        }
                        None
                    }
                    None => start,
                };
                Ok(response.map(|inner| LoggedBody { inner, start }))
            }
            Err(e) => {
                if let Some(start) = start {
                    start.finish(Code::Unknown);
                }
                Err(e)
            }
        })
    }
}

pin_project! {
    /// The response body, watched for the trailers that carry the status.
    pub struct LoggedBody<B> {
        #[pin]
        inner: B,
        start: Option<CallStart>,
    }

    impl<B> PinnedDrop for LoggedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before the trailers: the client went away or the server is shutting down.
            if let Some(start) = this.project().start.take() {
                start.finish(Code::Cancelled);
            }
        }
    }
}

impl<B: Body> Body for LoggedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(start) = this.start.take()
                {
                    start.finish(grpc_status(trailers).unwrap_or(Code::Unknown));
                }
            }
            Some(Err(_)) => {
                if let Some(start) = this.start.take() {
                    start.finish(Code::Unknown);
                }
            }
            None => {
                // A gRPC body ends with trailers; ending without them means no status was sent.
                if let Some(start) = this.start.take() {
                    start.finish(Code::Unknown);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// A call's request body, whose failure (the caller reset the stream or the connection
    /// broke) is held back for one poll, so that hyper drops the call as abandoned instead of
    /// tonic answering it as if the request had ended (see the module documentation).
    pub struct CallerBody<B: Body> {
        #[pin]
        inner: B,
        held: Option<B::Error>,
    }
}

impl<B: Body> CallerBody<B> {
    fn new(inner: B) -> Self {
        Self { inner, held: None }
    }
}

impl<B: Body> Body for CallerBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if let Some(error) = this.held.take() {
            return Poll::Ready(Some(Err(error)));
        }
        match ready!(this.inner.poll_frame(cx)) {
            Some(Err(error)) => {
                *this.held = Some(error);
                // Polled again at once if hyper keeps the call (a failure that is no reset).
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            frame => Poll::Ready(frame),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
