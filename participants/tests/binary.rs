//! The `participant` binary with telemetry on: JSON log lines, the admin endpoints, and its
//! server spans exported over OTLP/gRPC, with the `OTEL_*` resource variables honoured and
//! nothing lost at exit (SIGTERM).

#![cfg(unix)]
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use proto::participant::v1::ListLedgerRequest;
use proto::payment::v1::payment_client::PaymentClient;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tonic::transport::server::TcpIncoming;

const TRACE_ID: &str = "5b8efff798038103d269b633813fc60c";
const PARENT_ID: &str = "eee19b7ec3c1b174";

/// A minimal OTLP trace collector: keeps every request.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn string(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            _ => None,
        }
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn get(addr: SocketAddr, path: &str) -> u16 {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response[9..12].parse().unwrap()
}

#[tokio::test]
async fn the_binary_logs_json_serves_admin_and_exports_its_spans_before_exit() {
    let collector = Collector::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            }),
    );

    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_participant"));
    command
        .args(["payment", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .args(["--log-format", "json", "--admin-listen", "127.0.0.1:0"])
        .arg("--otlp-endpoint")
        .arg(format!("http://{collector_addr}"))
        .env("RUST_LOG", "info")
        .env("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_TRACES_SAMPLER")
        .env_remove("SAGA_LOG_FORMAT")
        .env_remove("SAGA_ADMIN_LISTEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();

    // Every log line (on stderr) is a JSON object; two of them give the addresses.
    let (addr, admin) = tokio::time::timeout(Duration::from_secs(30), async {
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the participant exited");
            let line: serde_json::Value = serde_json::from_str(&line).unwrap();
            let fields = &line["fields"];
            let at = || {
                fields["addr"]
                    .as_str()
                    .unwrap()
                    .parse::<SocketAddr>()
                    .unwrap()
            };
            match fields["message"].as_str() {
                Some("serving") => addr = Some(at()),
                Some("admin endpoints: /metrics /healthz /readyz") => admin = Some(at()),
                _ => {}
            }
        }
        (addr.unwrap(), admin.unwrap())
    })
    .await
    .unwrap();

    assert_eq!(get(admin, "/readyz").await, 200);
    let mut client = PaymentClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut request = tonic::Request::new(ListLedgerRequest {});
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_ID}-01").parse().unwrap(),
    );
    client.list_ledger(request).await.unwrap();
    drop(client);

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");

    // Exported before the process exited: no waiting here.
    let requests = collector.0.lock().unwrap().clone();
    let span = requests
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| {
            let resource = rs.resource.clone().unwrap_or_default().attributes;
            rs.scope_spans
                .iter()
                .flat_map(|ss| &ss.spans)
                .map(move |span| (resource.clone(), span.clone()))
        })
        .find(|(_, span)| span.name == "payment.v1.Payment/ListLedger");
    let (resource, span) = span.expect("the server span was exported before exit");
    assert_eq!(
        string(&resource, "service.name").as_deref(),
        Some("payment")
    );
    assert_eq!(
        string(&resource, "deployment.environment").as_deref(),
        Some("test")
    );
    assert_eq!(hex(&span.trace_id), TRACE_ID);
    assert_eq!(hex(&span.parent_span_id), PARENT_ID);
    assert_eq!(
        string(&span.attributes, "rpc.grpc.status_code").as_deref(),
        Some("0")
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
