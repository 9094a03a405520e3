//! Deadlines: every call has one, and a call past it is dropped and answered
//! DEADLINE_EXCEEDED.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{HeaderMap, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tonic::body::Body;
use tower::{Layer, Service};

use super::refuse;
use crate::error::AppError;

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
}
