//! [`ResponseFuture`]: runs the handler inside the server span's context and hands the call
//! on to the response body.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;
use tonic::Code;

use super::{Call, ResponseBody, header_code};

pin_project! {
    /// The response future of [`super::ServerTracing`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, call: Option<Call>) -> Self {
        ResponseFuture { inner, call }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            // The handler sees the server span as the current OpenTelemetry context.
            let _attached = this
                .call
                .as_ref()
                .and_then(|call| call.cx.clone())
                .map(opentelemetry::Context::attach);
            ready!(this.inner.poll(cx))
        };
        let mut call = this.call.take();
        match result {
            Ok(response) => {
                if let Some(code) = header_code(response.headers())
                    && let Some(call) = call.as_mut()
                {
                    // A trailers-only response: the status is already known.
                    call.finish(code);
                }
                Poll::Ready(Ok(response.map(|body| ResponseBody::new(body, call))))
            }
            Err(error) => {
                if let Some(call) = call.as_mut() {
                    call.finish(Code::Unknown);
                }
                Poll::Ready(Err(error))
            }
        }
    }
}
