//! An in-process OTLP/gRPC trace collector for trace assertions: [`OtlpReceiver`] serves
//! `opentelemetry.proto.collector.trace.v1.TraceService` on `127.0.0.1:0` and keeps every
//! span it receives, flattened into a [`ReceivedSpan`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// How often [`OtlpReceiver::wait_for`] looks again when no export woke it.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// One span as received.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// The `service.name` of the span's resource (empty if it had none).
    pub service: String,
    pub name: String,
    /// Lowercase hex, 32 characters.
    pub trace_id: String,
    /// Lowercase hex, 16 characters.
    pub span_id: String,
    /// Lowercase hex; empty for a root span.
    pub parent_span_id: String,
    /// OTLP `SpanKind`: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    /// Attribute values as strings (ints and doubles in decimal, arrays and maps as JSON-ish
    /// text).
    pub attributes: BTreeMap<String, String>,
    /// The names of the span's events, in order.
    pub events: Vec<String>,
    /// OTLP `StatusCode`: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
}

/// Spans received so far, with a wake-up for waiters. A std mutex: never held across an
/// `.await`.
#[derive(Default)]
struct Received {
    spans: Mutex<Vec<ReceivedSpan>>,
    arrived: Notify,
}

struct Collector(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans = flatten(request.into_inner());
        self.0
            .spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(spans);
        self.0.arrived.notify_waiters();
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running collector; see the module documentation.
pub struct OtlpReceiver {
    addr: SocketAddr,
    received: Arc<Received>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl std::fmt::Debug for OtlpReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpReceiver")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl OtlpReceiver {
    /// Starts a collector on `127.0.0.1:0`.
    pub async fn start() -> anyhow::Result<OtlpReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the OTLP receiver")?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Received::default());
        let service = TraceServiceServer::new(Collector(Arc::clone(&received)))
            .max_decoding_message_size(64 * 1024 * 1024);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        Ok(OtlpReceiver {
            addr,
            received,
            stop,
            task,
        })
    }

    /// The endpoint to export to: `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received
            .spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until `predicate` holds for the spans received so far (checked at each export
    /// and at least every 50 ms), and returns them; fails after `deadline`, listing what did
    /// arrive.
    pub async fn wait_for(
        &self,
        deadline: Duration,
        predicate: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> anyhow::Result<Vec<ReceivedSpan>> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            // Registered before the check, so an export in between is not missed.
            let arrived = self.received.arrived.notified();
            let spans = self.spans();
            if predicate(&spans) {
                return Ok(spans);
            }
            if tokio::time::Instant::now() >= until {
                let mut seen = String::new();
                for span in &spans {
                    let _ = write!(
                        seen,
                        "\n  {} {:?} trace {} span {} parent {:?}",
                        span.service, span.name, span.trace_id, span.span_id, span.parent_span_id
                    );
                }
                bail!(
                    "the expected spans did not arrive within {deadline:?}; received {}:{seen}",
                    spans.len()
                );
            }
            let wait = POLL_INTERVAL.min(until - tokio::time::Instant::now());
            let _ = tokio::time::timeout(wait, arrived).await;
        }
    }

    /// Stops the collector and waits for it.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// One `ReceivedSpan` per span of the request.
fn flatten(request: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut spans = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .map(|kv| stringify(kv.value.as_ref()))
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                spans.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    kind: span.kind,
                    attributes: attributes(&span.attributes),
                    events: span.events.into_iter().map(|e| e.name).collect(),
                    status_code: span.status.map_or(0, |s| s.code),
                });
            }
        }
    }
    spans
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), stringify(kv.value.as_ref())))
        .collect()
}

fn stringify(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        None => String::new(),
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(bytes)) => hex(bytes),
        Some(Value::ArrayValue(array)) => {
            let items: Vec<String> = array.values.iter().map(|v| stringify(Some(v))).collect();
            format!("[{}]", items.join(","))
        }
        Some(Value::KvlistValue(list)) => {
            let items: Vec<String> = list
                .values
                .iter()
                .map(|kv| format!("{}={}", kv.key, stringify(kv.value.as_ref())))
                .collect();
            format!("{{{}}}", items.join(","))
        }
        Some(Value::StringValueStrindex(index)) => format!("#{index}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::span::Event;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    use super::*;

    fn string(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue {
                value: Some(Value::StringValue(value.to_owned())),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn requests_flatten_into_spans_with_their_service() {
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![string("service.name", "payment")],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        name: "payment.v1.Payment/AuthorizeCharge".to_owned(),
                        trace_id: vec![0xab; 16],
                        span_id: vec![0x01; 8],
                        kind: 2,
                        attributes: vec![
                            string("rpc.system", "grpc"),
                            KeyValue {
                                key: "rpc.grpc.status_code".to_owned(),
                                value: Some(AnyValue {
                                    value: Some(Value::IntValue(0)),
                                }),
                                ..Default::default()
                            },
                        ],
                        events: vec![Event {
                            name: "step started".to_owned(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let spans = flatten(request);
        assert_eq!(spans.len(), 1);
        let span = &spans[0];
        assert_eq!(span.service, "payment");
        assert_eq!(span.trace_id, "ab".repeat(16));
        assert_eq!(span.span_id, "0101010101010101");
        assert_eq!(span.parent_span_id, "");
        assert_eq!(span.attributes["rpc.system"], "grpc");
        assert_eq!(span.attributes["rpc.grpc.status_code"], "0");
        assert_eq!(span.events, ["step started"]);
        assert_eq!(span.status_code, 0);
    }
}
