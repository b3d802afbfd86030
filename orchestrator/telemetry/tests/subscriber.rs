//! The subscriber `test_subscriber_with_exporter` builds: tracing spans become OpenTelemetry
//! spans with their fields as attributes, the trace id is visible, and service tracers report
//! as their own service.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use opentelemetry::trace::{TraceContextExt, Tracer as _};
use opentelemetry::{Key, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData, SpanExporter};
use telemetry::{LogFormat, TelemetryConfig, attributes};

fn config() -> TelemetryConfig {
    TelemetryConfig {
        service_name: "orchestrator".to_owned(),
        log_format: LogFormat::Json,
        otlp_endpoint: None,
    }
}

#[test]
fn tracing_spans_are_exported_with_their_fields_and_the_trace_id_is_current() {
    let exporter = InMemorySpanExporter::default();
    let (subscriber, telemetry) =
        telemetry::test_subscriber_with_exporter(config(), exporter.clone()).unwrap();
    assert!(telemetry.exporting());

    let (trace_id, injected) = tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("saga", saga.id = "s-1", saga.name = "order");
        let _entered = span.enter();
        tracing::info!(saga.step = "charge", "step started");
        let mut metadata = tonic::metadata::MetadataMap::new();
        telemetry::inject(&opentelemetry::Context::current(), &mut metadata);
        (
            telemetry::current_trace_id(),
            metadata
                .get("traceparent")
                .map(|v| v.to_str().unwrap().to_owned()),
        )
    });
    // The simple processor exported the span when it closed. (The in-memory exporter forgets
    // its spans on shutdown: read them first.)
    let spans = exporter.get_finished_spans().unwrap();
    telemetry.shutdown();

    assert_eq!(spans.len(), 1);
    let span = &spans[0];
    assert_eq!(span.name, "saga");
    let trace_id = trace_id.expect("a trace id inside an exported span");
    assert_eq!(trace_id.len(), 32);
    assert_eq!(span.span_context.trace_id().to_string(), trace_id);
    let injected = injected.expect("the current context is injected");
    assert!(injected.contains(&trace_id), "{injected}");
    assert!(injected.contains(&span.span_context.span_id().to_string()));
    let attribute = |key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.clone())
    };
    assert_eq!(attribute(attributes::SAGA_ID), Some(Value::from("s-1")));
    assert_eq!(attribute(attributes::SAGA_NAME), Some(Value::from("order")));
    assert_eq!(span.events.len(), 1);
}

/// Records `(service.name, span name)` per exported span; each clone (one per provider)
/// keeps its own provider's resource.
#[derive(Debug, Clone, Default)]
struct ByService {
    service: String,
    spans: Arc<Mutex<Vec<(String, String)>>>,
}

impl SpanExporter for ByService {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut spans = self.spans.lock().unwrap();
        for span in batch {
            spans.push((self.service.clone(), span.name.into_owned()));
        }
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.service = resource
            .get(&Key::new("service.name"))
            .map(|v| v.to_string())
            .unwrap_or_default();
    }
}

#[test]
fn service_tracers_report_as_their_own_service() {
    let exporter = ByService::default();
    let (subscriber, telemetry) =
        telemetry::test_subscriber_with_exporter(config(), exporter.clone()).unwrap();
    let tracer = telemetry.service_tracer("payment").unwrap();
    tracer.in_span("payment.v1.Payment/Authorize", |cx| {
        assert!(cx.span().span_context().is_valid());
    });
    tracing::subscriber::with_default(subscriber, || {
        tracing::info_span!("saga").in_scope(|| {});
    });
    telemetry.shutdown();

    let mut spans = exporter.spans.lock().unwrap().clone();
    spans.sort();
    let main = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "orchestrator".to_owned());
    assert_eq!(
        spans,
        vec![
            (main, "saga".to_owned()),
            (
                "payment".to_owned(),
                "payment.v1.Payment/Authorize".to_owned()
            ),
        ]
    );
}

#[test]
fn without_an_endpoint_nothing_is_exported_and_there_is_no_trace_id() {
    // Only meaningful when the environment does not configure an endpoint.
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
    {
        return;
    }
    let (subscriber, telemetry) = telemetry::test_subscriber(config()).unwrap();
    assert!(!telemetry.exporting());
    assert!(telemetry.tracer().is_none());
    assert!(telemetry.service_tracer("payment").is_none());
    let trace_id = tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("saga", saga.id = "s-1");
        let _entered = span.enter();
        telemetry::current_trace_id()
    });
    assert_eq!(trace_id, None);
}
