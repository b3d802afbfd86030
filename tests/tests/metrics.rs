//! The admin endpoints of an orchestrator: `/metrics` after a few sagas (counters and
//! histograms by name and label, the breaker's gauge and transitions), `/healthz`,
//! `/readyz`; and no trace id or export when OTLP is off.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use proto::saga::v1 as pb;
use serde_json::json;
use tests::{Cluster, DEADLINE, order_input, status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP/1.1 GET: (status code, body).
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let found: BTreeMap<&str, &str> = label_text
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            labels
                .iter()
                .all(|(k, v)| found.get(k) == Some(v))
                .then(|| value.parse().ok())
                .flatten()
        })
}

async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let (code, body) = http_get(addr, "/metrics").await?;
    if code != 200 {
        bail!("/metrics answered {code}: {body}");
    }
    Ok(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_sagas_steps_compensations_and_breakers() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let admin = cluster
        .orchestrator()
        .admin_addr()
        .context("admin listener")?;
    assert_eq!(http_get(admin, "/healthz").await?.0, 200);
    let (code, body) = http_get(admin, "/readyz").await?;
    assert_eq!(code, 200, "{body}");

    // One transient failure at the store: a retry.
    cluster
        .participant(participants::Kind::Store)
        .faults
        .fail_next("SubmitOrder", tonic::Code::Unavailable, 1);
    for (order, changes) in [
        ("m-1", json!({})),
        ("m-2", json!({})),
        ("m-3", json!({"zone": "nowhere"})),
    ] {
        cluster
            .run("order-placement", order_input(order, changes))
            .await?;
    }
    let text = scrape(admin).await?;
    let definition = ("definition", "order-placement");
    assert_eq!(
        sample(&text, "saga_sagas_started_total", &[definition]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "saga_sagas_finished_total",
            &[definition, ("status", "COMPLETED")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            "saga_sagas_finished_total",
            &[definition, ("status", "COMPENSATED")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "saga_saga_duration_seconds_count",
            &[definition, ("status", "COMPLETED")]
        ),
        Some(2.0)
    );
    let attempts = |step: &str, outcome: &str| {
        sample(
            &text,
            "saga_step_attempt_duration_seconds_count",
            &[("step", step), ("phase", "action"), ("outcome", outcome)],
        )
    };
    assert_eq!(attempts("authorize_payment", "ok"), Some(3.0));
    assert_eq!(attempts("request_rider", "FAILED_PRECONDITION"), Some(1.0));
    assert_eq!(
        sample(
            &text,
            "saga_step_attempt_duration_seconds_count",
            &[
                ("participant", "payment"),
                ("phase", "compensation"),
                ("outcome", "ok")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "saga_compensations_total",
            &[definition, ("step", "submit_order")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "saga_circuit_breaker_state",
            &[("participant", "payment")]
        ),
        Some(0.0)
    );
    assert!(sample(&text, "saga_store_flush_duration_seconds_count", &[]).is_some_and(|n| n > 0.0));
    assert!(sample(&text, "saga_store_flush_batch_writes_sum", &[]).is_some_and(|n| n >= 3.0));
    assert_eq!(
        sample(&text, "saga_sagas", &[("status", "RUNNING")]),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "saga_step_retries_total",
            &[definition, ("step", "submit_order"), ("phase", "action")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "saga_step_attempt_duration_seconds_count",
            &[("step", "submit_order"), ("outcome", "UNAVAILABLE")]
        ),
        Some(1.0)
    );

    // Forcing the breaker open shows in the gauge and as a transition.
    cluster
        .client
        .set_circuit_breaker(pb::SetCircuitBreakerRequest {
            participant: "payment".into(),
            mode: pb::BreakerMode::ForcedOpen as i32,
        })
        .await?;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let text = scrape(admin).await?;
        let transitions = sample(
            &text,
            "saga_circuit_breaker_transitions_total",
            &[
                ("participant", "payment"),
                ("from", "closed"),
                ("to", "forced_open"),
            ],
        );
        if transitions == Some(1.0) {
            assert_eq!(
                sample(
                    &text,
                    "saga_circuit_breaker_state",
                    &[("participant", "payment")]
                ),
                Some(3.0)
            );
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no transition counted: {text}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dashboard_text = scrape(admin).await?;
    // Every orchestrator metric the Grafana dashboard queries exists.
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        tests::sagas_dir().join("../deploy/grafana/dashboards/saga-orchestrator.json"),
    )?)?;
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().context("targets")? {
            let expr = target["expr"].as_str().context("expr")?;
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("saga_") {
                    queried.push(word.to_owned());
                }
            }
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    for metric in &queried {
        assert!(
            dashboard_text
                .lines()
                .any(|l| l.starts_with(metric.as_str())),
            "the dashboard queries {metric}, which /metrics does not have"
        );
    }

    // A saga now waits for the breaker: it shows among the WAITING ones.
    let waiting = cluster
        .start_saga("order-placement", order_input("m-4", json!({})), "")
        .await?
        .saga_id;
    cluster
        .wait_until(&waiting, "WAITING", |s| status(s) == "WAITING")
        .await?;
    assert_eq!(
        sample(
            &scrape(admin).await?,
            "saga_sagas",
            &[("status", "WAITING")]
        ),
        Some(1.0)
    );

    // Not ready while a storage fault stops the world.
    *cluster
        .orchestrator()
        .store()
        .fault_injection()
        .fail_next_flush
        .lock()
        .expect("lock") = Some("disk on fire".into());
    let _ = cluster
        .start_saga("order-placement", order_input("m-5", json!({})), "")
        .await;
    let (code, body) = http_get(admin, "/readyz").await?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("disk on fire"), "{body}");
    assert_eq!(http_get(admin, "/healthz").await?.0, 200, "still alive");
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_otlp_nothing_is_exported_and_sagas_have_no_trace() -> anyhow::Result<()> {
    let receiver = tests::otlp::OtlpReceiver::start().await?;
    // The variables that would turn export on are not set for this test process.
    for variable in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ] {
        assert!(std::env::var_os(variable).is_none(), "{variable} is set");
    }
    let (subscriber, telemetry) =
        telemetry::test_subscriber(telemetry::TelemetryConfig::new("orchestrator"))?;
    assert!(!telemetry.exporting());
    assert!(telemetry.service_tracer("payment").is_none());
    let _default = tracing::subscriber::set_default(subscriber);
    let mut cluster = Cluster::start_with(Some(&telemetry)).await?;
    let saga = cluster
        .run("order-placement", order_input("no-trace", json!({})))
        .await?;
    assert_eq!(status(&saga), "COMPLETED");
    assert!(saga.trace_id.is_empty(), "{}", saga.trace_id);
    cluster.shutdown().await?;
    telemetry.shutdown();
    assert!(receiver.spans().is_empty());
    receiver.shutdown().await;
    Ok(())
}
