//! [`ResponseBody`]: finishes the call with the status in the trailers.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;

use super::{Call, header_code};

pin_project! {
    /// The response body of [`super::ServerTracing`]: the inner body, watched for its trailers.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }
}

impl<B> ResponseBody<B> {
    pub(super) fn new(inner: B, call: Option<Call>) -> Self {
        ResponseBody { inner, call }
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(call) = this.call.as_mut() {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        call.finish(header_code(trailers).unwrap_or(Code::Unknown));
                    }
                }
                // The stream failed: the client sees a reset, not a status.
                Some(Err(_)) => call.finish(Code::Unknown),
                // The end without trailers (a status in the headers finished the call earlier).
                None => call.finish(Code::Unknown),
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
