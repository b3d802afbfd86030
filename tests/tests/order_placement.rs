//! Order placement end to end: real participants, a real orchestrator, loopback gRPC.

use participants::Kind;
use serde_json::json;
use tests::{Cluster, assert_no_doubled_effects, effects_of, order_input, status};

fn ops(effects: &[(String, bool)]) -> Vec<(&str, bool)> {
    effects
        .iter()
        .map(|(op, noop)| (op.as_str(), *noop))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_applies_every_effect_once() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let saga = cluster
        .run("order-placement", order_input("o-happy", json!({})))
        .await?;
    assert_eq!(status(&saga), "COMPLETED", "{saga:?}");
    let id = &saga.saga_id;
    assert_eq!(
        ops(&effects_of(&cluster.ledger(Kind::Payment).await?, id)),
        [("authorize", false)]
    );
    assert_eq!(
        ops(&effects_of(&cluster.ledger(Kind::Store).await?, id)),
        [("submit", false)]
    );
    assert_eq!(
        ops(&effects_of(&cluster.ledger(Kind::Rider).await?, id)),
        [("request", false)]
    );
    // Outputs flow into GetSaga and into later requests.
    let auth = saga.steps[0]
        .output
        .as_ref()
        .map(orchestrator::convert::value_to_json);
    assert!(
        auth.as_ref()
            .and_then(|v| v["authorization_id"].as_str())
            .is_some_and(|a| a.starts_with("auth-")),
        "{auth:?}"
    );
    assert!(
        saga.steps
            .iter()
            .all(|s| s.attempts == 1 && s.compensation_attempts == 0)
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rider_failure_cancels_store_then_voids_payment() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let saga = cluster
        .run(
            "order-placement",
            order_input("o-rider", json!({"zone": "nowhere"})),
        )
        .await?;
    assert_eq!(status(&saga), "COMPENSATED", "{saga:?}");
    assert!(
        saga.reason.contains("no rider available in zone nowhere"),
        "{}",
        saga.reason
    );
    let id = &saga.saga_id;
    let payment = cluster.ledger(Kind::Payment).await?;
    let store = cluster.ledger(Kind::Store).await?;
    assert_eq!(
        ops(&effects_of(&payment, id)),
        [("authorize", false), ("void", false)]
    );
    assert_eq!(
        ops(&effects_of(&store, id)),
        [("submit", false), ("cancel", false)]
    );
    assert!(
        effects_of(&cluster.ledger(Kind::Rider).await?, id).is_empty(),
        "a refused request leaves no effect"
    );
    // Store cancelled before payment voided: compare the times the two undo entries were applied.
    let cancel = store
        .iter()
        .find(|e| e.idempotency_key == format!("{id}/submit_order/compensation"))
        .expect("cancel entry");
    let void = payment
        .iter()
        .find(|e| e.idempotency_key == format!("{id}/authorize_payment/compensation"))
        .expect("void entry");
    let at = |e: &proto::participant::v1::LedgerEntry| e.at.as_ref().map(|t| (t.seconds, t.nanos));
    assert!(
        at(cancel) <= at(void),
        "store cancel {:?} must come before payment void {:?}",
        cancel.at,
        void.at
    );
    let saga_steps: Vec<_> = saga
        .steps
        .iter()
        .map(|s| (s.name.as_str(), tests_step_status(s.status)))
        .collect();
    assert_eq!(
        saga_steps,
        [
            ("authorize_payment", "COMPENSATED"),
            ("submit_order", "COMPENSATED"),
            ("request_rider", "FAILED")
        ]
    );
    cluster.shutdown().await
}

fn tests_step_status(status: i32) -> &'static str {
    use proto::saga::v1::StepStatus;
    match StepStatus::try_from(status).unwrap_or(StepStatus::Unspecified) {
        StepStatus::Compensated => "COMPENSATED",
        StepStatus::Failed => "FAILED",
        StepStatus::Succeeded => "SUCCEEDED",
        other => other.as_str_name(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_failure_voids_payment_and_never_calls_rider() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let saga = cluster
        .run(
            "order-placement",
            order_input("o-store", json!({"items": ["tteokbokki"]})),
        )
        .await?;
    assert_eq!(status(&saga), "COMPENSATED", "{saga:?}");
    let id = &saga.saga_id;
    assert_eq!(
        ops(&effects_of(&cluster.ledger(Kind::Payment).await?, id)),
        [("authorize", false), ("void", false)]
    );
    // The store refused, so its compensation finds nothing to undo.
    assert_eq!(
        ops(&effects_of(&cluster.ledger(Kind::Store).await?, id)),
        [("cancel", true)]
    );
    assert_eq!(
        cluster
            .participant(Kind::Rider)
            .faults
            .calls("RequestDelivery"),
        0,
        "rider never called"
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_is_retried_with_the_same_key() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    cluster
        .participant(Kind::Store)
        .faults
        .fail_next("SubmitOrder", tonic::Code::Unavailable, 2);
    let saga = cluster
        .run("order-placement", order_input("o-flaky", json!({})))
        .await?;
    assert_eq!(status(&saga), "COMPLETED", "{saga:?}");
    assert_eq!(saga.steps[1].attempts, 3);
    assert_eq!(
        saga.steps[1].last_error.as_ref().map(|e| e.code.as_str()),
        Some("UNAVAILABLE")
    );
    assert_eq!(
        cluster.participant(Kind::Store).faults.calls("SubmitOrder"),
        3
    );
    let store = cluster.ledger(Kind::Store).await?;
    assert_eq!(ops(&effects_of(&store, &saga.saga_id)), [("submit", false)]);
    assert_no_doubled_effects(&store)?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_saga_is_idempotent_on_its_key() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let input = order_input("o-idem", json!({}));
    let first = cluster
        .start_saga("order-placement", input.clone(), "checkout-42")
        .await?;
    let second = cluster
        .start_saga("order-placement", input.clone(), "checkout-42")
        .await?;
    assert!(first.created);
    assert!(!second.created);
    assert_eq!(first.saga_id, second.saga_id);
    // The same key with another request is refused, not silently mapped.
    let other = cluster
        .start_saga(
            "order-placement",
            order_input("o-other", json!({})),
            "checkout-42",
        )
        .await;
    let err = other.expect_err("different request under the same key");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert!(err.message().contains(&first.saga_id), "{}", err.message());
    cluster.wait_terminal(&first.saga_id).await?;
    let list = cluster
        .client
        .list_sagas(proto::saga::v1::ListSagasRequest {
            page_size: 100,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(list.sagas.len(), 1, "one saga for one key");
    assert_eq!(
        cluster
            .participant(Kind::Payment)
            .faults
            .calls("AuthorizeCharge"),
        1
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_errors_and_store_nothing() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let unknown = cluster
        .start_saga("order-teleport", order_input("o-1", json!({})), "")
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert!(
        unknown.message().contains("order-teleport"),
        "{}",
        unknown.message()
    );

    let bad = cluster
        .start_saga(
            "order-placement",
            order_input("o-1", json!({"amount_cents": "lots", "colour": "red"})),
            "",
        )
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message()
            .contains("input.amount_cents: expected integer"),
        "{}",
        bad.message()
    );
    assert!(
        bad.message().contains("input.colour: unknown field"),
        "{}",
        bad.message()
    );

    let missing = cluster
        .start_saga("order-placement", json!({"order_id": "o-1"}), "")
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);
    assert!(
        missing
            .message()
            .contains("input.zone: required string field is missing"),
        "{}",
        missing.message()
    );

    let huge = cluster
        .start_saga(
            "order-placement",
            order_input("o-1", json!({"customer_id": "x".repeat(70_000)})),
            "",
        )
        .await
        .unwrap_err();
    assert_eq!(huge.code(), tonic::Code::InvalidArgument);
    assert!(
        huge.message().contains("the limit is 65536"),
        "{}",
        huge.message()
    );

    let get = cluster
        .client
        .get_saga(proto::saga::v1::GetSagaRequest {
            saga_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(get.code(), tonic::Code::NotFound);

    let list = cluster
        .client
        .list_sagas(proto::saga::v1::ListSagasRequest::default())
        .await?
        .into_inner();
    assert!(
        list.sagas.is_empty(),
        "rejected requests stored nothing: {:?}",
        list.sagas
    );
    assert_eq!(
        cluster
            .participant(Kind::Payment)
            .faults
            .calls("AuthorizeCharge"),
        0
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_before_the_pivot_compensates_and_after_it_is_refused() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    // Hold the store call so the saga is mid-flight when the cancel arrives.
    cluster
        .participant(Kind::Store)
        .faults
        .set_delay("SubmitOrder", std::time::Duration::from_millis(300));
    let started = cluster
        .start_saga("order-placement", order_input("o-cancel", json!({})), "")
        .await?;
    let cancelled = cluster
        .client
        .cancel_saga(proto::saga::v1::CancelSagaRequest {
            saga_id: started.saga_id.clone(),
            reason: "changed my mind".into(),
        })
        .await?;
    drop(cancelled);
    let saga = cluster.wait_terminal(&started.saga_id).await?;
    assert_eq!(status(&saga), "COMPENSATED", "{saga:?}");
    assert!(saga.reason.contains("changed my mind"), "{}", saga.reason);
    assert_eq!(
        cluster
            .participant(Kind::Rider)
            .faults
            .calls("RequestDelivery"),
        0
    );
    let payment = cluster.ledger(Kind::Payment).await?;
    assert_eq!(
        ops(&effects_of(&payment, &saga.saga_id)),
        [("authorize", false), ("void", false)]
    );

    cluster.participant(Kind::Store).faults.clear();
    let done = cluster
        .run("order-placement", order_input("o-done", json!({})))
        .await?;
    let late = cluster
        .client
        .cancel_saga(proto::saga::v1::CancelSagaRequest {
            saga_id: done.saga_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(late.code(), tonic::Code::FailedPrecondition);
    assert!(
        late.message().contains("already COMPLETED"),
        "{}",
        late.message()
    );
    cluster.shutdown().await
}
