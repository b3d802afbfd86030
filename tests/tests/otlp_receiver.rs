//! The in-process OTLP receiver and the telemetry crate's exporter talk: spans exported over
//! OTLP/gRPC arrive with their service, ids, attributes and events.

use std::time::Duration;

use anyhow::Context;
use opentelemetry::trace::{TraceContextExt, Tracer as _};
use participants::{Kind, ParticipantOptions};
use proto::participant::v1::ListLedgerRequest;
use proto::payment::v1::payment_client::PaymentClient;
use telemetry::{LogFormat, TelemetryConfig};
use tests::otlp::OtlpReceiver;

const DEADLINE: Duration = Duration::from_secs(30);

fn config(receiver: &OtlpReceiver) -> TelemetryConfig {
    TelemetryConfig {
        service_name: "orchestrator".to_owned(),
        log_format: LogFormat::Text,
        otlp_endpoint: Some(receiver.endpoint()),
    }
}

#[tokio::test]
async fn spans_exported_by_the_telemetry_crate_arrive() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let (subscriber, telemetry) = telemetry::test_subscriber(config(&receiver))?;
    assert!(telemetry.exporting());

    let trace_id = tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("probe", saga.id = "s-1", saga.attempt = 2);
        let _entered = span.enter();
        tracing::info!("inside the probe");
        telemetry::current_trace_id()
    })
    .context("no trace id inside an exported span")?;
    let payment = telemetry
        .service_tracer("payment")
        .context("no service tracer")?;
    payment.in_span("payment.v1.Payment/AuthorizeCharge", |cx| {
        assert!(cx.span().span_context().is_valid());
    });
    // Exports what the batch processors hold, without blocking this (single) test thread,
    // which also serves the receiver.
    telemetry.shutdown_async().await;

    let spans = receiver
        .wait_for(DEADLINE, |spans| spans.len() >= 2)
        .await?;
    let probe = spans
        .iter()
        .find(|s| s.name == "probe")
        .context("no probe span")?;
    assert_eq!(probe.service, "orchestrator");
    assert_eq!(probe.trace_id, trace_id);
    assert_eq!(probe.parent_span_id, "");
    assert_eq!(probe.span_id.len(), 16);
    assert_eq!(probe.kind, 1, "internal");
    assert_eq!(probe.attributes["saga.id"], "s-1");
    assert_eq!(probe.attributes["saga.attempt"], "2");
    assert_eq!(probe.events, ["inside the probe"]);
    let authorize = spans
        .iter()
        .find(|s| s.name == "payment.v1.Payment/AuthorizeCharge")
        .context("no span of the payment service tracer")?;
    assert_eq!(authorize.service, "payment");
    receiver.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_participant_reports_its_server_spans_as_its_own_service() -> anyhow::Result<()> {
    const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
    const PARENT_ID: &str = "b7ad6b7169203331";
    let receiver = OtlpReceiver::start().await?;
    let (_subscriber, telemetry) = telemetry::test_subscriber(config(&receiver))?;
    let dir = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let options = ParticipantOptions {
        tracer: telemetry.service_tracer("payment"),
        ..Default::default()
    };
    let handle = participants::spawn_with(Kind::Payment, listener, dir.path(), options).await?;
    let mut client = PaymentClient::connect(format!("http://{}", handle.addr)).await?;
    let mut request = tonic::Request::new(ListLedgerRequest {});
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_ID}-01").parse()?,
    );
    client.list_ledger(request).await?;
    telemetry.flush().await;

    let spans = receiver
        .wait_for(DEADLINE, |spans| {
            spans
                .iter()
                .any(|s| s.name == "payment.v1.Payment/ListLedger")
        })
        .await?;
    let span = spans
        .iter()
        .find(|s| s.name == "payment.v1.Payment/ListLedger")
        .context("no server span")?;
    assert_eq!(span.service, "payment");
    assert_eq!(span.trace_id, TRACE_ID);
    assert_eq!(span.parent_span_id, PARENT_ID);
    assert_eq!(span.kind, 2, "server");
    assert_eq!(span.attributes["rpc.system"], "grpc");
    assert_eq!(span.attributes["rpc.service"], "payment.v1.Payment");
    assert_eq!(span.attributes["rpc.method"], "ListLedger");
    assert_eq!(span.attributes["rpc.grpc.status_code"], "0");

    handle.shutdown().await?;
    telemetry.shutdown_async().await;
    receiver.shutdown().await;
    Ok(())
}
