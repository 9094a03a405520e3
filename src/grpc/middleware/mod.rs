//! Guards applied to every call before it reaches a handler: service authentication, load
//! shedding, deadlines, and the status of an oversized request.
//!
//! Each refusal is decided from the request headers alone (no body is read, no store is
//! touched) and answered with a trailers-only gRPC response carrying the same ErrorInfo as any
//! other error. Health checks and reflection are exempt from authentication and shedding, so
//! probes keep answering under load.

mod auth;
mod deadline;
mod shed;
mod too_large;

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http::Response;
use pin_project_lite::pin_project;
use tonic::{Status, body::Body};

pub use self::{
    auth::ServiceAuthLayer, deadline::DeadlineLayer, shed::ShedLayer, too_large::TooLargeLayer,
};
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

#[cfg(test)]
mod tests {
    use super::*;

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
