//! Guards applied to every call before it reaches a handler: service authentication, load
//! shedding, deadlines, and the status of an oversized request.
//!
//! Each refusal is decided from the request headers alone (no body is read, no store is
//! touched) and answered with a trailers-only gRPC response carrying the same ErrorInfo as any
//! other error. Health checks and reflection are exempt from authentication and shedding, so
//! probes keep answering under load.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{HeaderMap, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Status, body::Body};
use tower::{Layer, Service};

use crate::error::AppError;

/// Calls that must answer even without credentials and under load: probes and reflection.
fn is_infrastructure(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.")
}

fn refuse(error: AppError) -> Response<Body> {
    Status::from(error).into_http()
}

pin_project! {
    /// The future of a guarded call: either an immediate refusal or the inner call.
    #[project = GuardedProj]
    pub enum Guarded<F> {
        Refused { response: Option<Response<Body>> },
        Inner { #[pin] inner: F },
    }
}

impl<F> Guarded<F> {
    fn refused(error: AppError) -> Self {
        Guarded::Refused {
            response: Some(refuse(error)),
        }
    }

    fn inner(inner: F) -> Self {
        Guarded::Inner { inner }
    }
}

impl<F, E> Future for Guarded<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            GuardedProj::Refused { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            GuardedProj::Inner { inner } => inner.poll(cx),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Service authentication

/// When `SERVICE_TOKEN` is set, every call except health, reflection and AdminService (which
/// has its own token) must carry `authorization: Bearer <SERVICE_TOKEN>`. The comparison is
/// constant-time for a given length.
#[derive(Clone)]
pub struct ServiceAuthLayer {
    expected: Option<Arc<[u8]>>,
}

impl ServiceAuthLayer {
    pub fn new(token: Option<&str>) -> Self {
        Self {
            expected: token.map(|t| format!("Bearer {t}").into_bytes().into()),
        }
    }
}

impl<S> Layer<S> for ServiceAuthLayer {
    type Service = ServiceAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServiceAuth {
            inner,
            expected: self.expected.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ServiceAuth<S> {
    inner: S,
    expected: Option<Arc<[u8]>>,
}

impl<S, B> Service<Request<B>> for ServiceAuth<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Guarded<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if let Some(expected) = &self.expected {
            let path = request.uri().path();
            let exempt = is_infrastructure(path) || path.starts_with("/ecommerce.v1.AdminService/");
            let presented = request.headers().get(http::header::AUTHORIZATION);
            let valid = presented.is_some_and(|v| bool::from(v.as_bytes().ct_eq(expected)));
            if !exempt && !valid {
                return Guarded::refused(AppError::Unauthenticated);
            }
        }
        Guarded::inner(self.inner.call(request))
    }
}

// ---------------------------------------------------------------------------------------------
// Load shedding

/// At most `limit` calls are handled at once; past that a call is refused at once with
/// RESOURCE_EXHAUSTED instead of queueing without bound (clients retry with backoff, and the
/// calls already admitted keep their latency).
#[derive(Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
}

impl ShedLayer {
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            permits: self.permits.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

pin_project! {
    /// Holds the call's permit until the handler has answered.
    pub struct WithPermit<F> {
        #[pin]
        inner: F,
        permit: Option<OwnedSemaphorePermit>,
    }
}

impl<F: Future> Future for WithPermit<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = ready!(this.inner.poll(cx));
        this.permit.take();
        Poll::Ready(output)
    }
}

impl<S, B> Service<Request<B>> for Shed<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Guarded<WithPermit<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let permit = if is_infrastructure(request.uri().path()) {
            None
        } else {
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => return Guarded::refused(AppError::Overloaded),
            }
        };
        Guarded::inner(WithPermit {
            inner: self.inner.call(request),
            permit,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Deadlines

/// Every call gets a deadline: the caller's `grpc-timeout`, capped by the server default. A call
/// still running at its deadline is dropped (its transaction rolls back) and answered with
/// DEADLINE_EXCEEDED.
///
/// The answer leaves a few milliseconds before the deadline: tonic's own timer (outside our
/// layers) and the caller's would otherwise fire first and report CANCELLED instead.
#[derive(Clone, Copy)]
pub struct DeadlineLayer {
    default: Duration,
}

impl DeadlineLayer {
    pub fn new(default: Duration) -> Self {
        Self { default }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            default: self.default,
        }
    }
}

#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    default: Duration,
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?;
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

fn deadline_for(headers: &HeaderMap, default: Duration) -> Duration {
    let requested = headers
        .get("grpc-timeout")
        .and_then(parse_grpc_timeout)
        .unwrap_or(default)
        .min(default);
    let margin = (requested / 10).min(Duration::from_millis(5));
    requested - margin
}

pin_project! {
    pub struct WithDeadline<F> {
        #[pin]
        inner: F,
        #[pin]
        timer: tokio::time::Sleep,
    }
}

impl<F, E> Future for WithDeadline<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.inner.poll(cx) {
            return Poll::Ready(output);
        }
        ready!(this.timer.poll(cx));
        Poll::Ready(Ok(refuse(AppError::DeadlineExceeded)))
    }
}

impl<S, B> Service<Request<B>> for Deadline<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = WithDeadline<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let deadline = deadline_for(request.headers(), self.default);
        WithDeadline {
            inner: self.inner.call(request),
            timer: tokio::time::sleep(deadline),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Oversized requests

/// tonic refuses a request larger than the decoding limit from its length prefix, before
/// reading the message, but with OUT_OF_RANGE. gRPC's convention (and our contract) is
/// RESOURCE_EXHAUSTED with a reason; this layer rewrites exactly that refusal.
#[derive(Clone, Copy, Default)]
pub struct TooLargeLayer;

impl<S> Layer<S> for TooLargeLayer {
    type Service = TooLarge<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TooLarge { inner }
    }
}

#[derive(Clone)]
pub struct TooLarge<S> {
    inner: S,
}

/// The start of tonic's message for a request over the decoding limit (tonic's codec/decode.rs).
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

fn is_too_large_refusal(headers: &HeaderMap) -> bool {
    headers.get("grpc-status").map(HeaderValue::as_bytes) == Some(b"11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| {
                // grpc-message is percent-encoded: spaces and commas may be escaped.
                m.replace("%20", " ")
                    .replace("%2C", ",")
                    .starts_with(TONIC_TOO_LARGE)
            })
}

pin_project! {
    pub struct Rewritten<F> {
        #[pin]
        inner: F,
    }
}

impl<F, E> Future for Rewritten<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = ready!(self.project().inner.poll(cx))?;
        if is_too_large_refusal(response.headers()) {
            return Poll::Ready(Ok(refuse(AppError::MessageTooLarge)));
        }
        Poll::Ready(Ok(response))
    }
}

impl<S, B> Service<Request<B>> for TooLarge<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Rewritten<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        Rewritten {
            inner: self.inner.call(request),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_are_capped() {
        let parse = |s: &str| parse_grpc_timeout(&HeaderValue::from_str(s).unwrap());
        assert_eq!(parse("50m"), Some(Duration::from_millis(50)));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "5", "5x", "-5m", "123456789m", "1.5S"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        let mut headers = HeaderMap::new();
        let default = Duration::from_secs(30);
        assert_eq!(
            deadline_for(&headers, default),
            default - Duration::from_millis(5)
        );
        headers.insert("grpc-timeout", HeaderValue::from_static("50m"));
        assert_eq!(deadline_for(&headers, default), Duration::from_millis(45));
        headers.insert("grpc-timeout", HeaderValue::from_static("1H"));
        assert_eq!(
            deadline_for(&headers, default),
            default - Duration::from_millis(5)
        );
    }

    #[test]
    fn only_tonics_size_refusal_is_rewritten() {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from_static("11"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static(
                "Error,%20decoded%20message%20length%20too%20large: found 2000000",
            ),
        );
        assert!(is_too_large_refusal(&headers));
        // Our own OUT_OF_RANGE (a balance past its maximum) is left alone.
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("the balance would exceed the maximum"),
        );
        assert!(!is_too_large_refusal(&headers));
    }

    #[test]
    fn probes_and_reflection_are_infrastructure() {
        assert!(is_infrastructure("/grpc.health.v1.Health/Check"));
        assert!(is_infrastructure(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_infrastructure(
            "/ecommerce.v1.CouponService/IssueCoupon"
        ));
    }
}
