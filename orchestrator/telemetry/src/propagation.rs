//! W3C trace context (`traceparent`, `tracestate`) in gRPC metadata and HTTP headers.
//!
//! These use [`TraceContextPropagator`] directly rather than the global propagator, so they
//! work whether or not [`crate::init`] ran (in tests, in libraries).

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Writes `cx`'s span context into `metadata` as `traceparent` (and `tracestate`); writes
/// nothing when `cx` has no valid span context.
pub fn inject(cx: &opentelemetry::Context, metadata: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(metadata));
}

/// The remote parent carried by `headers` (`traceparent`, `tracestate`); an empty context
/// (no parent) when absent or malformed.
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The trace id (32 lowercase hex characters) of the current tracing span, if it has a valid
/// OpenTelemetry context (that is, when spans are exported and a span is entered).
pub fn current_trace_id() -> Option<String> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let span_context = span.span_context();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator only produces lowercase ASCII keys and visible-ASCII values.
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    #[test]
    fn inject_then_extract_round_trips_the_span_context() {
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let span_id = SpanId::from_hex("00f067aa0ba902b7").unwrap();
        let sc = SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc);
        let mut metadata = MetadataMap::new();
        inject(&cx, &mut metadata);
        assert_eq!(
            metadata.get("traceparent").unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );

        let headers = metadata.into_headers();
        let extracted = extract(&headers);
        let span = extracted.span();
        let got = span.span_context();
        assert!(got.is_remote());
        assert_eq!(got.trace_id(), trace_id);
        assert_eq!(got.span_id(), span_id);
        assert!(got.is_sampled());
    }

    #[test]
    fn nothing_is_injected_without_a_span_and_nothing_extracted_from_garbage() {
        let mut metadata = MetadataMap::new();
        inject(&opentelemetry::Context::new(), &mut metadata);
        assert!(metadata.is_empty());

        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", http::HeaderValue::from_static("garbage"));
        assert!(!extract(&headers).span().span_context().is_valid());
        assert_eq!(current_trace_id(), None);
    }
}
