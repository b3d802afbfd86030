//! Server-side gRPC instrumentation: [`ServerTracingLayer`], a tower layer for tonic servers
//! (`Server::builder().layer(...)`).
//!
//! For each call it extracts the caller's W3C `traceparent` from the request headers, starts
//! a span named `<package.Service>/<Method>` (kind Server) with `rpc.system`, `rpc.service`
//! and `rpc.method`, runs the handler with that span as the current OpenTelemetry context (so
//! contextual `tracing` spans the handler opens become its children), and ends it with
//! `rpc.grpc.status_code` once the status is known: from the `grpc-status` response header
//! for a trailers-only response, else from the trailers at the end of the body. A body dropped
//! before its end (the client went away) counts as `CANCELLED`. The same outcome, with the
//! call's duration, goes to an optional [`CallObserver`] (metrics).
//!
//! With neither a tracer nor an observer the layer only forwards (one branch a call).

mod body;
mod future;
mod layer;

pub use body::ResponseBody;
pub use future::ResponseFuture;
pub use layer::{ServerTracing, ServerTracingLayer};

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::trace::{Status, TraceContextExt};
use opentelemetry::{Context, KeyValue};
use tonic::Code;

use crate::attributes;

/// What [`CallObserver::on_call_end`] learns about a finished call.
#[derive(Debug, Clone, Copy)]
pub struct CallOutcome<'a> {
    /// The full service name, e.g. "payment.v1.Payment" (empty when the path is not gRPC's).
    pub service: &'a str,
    /// The method, e.g. "Authorize" (the whole path when the path is not gRPC's).
    pub method: &'a str,
    pub code: Code,
    /// From the request's arrival to the status (the end of the response body).
    pub elapsed: Duration,
}

/// Told about every call a [`ServerTracingLayer`] sees, once, when its status is known.
pub trait CallObserver: Send + Sync + 'static {
    fn on_call_end(&self, outcome: &CallOutcome<'_>);
}

/// The canonical name of a gRPC status code, as in the gRPC specification and the usual
/// Prometheus labels: "OK", "CANCELLED", ..., "UNAUTHENTICATED".
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Splits a gRPC path `/package.Service/Method` into service and method; a path of another
/// shape is returned whole as the method.
fn split_path(path: &str) -> (&str, &str) {
    match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((service, method)) if !service.is_empty() && !method.contains('/') => {
            (service, method)
        }
        _ => ("", path),
    }
}

/// Whether a server span with this status is an error, per the OpenTelemetry gRPC
/// conventions (client-caused codes such as NOT_FOUND are not server errors).
fn is_server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// One call in flight: its span (inside an OpenTelemetry context) and its observer. Finishes
/// exactly once: explicitly with the status, or on drop as CANCELLED (or with the status the
/// headers already carried).
struct Call {
    /// The context holding the server span; None when not tracing.
    cx: Option<Context>,
    observer: Option<Arc<dyn CallObserver>>,
    service: String,
    method: String,
    start: Instant,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        if let Some(cx) = &self.cx {
            let span = cx.span();
            span.set_attribute(KeyValue::new(
                attributes::RPC_GRPC_STATUS_CODE,
                i64::from(code as i32),
            ));
            if is_server_error(code) {
                span.set_status(Status::error(code_name(code)));
            }
            span.end();
        }
        if let Some(observer) = &self.observer {
            observer.on_call_end(&CallOutcome {
                service: &self.service,
                method: &self.method,
                code,
                elapsed: self.start.elapsed(),
            });
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

/// The status a response's headers carry (a trailers-only response), if any.
fn header_code(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|v| Code::from_bytes(v.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/payment.v1.Payment/Authorize"),
            ("payment.v1.Payment", "Authorize")
        );
        assert_eq!(split_path("/healthz"), ("", "/healthz"));
        assert_eq!(split_path("/a/b/c"), ("", "/a/b/c"));
    }

    #[test]
    fn code_names_are_canonical() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
        assert_eq!(code_name(Code::from_i32(16)), "UNAUTHENTICATED");
    }
}
