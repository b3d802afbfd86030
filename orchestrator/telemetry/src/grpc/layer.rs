//! [`ServerTracingLayer`] and its service, [`ServerTracing`].

use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use http::{Request, Response};
use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
use tower::{Layer, Service};

use super::{Call, CallObserver, ResponseBody, ResponseFuture, split_path};
use crate::attributes;

/// Traces (and optionally observes) every gRPC call a tonic server serves; see the [module
/// documentation](super). `T` is the tracer, e.g. [`crate::Tracer`] from
/// [`crate::Telemetry::tracer`] or [`crate::Telemetry::service_tracer`].
pub struct ServerTracingLayer<T = crate::Tracer> {
    tracer: Option<T>,
    observer: Option<Arc<dyn CallObserver>>,
}

impl<T: Clone> Clone for ServerTracingLayer<T> {
    fn clone(&self) -> Self {
        ServerTracingLayer {
            tracer: self.tracer.clone(),
            observer: self.observer.clone(),
        }
    }
}

impl<T> std::fmt::Debug for ServerTracingLayer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTracingLayer")
            .field("tracing", &self.tracer.is_some())
            .field("observing", &self.observer.is_some())
            .finish()
    }
}

impl<T> Default for ServerTracingLayer<T> {
    fn default() -> Self {
        ServerTracingLayer {
            tracer: None,
            observer: None,
        }
    }
}

impl<T> ServerTracingLayer<T> {
    /// Starts a server span per call with `tracer`; with None, no span.
    pub fn new(tracer: Option<T>) -> Self {
        ServerTracingLayer {
            tracer,
            observer: None,
        }
    }

    /// Also reports every call's outcome to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn CallObserver>) -> Self {
        self.observer = Some(observer);
        self
    }
}

impl<S, T: Clone> Layer<S> for ServerTracingLayer<T> {
    type Service = ServerTracing<S, T>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerTracing {
            inner,
            tracer: self.tracer.clone(),
            observer: self.observer.clone(),
        }
    }
}

/// The service [`ServerTracingLayer`] wraps around a server.
pub struct ServerTracing<S, T = crate::Tracer> {
    inner: S,
    tracer: Option<T>,
    observer: Option<Arc<dyn CallObserver>>,
}

impl<S: Clone, T: Clone> Clone for ServerTracing<S, T> {
    fn clone(&self) -> Self {
        ServerTracing {
            inner: self.inner.clone(),
            tracer: self.tracer.clone(),
            observer: self.observer.clone(),
        }
    }
}

impl<S, T> std::fmt::Debug for ServerTracing<S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTracing")
            .field("tracing", &self.tracer.is_some())
            .field("observing", &self.observer.is_some())
            .finish_non_exhaustive()
    }
}

impl<S, T, ReqBody, ResBody> Service<Request<ReqBody>> for ServerTracing<S, T>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    T: Tracer,
    T::Span: Send + Sync + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if self.tracer.is_none() && self.observer.is_none() {
            return ResponseFuture::new(self.inner.call(request), None);
        }
        let start = Instant::now();
        let (service, method) = split_path(request.uri().path());
        let cx = self.tracer.as_ref().map(|tracer| {
            let parent = crate::extract(request.headers());
            let name = if service.is_empty() {
                method.to_owned()
            } else {
                format!("{service}/{method}")
            };
            let mut attributes = vec![KeyValue::new(attributes::RPC_SYSTEM, "grpc")];
            if !service.is_empty() {
                attributes.push(KeyValue::new(attributes::RPC_SERVICE, service.to_owned()));
                attributes.push(KeyValue::new(attributes::RPC_METHOD, method.to_owned()));
            }
            let span = tracer
                .span_builder(name)
                .with_kind(SpanKind::Server)
                .with_attributes(attributes)
                .start_with_context(tracer, &parent);
            parent.with_span(span)
        });
        let call = Call {
            cx,
            observer: self.observer.clone(),
            service: service.to_owned(),
            method: method.to_owned(),
            start,
            done: false,
        };
        ResponseFuture::new(self.inner.call(request), Some(call))
    }
}
