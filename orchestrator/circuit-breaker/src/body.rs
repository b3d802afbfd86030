//! [`ClassifiedBody`]: a response body that reports the call's outcome when its trailers
//! (or its end, or an error) arrive.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::breaker::Permit;
use crate::classify::{Classify, Outcome, grpc_status};

pin_project! {
    /// A response body behind a circuit breaker. When the outcome was not known from the
    /// response head, it is decided here: by the `grpc-status` of the trailers frame, by
    /// [`Classify::classify_status`]`(None)` if the body ends without trailers, as a failure if
    /// the body errors. Dropped before any of these, the call counts as cancelled (nothing
    /// recorded, a half-open probe slot freed). Frames pass through unchanged.
    pub struct ClassifiedBody<B, C> {
        #[pin]
        inner: B,
        pending: Option<(Permit, C)>,
    }
}

impl<B, C> ClassifiedBody<B, C> {
    pub(crate) fn classified(inner: B) -> Self {
        Self {
            inner,
            pending: None,
        }
    }

    pub(crate) fn pending(inner: B, permit: Permit, classifier: C) -> Self {
        Self {
            inner,
            pending: Some((permit, classifier)),
        }
    }

    /// Whether the call's outcome is still to be read from this body.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B, C> Body for ClassifiedBody<B, C>
where
    B: Body,
    C: Classify,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if this.pending.is_some() {
            // `Some(code)` once the outcome is known: the trailers' status, or `None` at the end.
            let status = match &frame {
                Some(Ok(frame)) => frame.trailers_ref().map(grpc_status),
                Some(Err(_)) => {
                    finish(this.pending, |_| Outcome::Failure);
                    None
                }
                None => Some(None),
            };
            if let Some(code) = status {
                finish(this.pending, |classifier| classifier.classify_status(code));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn finish<C>(pending: &mut Option<(Permit, C)>, outcome: impl FnOnce(&C) -> Outcome) {
    if let Some((permit, classifier)) = pending.take() {
        permit.record(outcome(&classifier));
    }
}

impl<B, C> std::fmt::Debug for ClassifiedBody<B, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassifiedBody")
            .field("pending", &self.pending.is_some())
            .finish_non_exhaustive()
    }
}
