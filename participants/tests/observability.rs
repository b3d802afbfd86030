//! What participants report: server spans parented by the caller's `traceparent`, and the
//! admin endpoints with their metrics.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::keyed;
use opentelemetry::Value;
use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use participants::{Kind, NotifierConfig, ParticipantHandle, ParticipantOptions};
use proto::notifier::v1::ListNotificationsRequest;
use proto::notifier::v1::notifier_client::NotifierClient;
use proto::participant::v1::ListLedgerRequest;
use proto::payment::v1::AuthorizeChargeRequest;
use proto::payment::v1::payment_client::PaymentClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;
use tonic::transport::Channel;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

async fn loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

async fn start(kind: Kind, dir: &Path, options: ParticipantOptions) -> ParticipantHandle {
    participants::spawn_with(kind, loopback().await, dir, options)
        .await
        .unwrap()
}

async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// `message` carrying the W3C trace context of a remote parent span.
fn traced<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_ID}-01").parse().unwrap(),
    );
    request
}

fn authorize() -> AuthorizeChargeRequest {
    AuthorizeChargeRequest {
        order_id: "o-1".into(),
        customer_id: "c-1".into(),
        amount_cents: 2500,
        card: "tok_visa".into(),
    }
}

fn attribute(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

/// A plain HTTP/1.1 GET: the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `name{labels}` in an OpenMetrics text (labels in any order).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        if metric != name {
            return None;
        }
        let rest = rest.strip_suffix('}')?;
        labels
            .iter()
            .all(|(k, v)| rest.split(',').any(|pair| pair == format!("{k}=\"{v}\"")))
            .then(|| value.parse().ok())?
    })
}

#[tokio::test]
async fn a_call_with_a_traceparent_gets_a_server_span_in_that_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let dir = tempfile::tempdir().unwrap();
    let options = ParticipantOptions {
        tracer: Some(provider.tracer("test")),
        ..Default::default()
    };
    let handle = start(Kind::Payment, dir.path(), options).await;
    let mut client = PaymentClient::new(connect(handle.addr).await);

    let mut ok = keyed(authorize(), "o-1/authorize/action");
    ok.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_ID}-01").parse().unwrap(),
    );
    client.authorize_charge(ok).await.unwrap();
    // No idempotency key: refused with INVALID_ARGUMENT (a trailers-only response).
    let refused = client
        .authorize_charge(traced(authorize()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    handle.shutdown().await.unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let spans: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "payment.v1.Payment/AuthorizeCharge")
        .collect();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    for span in &spans {
        assert_eq!(span.span_kind, SpanKind::Server);
        assert_eq!(span.span_context.trace_id().to_string(), TRACE_ID);
        assert_eq!(span.parent_span_id.to_string(), PARENT_ID);
        assert!(span.parent_span_is_remote);
        assert_eq!(attribute(span, "rpc.system"), Some(Value::from("grpc")));
        assert_eq!(
            attribute(span, "rpc.service"),
            Some(Value::from("payment.v1.Payment"))
        );
        assert_eq!(
            attribute(span, "rpc.method"),
            Some(Value::from("AuthorizeCharge"))
        );
    }
    let codes: Vec<_> = spans
        .iter()
        .map(|s| attribute(s, "rpc.grpc.status_code"))
        .collect();
    assert_eq!(
        codes,
        [
            Some(Value::I64(Code::Ok as i64)),
            Some(Value::I64(Code::InvalidArgument as i64))
        ]
    );
}

#[tokio::test]
async fn without_a_tracer_or_admin_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Store, dir.path(), ParticipantOptions::default()).await;
    assert_eq!(handle.admin_addr, None);
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_admin_endpoints_answer_and_count_calls() {
    let dir = tempfile::tempdir().unwrap();
    let admin = loopback().await;
    let admin_addr = admin.local_addr().unwrap();
    let options = ParticipantOptions {
        admin: Some(admin),
        ..Default::default()
    };
    let handle = start(Kind::Payment, dir.path(), options).await;
    assert_eq!(handle.admin_addr, Some(admin_addr));

    assert_eq!(get(admin_addr, "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(get(admin_addr, "/readyz").await.0, 200);
    let (status, before) = get(admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &before,
            "participant_ledger_entries",
            &[("participant", "payment")]
        ),
        Some(0.0)
    );

    let mut client = PaymentClient::new(connect(handle.addr).await);
    client
        .authorize_charge(keyed(authorize(), "o-1/authorize/action"))
        .await
        .unwrap();
    client.list_ledger(ListLedgerRequest {}).await.unwrap();
    let refused = client.authorize_charge(authorize()).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);

    let (_, text) = get(admin_addr, "/metrics").await;
    let requests = |method: &str, code: &str| {
        sample(
            &text,
            "participant_requests_total",
            &[
                ("participant", "payment"),
                ("method", method),
                ("code", code),
            ],
        )
    };
    assert_eq!(requests("AuthorizeCharge", "OK"), Some(1.0), "{text}");
    assert_eq!(requests("AuthorizeCharge", "INVALID_ARGUMENT"), Some(1.0));
    assert_eq!(requests("ListLedger", "OK"), Some(1.0));
    assert_eq!(
        sample(
            &text,
            "participant_request_duration_seconds_count",
            &[("participant", "payment"), ("method", "AuthorizeCharge")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            "participant_ledger_entries",
            &[("participant", "payment")]
        ),
        Some(1.0)
    );
    // Health and reflection calls are not the participant's calls.
    assert!(!text.contains("method=\"Check\""));

    handle.shutdown().await.unwrap();
    // The admin server stops with the participant.
    assert!(TcpStream::connect(admin_addr).await.is_err());
}

#[tokio::test]
async fn the_notifier_serves_the_admin_endpoints_too() {
    let dir = tempfile::tempdir().unwrap();
    let admin = loopback().await;
    let admin_addr = admin.local_addr().unwrap();
    let config = NotifierConfig {
        // Nobody listens there: the feed keeps retrying, the server is up regardless.
        orchestrator: "http://127.0.0.1:9".to_owned(),
        data: dir.path().to_path_buf(),
        definition: None,
    };
    let options = ParticipantOptions {
        admin: Some(admin),
        ..Default::default()
    };
    let handle = participants::spawn_notifier_with(config, loopback().await, options)
        .await
        .unwrap();
    assert_eq!(handle.admin_addr(), Some(admin_addr));
    assert_eq!(get(admin_addr, "/healthz").await.0, 200);
    assert_eq!(get(admin_addr, "/readyz").await.0, 200);

    let mut client = NotifierClient::new(connect(handle.addr()).await);
    client
        .list_notifications(ListNotificationsRequest::default())
        .await
        .unwrap();
    let (_, text) = get(admin_addr, "/metrics").await;
    assert_eq!(
        sample(
            &text,
            "participant_requests_total",
            &[
                ("participant", "notifier"),
                ("method", "ListNotifications"),
                ("code", "OK")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(!text.contains("participant_ledger_entries"));
    handle.shutdown().await.unwrap();
}

/// An HTTP/1.1 request with a body: the status code and the body of the answer.
async fn send(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn faults_are_injected_through_the_admin_endpoint_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let admin = loopback().await;
    let admin_addr = admin.local_addr().unwrap();
    let options = ParticipantOptions {
        admin: Some(admin),
        fault_injection: true,
        ..Default::default()
    };
    let handle = start(Kind::Payment, dir.path(), options).await;
    let mut client = PaymentClient::new(connect(handle.addr).await);

    let (status, body) = send(
        admin_addr,
        "PUT",
        "/faults",
        r#"{"unavailable": 1.0, "seed": 7}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"unavailable\":1.0"), "{body}");
    let refused = client
        .authorize_charge(keyed(authorize(), "k-1"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);

    let (status, body) = send(admin_addr, "PUT", "/faults", r#"{"unavailable": 2}"#).await;
    assert_eq!(status, 400);
    assert!(body.contains("not a probability"), "{body}");
    let (status, body) = send(admin_addr, "PUT", "/faults", r#"{"explode": 1}"#).await;
    assert_eq!(status, 400, "{body}");

    // Every reply lost: the effect is applied, the caller is told UNAVAILABLE.
    send(admin_addr, "PUT", "/faults", r#"{"lose_reply": 1.0}"#).await;
    let lost = client
        .authorize_charge(keyed(authorize(), "k-2"))
        .await
        .unwrap_err();
    assert_eq!(lost.code(), Code::Unavailable);
    assert_eq!(send(admin_addr, "DELETE", "/faults", "").await.0, 200);
    // Healed: the repeat of the key gets the result stored the first time.
    client
        .authorize_charge(keyed(authorize(), "k-2"))
        .await
        .unwrap();
    handle.shutdown().await.unwrap();

    // Without the flag there is no such endpoint.
    let dir = tempfile::tempdir().unwrap();
    let admin = loopback().await;
    let admin_addr = admin.local_addr().unwrap();
    let options = ParticipantOptions {
        admin: Some(admin),
        ..Default::default()
    };
    let handle = start(Kind::Store, dir.path(), options).await;
    assert_eq!(
        send(admin_addr, "PUT", "/faults", r#"{"unavailable": 1.0}"#)
            .await
            .0,
        404
    );
    handle.shutdown().await.unwrap();
}
