//! [`CircuitBreakerService`]: admits or rejects each call, and hands the outcome to the
//! breaker once the response (headers, then possibly trailers) tells it.

use std::task::{Context, Poll};

use http::{Request, Response};
use tower::Service;

use crate::body::ClassifiedBody;
use crate::breaker::CircuitBreaker;
use crate::classify::Classify;
use crate::error::BoxError;
use crate::future::ResponseFuture;

/// A service behind a circuit breaker.
///
/// `poll_ready` only asks the inner service; the breaker decides in `call`, failing fast with
/// a boxed [`tonic::Status`] (see [`Rejected::to_status`](crate::Rejected::to_status)) rather
/// than withholding readiness, so buffers and balancers do not take the service for dead.
/// Clones share the breaker and hold no per-call state; each call carries a clone of the
/// classifier.
#[derive(Debug)]
pub struct CircuitBreakerService<S, C> {
    inner: S,
    breaker: CircuitBreaker,
    /// Cloned into each call's future and body.
    classifier: C,
}

impl<S: Clone, C: Clone> Clone for CircuitBreakerService<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<S, C> CircuitBreakerService<S, C> {
    pub fn new(inner: S, breaker: CircuitBreaker, classifier: C) -> Self {
        Self {
            inner,
            breaker,
            classifier,
        }
    }

    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, C, ReqBody, ResBody> Service<Request<ReqBody>> for CircuitBreakerService<S, C>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body,
    C: Classify,
{
    type Response = Response<ClassifiedBody<ResBody, C>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        match self.breaker.try_acquire() {
            Ok(permit) => {
                ResponseFuture::called(self.inner.call(request), permit, self.classifier.clone())
            }
            Err(rejected) => ResponseFuture::rejected(rejected),
        }
    }
}
