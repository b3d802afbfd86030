//! One saga is one trace: a saga that fails at the rider and compensates, exported over
//! OTLP to an in-process receiver, shows one trace id across the orchestrator and every
//! participant, step spans under the saga span, participant server spans under the
//! orchestrator's client spans, and compensation spans carrying `saga.compensates`.
//!
//! This file installs the process-wide subscriber, so it holds this one test.

use anyhow::Context;
use serde_json::json;
use tests::otlp::{OtlpReceiver, ReceivedSpan};
use tests::{Cluster, DEADLINE, order_input, status};

const CLIENT: i32 = 3;
const SERVER: i32 = 2;

fn find<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensated_saga_is_one_trace_across_all_services() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let mut config = telemetry::TelemetryConfig::new("orchestrator");
    config.otlp_endpoint = Some(receiver.endpoint());
    let telemetry = telemetry::init(config)?;
    assert!(telemetry.exporting());

    let mut cluster = Cluster::start_with(Some(&telemetry)).await?;
    let saga = cluster
        .run(
            "order-placement",
            order_input("o-traced", json!({"zone": "nowhere"})),
        )
        .await?;
    assert_eq!(status(&saga), "COMPENSATED");
    assert_eq!(saga.trace_id.len(), 32, "GetSaga names the trace");

    // A saga that survives a restart stays one trace.
    let waiting = cluster
        .start_saga("food-delivery", order_input("o-traced-2", json!({})), "")
        .await?
        .saga_id;
    cluster
        .wait_until(&waiting, "waiting for the store", |s| {
            !s.awaiting_signals.is_empty()
        })
        .await?;
    cluster.restart_orchestrator().await?;
    cluster
        .client
        .signal_saga(proto::saga::v1::SignalSagaRequest {
            saga_id: waiting.clone(),
            signal: "store.rejected".into(),
            payload: None,
        })
        .await?;
    let resumed = cluster.wait_terminal(&waiting).await?;
    assert_eq!(status(&resumed), "COMPENSATED");
    cluster.shutdown().await?;
    telemetry.shutdown_async().await;
    let spans_of_resumed = receiver
        .wait_for(DEADLINE, |spans| {
            spans
                .iter()
                .any(|s| s.name == "saga food-delivery (resumed)")
                && spans.iter().any(|s| s.name == "saga food-delivery")
        })
        .await?;
    let first = spans_of_resumed
        .iter()
        .find(|s| s.name == "saga food-delivery")
        .context("first run")?;
    let second = spans_of_resumed
        .iter()
        .find(|s| s.name == "saga food-delivery (resumed)")
        .context("resumed run")?;
    assert_eq!(first.trace_id, resumed.trace_id);
    assert_eq!(
        second.trace_id, resumed.trace_id,
        "the resumed run joins the trace"
    );
    assert_eq!(second.parent_span_id, first.span_id);
    assert!(
        spans_of_resumed
            .iter()
            .filter(|s| s.attributes.get("saga.id") == Some(&waiting))
            .all(|s| s.trace_id == resumed.trace_id)
    );

    let trace = saga.trace_id.clone();
    let spans = receiver
        .wait_for(DEADLINE, |spans| {
            ["payment", "store", "rider"]
                .iter()
                .all(|service| spans.iter().any(|s| s.service == *service))
                && spans.iter().any(|s| s.name == "saga order-placement")
        })
        .await?;
    let spans: Vec<ReceivedSpan> = spans.into_iter().filter(|s| s.trace_id == trace).collect();

    // One trace: the orchestrator's spans and every participant's.
    for service in ["orchestrator", "payment", "store", "rider"] {
        assert!(
            spans.iter().any(|s| s.service == service),
            "no {service} span in trace {trace}: {spans:#?}"
        );
    }
    let root = find(&spans, "orchestrator", "saga order-placement");
    let root = root.first().context("the saga span")?;
    assert!(root.parent_span_id.is_empty(), "the saga span is the root");
    assert_eq!(root.attributes.get("saga.id"), Some(&saga.saga_id));
    assert_eq!(
        root.attributes.get("saga.status").map(String::as_str),
        Some("COMPENSATED")
    );

    // Step attempts and compensations are children of the saga span.
    let steps: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service == "orchestrator" && s.attributes.contains_key("saga.step"))
        .filter(|s| s.attributes.contains_key("saga.phase"))
        .collect();
    let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "authorize_payment action",
        "submit_order action",
        "request_rider action",
        "submit_order compensation",
        "authorize_payment compensation",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    for step in &steps {
        assert_eq!(
            step.parent_span_id, root.span_id,
            "{} is under the saga span",
            step.name
        );
        assert_eq!(
            step.attributes.get("saga.attempt").map(String::as_str),
            Some("1")
        );
    }
    for compensation in steps.iter().filter(|s| s.name.ends_with(" compensation")) {
        let step = compensation.attributes.get("saga.step");
        assert_eq!(compensation.attributes.get("saga.compensates"), step);
        assert_eq!(
            compensation
                .attributes
                .get("saga.phase")
                .map(String::as_str),
            Some("compensation")
        );
    }

    // Each call: a client span under its step span, and the participant's server span
    // under the client span, with the RPC conventions' attributes.
    for (service, method, step) in [
        (
            "payment",
            "payment.v1.Payment/AuthorizeCharge",
            "authorize_payment action",
        ),
        ("store", "store.v1.Store/SubmitOrder", "submit_order action"),
        (
            "rider",
            "rider.v1.Rider/RequestDelivery",
            "request_rider action",
        ),
        (
            "store",
            "store.v1.Store/CancelOrder",
            "submit_order compensation",
        ),
        (
            "payment",
            "payment.v1.Payment/VoidCharge",
            "authorize_payment compensation",
        ),
    ] {
        let step_span = steps
            .iter()
            .find(|s| s.name == step)
            .with_context(|| format!("step span {step}"))?;
        let client = find(&spans, "orchestrator", method);
        let client = client
            .iter()
            .find(|c| c.parent_span_id == step_span.span_id)
            .with_context(|| format!("client span {method} under {step}: {spans:#?}"))?;
        assert_eq!(client.kind, CLIENT);
        assert_eq!(
            client.attributes.get("rpc.system").map(String::as_str),
            Some("grpc")
        );
        let (rpc_service, rpc_method) = method.split_once('/').context("method")?;
        assert_eq!(
            client.attributes.get("rpc.service").map(String::as_str),
            Some(rpc_service)
        );
        assert_eq!(
            client.attributes.get("rpc.method").map(String::as_str),
            Some(rpc_method)
        );
        let server = find(&spans, service, method);
        let server = server
            .iter()
            .find(|s| s.parent_span_id == client.span_id)
            .with_context(|| format!("{service} server span under {method}: {spans:#?}"))?;
        assert_eq!(server.kind, SERVER);
        let code = if method.ends_with("RequestDelivery") {
            "9"
        } else {
            "0"
        };
        assert_eq!(
            client
                .attributes
                .get("rpc.grpc.status_code")
                .map(String::as_str),
            Some(code),
            "{method}"
        );
        assert_eq!(
            server
                .attributes
                .get("rpc.grpc.status_code")
                .map(String::as_str),
            Some(code),
            "{method}"
        );
    }
    receiver.shutdown().await;
    Ok(())
}
