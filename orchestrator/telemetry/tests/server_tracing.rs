//! `grpc::ServerTracingLayer` around a plain tower service: span names, parents, attributes
//! and status codes from headers and trailers, and the observer.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use opentelemetry::Value;
use opentelemetry::trace::{SpanKind, Status, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use telemetry::grpc::{CallObserver, CallOutcome, ServerTracingLayer};
use tonic::Code;
use tower::{Layer, Service, ServiceExt, service_fn};

type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

fn provider() -> (SdkTracerProvider, InMemorySpanExporter) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    (provider, exporter)
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(String, String, Code)>>);

impl CallObserver for Recorder {
    fn on_call_end(&self, outcome: &CallOutcome<'_>) {
        self.0.lock().unwrap().push((
            outcome.service.to_owned(),
            outcome.method.to_owned(),
            outcome.code,
        ));
    }
}

/// Answers `/x.v1.X/Fail` trailers-only with NOT_FOUND, `/x.v1.X/Boom` trailers-only with
/// INTERNAL, anything else with a message and `grpc-status: 0` trailers.
async fn handler(request: Request<()>) -> Result<Response<TestBody>, Infallible> {
    let trailers_only = |code: &'static str| {
        Response::builder()
            .header("grpc-status", code)
            .body(Empty::new().boxed_unsync())
            .unwrap()
    };
    Ok(match request.uri().path() {
        "/x.v1.X/Fail" => trailers_only("5"),
        "/x.v1.X/Boom" => trailers_only("13"),
        _ => {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"reply"))),
                Ok(Frame::trailers(trailers)),
            ];
            Response::new(StreamBody::new(futures::stream::iter(frames)).boxed_unsync())
        }
    })
}

fn attribute(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

fn request(path: &str, traceparent: Option<&'static str>) -> Request<()> {
    let mut builder = Request::builder().uri(format!("http://localhost{path}"));
    if let Some(traceparent) = traceparent {
        builder = builder.header("traceparent", traceparent);
    }
    builder.body(()).unwrap()
}

#[tokio::test]
async fn a_call_with_a_traceparent_gets_a_child_server_span_ended_with_the_trailer_status() {
    let (provider, exporter) = provider();
    let recorder = Arc::new(Recorder::default());
    let mut service = ServerTracingLayer::new(Some(provider.tracer("test")))
        .with_observer(recorder.clone())
        .layer(service_fn(handler));

    let response = service
        .ready()
        .await
        .unwrap()
        .call(request(
            "/x.v1.X/Do",
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ))
        .await
        .unwrap();
    // Not ended before the body (and its trailers) have been sent.
    assert!(exporter.get_finished_spans().unwrap().is_empty());
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");

    let spans = exporter.get_finished_spans().unwrap();
    assert_eq!(spans.len(), 1);
    let span = &spans[0];
    assert_eq!(span.name, "x.v1.X/Do");
    assert_eq!(span.span_kind, SpanKind::Server);
    assert_eq!(
        span.span_context.trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(span.parent_span_id.to_string(), "00f067aa0ba902b7");
    assert!(span.parent_span_is_remote);
    assert_eq!(attribute(span, "rpc.system"), Some(Value::from("grpc")));
    assert_eq!(attribute(span, "rpc.service"), Some(Value::from("x.v1.X")));
    assert_eq!(attribute(span, "rpc.method"), Some(Value::from("Do")));
    assert_eq!(attribute(span, "rpc.grpc.status_code"), Some(Value::I64(0)));
    assert_eq!(span.status, Status::Unset);
    assert_eq!(
        *recorder.0.lock().unwrap(),
        vec![("x.v1.X".to_owned(), "Do".to_owned(), Code::Ok)]
    );
}

#[tokio::test]
async fn trailers_only_responses_take_the_status_from_the_headers() {
    let (provider, exporter) = provider();
    let mut service =
        ServerTracingLayer::new(Some(provider.tracer("test"))).layer(service_fn(handler));

    for path in ["/x.v1.X/Fail", "/x.v1.X/Boom"] {
        let response = service
            .ready()
            .await
            .unwrap()
            .call(request(path, None))
            .await
            .unwrap();
        drop(response);
    }

    let spans = exporter.get_finished_spans().unwrap();
    assert_eq!(spans.len(), 2);
    // A root span: no parent came with the request.
    assert_eq!(
        spans[0].parent_span_id,
        opentelemetry::trace::SpanId::INVALID
    );
    assert_eq!(
        attribute(&spans[0], "rpc.grpc.status_code"),
        Some(Value::I64(5))
    );
    // NOT_FOUND is the client's problem, INTERNAL the server's.
    assert_eq!(spans[0].status, Status::Unset);
    assert_eq!(
        attribute(&spans[1], "rpc.grpc.status_code"),
        Some(Value::I64(13))
    );
    assert!(matches!(spans[1].status, Status::Error { .. }));
}

#[tokio::test]
async fn a_body_dropped_before_its_end_counts_as_cancelled() {
    let recorder = Arc::new(Recorder::default());
    let mut service = ServerTracingLayer::<opentelemetry_sdk::trace::SdkTracer>::new(None)
        .with_observer(recorder.clone())
        .layer(service_fn(handler));
    let response = service
        .ready()
        .await
        .unwrap()
        .call(request("/x.v1.X/Do", None))
        .await
        .unwrap();
    assert!(recorder.0.lock().unwrap().is_empty());
    drop(response);
    assert_eq!(
        *recorder.0.lock().unwrap(),
        vec![("x.v1.X".to_owned(), "Do".to_owned(), Code::Cancelled)]
    );
}

#[tokio::test]
async fn without_tracer_or_observer_the_layer_only_forwards() {
    let mut service = ServerTracingLayer::<opentelemetry_sdk::trace::SdkTracer>::new(None)
        .layer(service_fn(handler));
    let response = service
        .ready()
        .await
        .unwrap()
        .call(request("/x.v1.X/Fail", None))
        .await
        .unwrap();
    assert_eq!(response.headers()["grpc-status"], "5");
}
