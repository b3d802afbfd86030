//! The payment circuit breaker end to end: it opens after failures, sagas defer instead of
//! hammering payment, a half-open probe closes it again, deferred sagas complete, and sagas
//! whose deferral ran out compensate. Durations are short so this runs in seconds.

use std::time::Duration;

use clap::Parser;
use participants::Kind;
use proto::saga::v1 as pb;
use serde_json::json;
use tests::{Cluster, status};

fn definition(name: &str, payment: &str, store: &str, max_defer: &str) -> String {
    format!(
        "name: {name}
version: 1
participants:
  # The payment service under its own name, so this breaker's settings apply (the
  # `payment` breaker is configured by order-placement, loaded first).
  psp:
    endpoint: {payment}
    circuit_breaker:
      window: {{ count: 4 }}
      minimum_calls: 4
      failure_rate: 50
      wait_in_open: 1s
      half_open_calls: 1
    on_open: defer
    max_defer: {max_defer}
  store: {{ endpoint: {store} }}
steps:
  - name: authorize
    participant: psp
    kind: pivot
    retry: {{ max_attempts: 1 }}
    action:
      method: payment.v1.Payment/AuthorizeCharge
      request: {{ order_id: \"${{saga.id}}\", amount_cents: 100, card: tok_visa }}
  - name: submit
    participant: store
    kind: retriable
    action:
      method: store.v1.Store/SubmitOrder
      request: {{ order_id: \"${{saga.id}}\", store_id: s-2, items: [pizza] }}
"
    )
}

async fn put_definitions(cluster: &mut Cluster) -> anyhow::Result<()> {
    let payment = format!("http://{}", cluster.participant(Kind::Payment).addr);
    let store = format!("http://{}", cluster.participant(Kind::Store).addr);
    for (name, max_defer) in [("pay-later", "20s"), ("pay-soon", "300ms")] {
        let yaml = definition(name, &payment, &store, max_defer);
        cluster
            .client
            .put_definition(pb::PutDefinitionRequest { yaml })
            .await?;
    }
    Ok(())
}

async fn breaker(cluster: &mut Cluster) -> anyhow::Result<pb::CircuitBreaker> {
    let list = cluster
        .client
        .list_circuit_breakers(pb::ListCircuitBreakersRequest {})
        .await?
        .into_inner();
    list.breakers
        .into_iter()
        .find(|b| b.participant == "psp")
        .ok_or_else(|| anyhow::anyhow!("no psp breaker"))
}

/// Waits (watching, under a deadline) until the saga records a deferral.
async fn until_deferred(cluster: &Cluster, saga_id: &str) -> anyhow::Result<()> {
    let mut client = cluster.client.clone();
    let mut stream = client
        .watch_saga(pb::WatchSagaRequest {
            saga_id: saga_id.to_owned(),
        })
        .await?
        .into_inner();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = stream.message().await? {
            if event.kind == "step_deferred" {
                return Ok(());
            }
        }
        anyhow::bail!("saga {saga_id} ended without deferring")
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_defers_sagas_until_payment_recovers() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    put_definitions(&mut cluster).await?;
    let faults = cluster.participant(Kind::Payment).faults.clone();

    // Payment is sick: four failed calls (the minimum) open the breaker.
    faults.fail_next("AuthorizeCharge", tonic::Code::Unavailable, 4);
    for _ in 0..4 {
        let saga = cluster.run("pay-later", json!({})).await?;
        assert_eq!(status(&saga), "COMPENSATED", "{saga:?}");
    }
    let open = breaker(&mut cluster).await?;
    assert_eq!(open.state, "open", "{open:?}");
    assert_eq!(open.failure_rate, Some(100.0));
    assert!(open.next_probe_at.is_some());
    let calls_when_opened = faults.calls("AuthorizeCharge");

    // New sagas wait instead of calling payment.
    let mut later = Vec::new();
    let mut soon = Vec::new();
    for _ in 0..3 {
        later.push(
            cluster
                .start_saga("pay-later", json!({}), "")
                .await?
                .saga_id,
        );
    }
    for _ in 0..2 {
        soon.push(cluster.start_saga("pay-soon", json!({}), "").await?.saga_id);
    }
    for id in later.iter().chain(&soon) {
        until_deferred(&cluster, id).await?;
    }
    let waiting = cluster
        .client
        .get_saga(pb::GetSagaRequest {
            saga_id: later[0].clone(),
        })
        .await?
        .into_inner();
    assert_eq!(status(&waiting), "WAITING");
    assert!(
        waiting.waiting_for.contains("psp deferred: circuit open"),
        "{}",
        waiting.waiting_for
    );
    assert_eq!(waiting.steps[0].status, pb::StepStatus::Deferred as i32);
    assert_eq!(
        faults.calls("AuthorizeCharge"),
        calls_when_opened,
        "no call reaches payment while the breaker is open"
    );

    // Payment has recovered; after the wait one probe goes through, closes the breaker,
    // and the deferred sagas complete. The short-deferral ones ran out and compensated.
    for id in &later {
        let saga = cluster.wait_terminal(id).await?;
        assert_eq!(status(&saga), "COMPLETED", "{saga:?}");
        assert_eq!(
            saga.steps[0].attempts, 1,
            "deferral does not use retry attempts"
        );
    }
    for id in &soon {
        let saga = cluster.wait_terminal(id).await?;
        assert_eq!(status(&saga), "COMPENSATED", "{saga:?}");
        assert_eq!(
            saga.steps[0].last_error.as_ref().map(|e| e.code.as_str()),
            Some("CIRCUIT_OPEN")
        );
    }
    assert_eq!(
        faults.calls("AuthorizeCharge"),
        calls_when_opened + later.len() as u64,
        "after the breaker opened, payment saw only the probe and the deferred sagas"
    );
    assert_eq!(breaker(&mut cluster).await?.state, "closed");
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_can_force_the_breaker_open_and_reset_it() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    put_definitions(&mut cluster).await?;
    let endpoint = format!("http://{}", cluster.orchestrator().addr());
    let sagactl = |args: &[&str]| {
        let mut argv = vec!["sagactl", "--endpoint", endpoint.as_str()];
        argv.extend_from_slice(args);
        orchestrator::cli::sagactl::Cli::try_parse_from(argv)
    };
    let out = orchestrator::cli::sagactl::run(sagactl(&["breaker", "force-open", "psp"])?).await?;
    assert_eq!(out.text, "circuit breaker of psp is now forced_open");

    let started = cluster.start_saga("pay-later", json!({}), "").await?;
    until_deferred(&cluster, &started.saga_id).await?;
    assert_eq!(
        cluster
            .participant(Kind::Payment)
            .faults
            .calls("AuthorizeCharge"),
        0
    );

    let table = orchestrator::cli::sagactl::run(sagactl(&["breakers"])?).await?;
    assert!(
        table.text.contains("psp") && table.text.contains("forced_open"),
        "{}",
        table.text
    );
    orchestrator::cli::sagactl::run(sagactl(&["breaker", "reset", "psp"])?).await?;
    let saga = cluster.wait_terminal(&started.saga_id).await?;
    assert_eq!(status(&saga), "COMPLETED", "{saga:?}");

    let missing = orchestrator::cli::sagactl::run(sagactl(&["breaker", "disable", "rider"])?)
        .await
        .unwrap_err();
    assert!(
        missing
            .to_string()
            .contains("NOT_FOUND: participant `rider` has no circuit breaker"),
        "{missing}"
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_reroutes_to_the_fallback_provider() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let payment = format!("http://{}", cluster.participant(Kind::Payment).addr);
    let rider = format!("http://{}", cluster.participant(Kind::Rider).addr);
    // `backup` stands for a second payment provider (the same service here, under its own
    // name and idempotency scope).
    let yaml = format!(
        "name: pay-backup
version: 1
input: {{ zone: string }}
participants:
  main_psp:
    endpoint: {payment}
    circuit_breaker: {{ minimum_calls: 5 }}
  backup: {{ endpoint: {payment} }}
  rider: {{ endpoint: {rider} }}
steps:
  - name: authorize
    participant: main_psp
    on_open: call
    fallback:
      participant: backup
      action:
        method: payment.v1.Payment/AuthorizeCharge
        request: {{ order_id: \"${{saga.id}}\", amount_cents: 100, card: tok_visa }}
      compensation:
        method: payment.v1.Payment/VoidCharge
        request: {{ order_id: \"${{saga.id}}\" }}
    action:
      method: payment.v1.Payment/AuthorizeCharge
      request: {{ order_id: \"${{saga.id}}\", amount_cents: 100, card: tok_visa }}
    compensation:
      method: payment.v1.Payment/VoidCharge
      request: {{ order_id: \"${{saga.id}}\" }}
  - name: deliver
    participant: rider
    kind: pivot
    action:
      method: rider.v1.Rider/RequestDelivery
      request: {{ order_id: \"${{saga.id}}\", zone: \"${{input.zone}}\" }}
"
    );
    cluster
        .client
        .put_definition(pb::PutDefinitionRequest { yaml })
        .await?;
    cluster
        .client
        .set_circuit_breaker(pb::SetCircuitBreakerRequest {
            participant: "main_psp".into(),
            mode: pb::BreakerMode::ForcedOpen as i32,
        })
        .await?;

    let done = cluster
        .run("pay-backup", json!({"zone": "gangnam"}))
        .await?;
    assert_eq!(status(&done), "COMPLETED", "{done:?}");
    assert_eq!(done.steps[0].participant, "backup");
    let undone = cluster
        .run("pay-backup", json!({"zone": "nowhere"}))
        .await?;
    assert_eq!(status(&undone), "COMPENSATED", "{undone:?}");

    let ledger = cluster.ledger(Kind::Payment).await?;
    let keys = |id: &str| -> Vec<String> {
        ledger
            .iter()
            .filter(|e| e.idempotency_key.starts_with(id))
            .map(|e| e.idempotency_key[id.len()..].to_owned())
            .collect()
    };
    assert_eq!(keys(&done.saga_id), ["/authorize/fallback/action"]);
    assert_eq!(
        keys(&undone.saga_id),
        [
            "/authorize/fallback/action",
            "/authorize/fallback/compensation"
        ]
    );
    assert!(
        ledger.iter().all(|e| !e.noop),
        "the fallback's void undid a real authorization: {ledger:?}"
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_reject_when_open_refuses_new_sagas_with_a_retry_hint() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let payment = format!("http://{}", cluster.participant(Kind::Payment).addr);
    let store = format!("http://{}", cluster.participant(Kind::Store).addr);
    let yaml = definition("pay-or-refuse", &payment, &store, "20s")
        .replace("version: 1\n", "version: 1\nadmission: reject_when_open\n");
    cluster
        .client
        .put_definition(pb::PutDefinitionRequest { yaml })
        .await?;
    cluster
        .client
        .set_circuit_breaker(pb::SetCircuitBreakerRequest {
            participant: "psp".into(),
            mode: pb::BreakerMode::ForcedOpen as i32,
        })
        .await?;
    let refused = cluster
        .start_saga("pay-or-refuse", json!({}), "k-1")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains("while the circuit breaker of `psp` is open; retry after"),
        "{}",
        refused.message()
    );
    assert!(refused.metadata().get("retry-after-ms").is_some());
    let listed = cluster
        .client
        .list_sagas(pb::ListSagasRequest {
            definition: "pay-or-refuse".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(listed.sagas.is_empty(), "a refused start stores nothing");

    cluster
        .client
        .set_circuit_breaker(pb::SetCircuitBreakerRequest {
            participant: "psp".into(),
            mode: pb::BreakerMode::Normal as i32,
        })
        .await?;
    let started = cluster
        .start_saga("pay-or-refuse", json!({}), "k-1")
        .await?;
    let saga = cluster.wait_terminal(&started.saga_id).await?;
    assert_eq!(status(&saga), "COMPLETED");
    cluster.shutdown().await
}
