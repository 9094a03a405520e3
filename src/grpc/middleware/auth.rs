//! Service authentication: when `SERVICE_TOKEN` is set, calls other than probes, reflection and
//! AdminService must present it.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use subtle::ConstantTimeEq;
use tonic::body::Body;
use tower::{Layer, Service};

use super::{Guarded, is_infrastructure};
use crate::error::AppError;

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
