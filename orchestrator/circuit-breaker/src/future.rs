//! [`ResponseFuture`]: a rejected call, or an admitted call waiting for its response head.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Response, StatusCode};
use pin_project_lite::pin_project;

use crate::body::ClassifiedBody;
use crate::breaker::Permit;
use crate::classify::{Classify, Outcome, grpc_status};
use crate::error::{BoxError, Rejected};

pin_project! {
    /// The future of [`CircuitBreakerService`](crate::CircuitBreakerService). Dropping it
    /// before it completes cancels the call: nothing is recorded, and a half-open probe
    /// slot is freed.
    pub struct ResponseFuture<F, C> {
        #[pin]
        kind: Kind<F, C>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, C> {
        Rejected {
            rejected: Option<Rejected>,
        },
        Called {
            #[pin]
            future: F,
            // `Some` until the response head (or an error) arrives.
            call: Option<(Permit, C)>,
        },
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn called(future: F, permit: Permit, classifier: C) -> Self {
        Self {
            kind: Kind::Called {
                future,
                call: Some((permit, classifier)),
            },
        }
    }

    pub(crate) fn rejected(rejected: Rejected) -> Self {
        Self {
            kind: Kind::Rejected {
                rejected: Some(rejected),
            },
        }
    }
}

impl<F, C, ResBody, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    E: Into<BoxError>,
    ResBody: http_body::Body,
    C: Classify,
{
    type Output = Result<Response<ClassifiedBody<ResBody, C>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Rejected { rejected } => Poll::Ready(Err(match rejected.take() {
                Some(rejected) => Box::new(rejected.to_status()),
                None => "circuit breaker response future polled after completion".into(),
            })),
            KindProj::Called { future, call } => {
                let result = ready!(future.poll(cx));
                let Some((permit, classifier)) = call.take() else {
                    return Poll::Ready(Err(
                        "circuit breaker response future polled after completion".into(),
                    ));
                };
                Poll::Ready(match result {
                    Ok(response) => {
                        let (parts, body) = response.into_parts();
                        let outcome = if parts.status != StatusCode::OK {
                            Some(Outcome::Failure)
                        } else if let Some(code) = grpc_status(&parts.headers) {
                            // A trailers-only response carries its status in the headers.
                            Some(classifier.classify_status(Some(code)))
                        } else if body.is_end_stream() {
                            // No status, and no body to bring one: nobody need poll it.
                            Some(classifier.classify_status(None))
                        } else {
                            None
                        };
                        let body = match outcome {
                            Some(outcome) => {
                                permit.record(outcome);
                                ClassifiedBody::classified(body)
                            }
                            None => ClassifiedBody::pending(body, permit, classifier),
                        };
                        Ok(Response::from_parts(parts, body))
                    }
                    Err(error) => {
                        let error: BoxError = error.into();
                        permit.record(classifier.classify_error(&*error));
                        Err(error)
                    }
                })
            }
        }
    }
}

impl<F, C> std::fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Rejected { .. } => "rejected",
            Kind::Called { .. } => "called",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}
