//! Oversized requests: tonic's refusal rewritten to the contract's RESOURCE_EXHAUSTED.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::{HeaderMap, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tonic::body::Body;
use tower::{Layer, Service};

use super::refuse;
use crate::error::AppError;

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
}
