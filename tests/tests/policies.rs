//! Call policies end to end: per-attempt timeouts, the compensation retry cap (FAILED, with
//! the reason), and descriptors from a descriptor set file instead of reflection.

use std::time::Duration;

use participants::Kind;
use proto::saga::v1::PutDefinitionRequest;
use serde_json::json;
use tests::{Cluster, effects_of, status};

fn endpoint(cluster: &Cluster, kind: Kind) -> String {
    format!("http://{}", cluster.participant(kind).addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_that_outlive_their_timeout_are_retried_then_fail() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let yaml = format!(
        "name: slow-payment
version: 1
participants:
  payment: {{ endpoint: {} }}
steps:
  - name: authorize
    participant: payment
    kind: pivot
    timeout: 100ms
    retry: {{ max_attempts: 2, initial_backoff: 10ms, max_backoff: 20ms }}
    action:
      method: payment.v1.Payment/AuthorizeCharge
      request: {{ order_id: \"${{saga.id}}\", amount_cents: 100, card: tok_visa }}
",
        endpoint(&cluster, Kind::Payment)
    );
    cluster
        .client
        .put_definition(PutDefinitionRequest { yaml })
        .await?;
    cluster
        .participant(Kind::Payment)
        .faults
        .set_delay("AuthorizeCharge", Duration::from_millis(400));
    let saga = cluster.run("slow-payment", json!({})).await?;
    assert_eq!(status(&saga), "COMPENSATED", "{saga:?}");
    assert_eq!(saga.steps[0].attempts, 2);
    let code = saga.steps[0].last_error.as_ref().map(|e| e.code.clone());
    assert_eq!(code.as_deref(), Some("DEADLINE_EXCEEDED"), "{saga:?}");
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_never_succeeds_ends_failed_with_the_reason() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let yaml = format!(
        "name: stuck-refund
version: 1
participants:
  payment: {{ endpoint: {} }}
  rider: {{ endpoint: {} }}
steps:
  - name: authorize
    participant: payment
    compensation_retry: {{ max_attempts: 3, initial_backoff: 10ms, max_backoff: 20ms }}
    action:
      method: payment.v1.Payment/AuthorizeCharge
      request: {{ order_id: \"${{saga.id}}\", amount_cents: 100, card: tok_visa }}
    compensation:
      method: payment.v1.Payment/VoidCharge
      request: {{ order_id: \"${{saga.id}}\" }}
  - name: rider
    participant: rider
    kind: pivot
    action:
      method: rider.v1.Rider/RequestDelivery
      request: {{ order_id: \"${{saga.id}}\", zone: nowhere }}
",
        endpoint(&cluster, Kind::Payment),
        endpoint(&cluster, Kind::Rider)
    );
    cluster
        .client
        .put_definition(PutDefinitionRequest { yaml })
        .await?;
    cluster.participant(Kind::Payment).faults.fail_next(
        "VoidCharge",
        tonic::Code::Unavailable,
        100,
    );
    let saga = cluster.run("stuck-refund", json!({})).await?;
    assert_eq!(status(&saga), "FAILED", "{saga:?}");
    assert!(
        saga.reason
            .contains("compensation of step `authorize` failed after 3 attempt(s): UNAVAILABLE"),
        "{}",
        saga.reason
    );
    assert_eq!(
        cluster
            .participant(Kind::Payment)
            .faults
            .calls("VoidCharge"),
        3
    );
    // The authorization still stands: FAILED means an operator must look, nothing was hidden.
    let payment = cluster.ledger(Kind::Payment).await?;
    assert_eq!(
        effects_of(&payment, &saga.saga_id),
        [("authorize".to_owned(), false)]
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_can_come_from_a_descriptor_set_file() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let file = cluster.dir.path().join("participants.binpb");
    std::fs::write(&file, proto::FILE_DESCRIPTOR_SET)?;
    let yaml = format!(
        "name: from-file
version: 1
participants:
  store: {{ endpoint: {}, descriptor_set: {} }}
steps:
  - name: submit
    participant: store
    kind: pivot
    action:
      method: store.v1.Store/SubmitOrder
      request: {{ order_id: \"${{saga.id}}\", store_id: s-2, items: [pizza] }}
",
        endpoint(&cluster, Kind::Store),
        file.display()
    );
    cluster
        .client
        .put_definition(PutDefinitionRequest { yaml })
        .await?;
    let saga = cluster.run("from-file", json!({})).await?;
    assert_eq!(status(&saga), "COMPLETED", "{saga:?}");

    let missing = "name: no-file
version: 1
participants:
  store: { endpoint: http://127.0.0.1:1, descriptor_set: /nonexistent/set.binpb }
steps:
  - name: submit
    participant: store
    kind: pivot
    action: { method: store.v1.Store/SubmitOrder }
";
    let err = cluster
        .client
        .put_definition(PutDefinitionRequest {
            yaml: missing.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("PutDefinition:4: participant `store`: cannot read descriptor set /nonexistent/set.binpb"),
        "{}",
        err.message()
    );
    cluster.shutdown().await
}
