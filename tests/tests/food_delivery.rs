//! The whole food-delivery flow (`sagas/food-delivery.yaml`) driven through the public API
//! the way the store app, the rider app and the customer would: signals, the store's
//! timeout (across a restart), cancellation before and after cooking starts, early and bad
//! signals, and definition versions.

use std::time::Duration;

use participants::Kind;
use proto::saga::v1 as pb;
use serde_json::{Value, json};
use tests::{Cluster, assert_no_doubled_effects, effects_of, eventually, order_input, status};
use tonic::Code;

const FLOW: &str = "food-delivery";

fn ops(effects: &[(String, bool)]) -> Vec<&str> {
    effects.iter().map(|(op, _)| op.as_str()).collect()
}

async fn signal(
    cluster: &mut Cluster,
    saga_id: &str,
    name: &str,
    payload: Value,
) -> Result<pb::SignalSagaResponse, tonic::Status> {
    cluster
        .client
        .signal_saga(pb::SignalSagaRequest {
            saga_id: saga_id.to_owned(),
            signal: name.to_owned(),
            payload: Some(orchestrator::convert::json_to_struct(&payload)),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Waits until the saga awaits `name`.
async fn awaiting(cluster: &mut Cluster, saga_id: &str, name: &str) -> anyhow::Result<pb::Saga> {
    cluster
        .wait_until(saga_id, &format!("awaiting {name}"), |s| {
            s.awaiting_signals.iter().any(|a| a == name)
        })
        .await
}

async fn start(cluster: &mut Cluster, definition: &str, order_id: &str) -> anyhow::Result<String> {
    Ok(cluster
        .start_saga(definition, order_input(order_id, json!({})), "")
        .await?
        .saga_id)
}

#[tokio::test]
async fn an_order_goes_from_payment_to_delivery() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let id = start(&mut cluster, FLOW, "fd-1").await?;

    let saga = awaiting(&mut cluster, &id, "store.accepted").await?;
    assert_eq!(status(&saga), "WAITING");
    assert_eq!(saga.business_status, "waiting for the store");
    assert_eq!(saga.awaiting_signals, ["store.accepted", "store.rejected"]);
    assert!(
        saga.waiting_for.contains("signal `store.accepted`"),
        "{}",
        saga.waiting_for
    );
    assert!(
        saga.wake_at.is_some(),
        "the store's 5-minute timeout is due"
    );

    // The store app accepts, with an estimate later steps can read.
    let reply = signal(
        &mut cluster,
        &id,
        "store.accepted",
        json!({"eta_minutes": 25}),
    )
    .await?;
    assert_eq!(reply.step, "store_decision");
    assert!(!reply.buffered && !reply.duplicate);
    let saga = awaiting(&mut cluster, &id, "cooking.started").await?;
    assert_eq!(
        saga.business_status,
        "accepted by the store, waiting for the kitchen"
    );

    signal(&mut cluster, &id, "cooking.started", json!({})).await?;
    let saga = awaiting(&mut cluster, &id, "cooking.finished").await?;
    assert_eq!(saga.business_status, "cooking");
    // Riders in the zone see the delivery once cooking started.
    assert_eq!(
        ops(&effects_of(&cluster.ledger(Kind::Rider).await?, &id)),
        ["request"]
    );

    signal(&mut cluster, &id, "cooking.finished", json!({})).await?;
    awaiting(&mut cluster, &id, "rider.picked_up").await?;
    signal(
        &mut cluster,
        &id,
        "rider.picked_up",
        json!({"rider": "r-7"}),
    )
    .await?;
    let saga = awaiting(&mut cluster, &id, "rider.delivered").await?;
    assert_eq!(saga.business_status, "on the way");
    signal(&mut cluster, &id, "rider.delivered", json!({})).await?;

    let done = cluster.wait_terminal(&id).await?;
    assert_eq!(status(&done), "COMPLETED", "{done:?}");
    assert_eq!(done.business_status, "delivered");
    assert_eq!(
        ops(&effects_of(&cluster.ledger(Kind::Payment).await?, &id)),
        ["authorize", "capture"]
    );
    assert_eq!(
        ops(&effects_of(&cluster.ledger(Kind::Store).await?, &id)),
        ["submit"]
    );

    // A retried signal is harmless; a late different one is refused with the reason.
    let again = signal(&mut cluster, &id, "rider.delivered", json!({})).await?;
    assert!(again.duplicate);
    let late = signal(&mut cluster, &id, "store.rejected", json!({}))
        .await
        .expect_err("too late");
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert!(late.message().contains("COMPLETED"), "{}", late.message());
    for kind in Kind::ALL {
        assert_no_doubled_effects(&cluster.ledger(kind).await?)?;
    }
    cluster.shutdown().await
}

#[tokio::test]
async fn a_store_rejection_cancels_the_order_and_voids_the_payment() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let id = start(&mut cluster, FLOW, "fd-2").await?;
    awaiting(&mut cluster, &id, "store.rejected").await?;
    signal(
        &mut cluster,
        &id,
        "store.rejected",
        json!({"why": "sold out"}),
    )
    .await?;
    let done = cluster.wait_terminal(&id).await?;
    assert_eq!(status(&done), "COMPENSATED", "{done:?}");
    assert_eq!(
        done.business_status,
        "order could not be placed, payment refunded"
    );
    assert!(done.reason.contains("store.rejected"), "{}", done.reason);
    // Exactly what was done, undone in reverse: the store order, then the payment.
    assert_eq!(
        ops(&effects_of(&cluster.ledger(Kind::Store).await?, &id)),
        ["submit", "cancel"]
    );
    assert_eq!(
        ops(&effects_of(&cluster.ledger(Kind::Payment).await?, &id)),
        ["authorize", "void"]
    );
    assert!(effects_of(&cluster.ledger(Kind::Rider).await?, &id).is_empty());
    let store_cancelled = done.steps[1].compensated_at.expect("store undone");
    let payment_voided = done.steps[0].compensated_at.expect("payment undone");
    assert!(
        (store_cancelled.seconds, store_cancelled.nanos)
            <= (payment_voided.seconds, payment_voided.nanos)
    );
    cluster.shutdown().await
}

/// Stores `food-delivery-quick`: the same flow with a 2-second store timeout.
async fn put_quick_flow(cluster: &mut Cluster) -> anyhow::Result<()> {
    let yaml = std::fs::read_to_string(tests::sagas_dir().join("food-delivery.yaml"))?
        .replace("name: food-delivery", "name: food-delivery-quick")
        .replace("      timeout: 5m", "      timeout: 2s");
    anyhow::ensure!(
        yaml.contains("timeout: 2s"),
        "the store timeout was not found"
    );
    cluster
        .client
        .put_definition(pb::PutDefinitionRequest { yaml })
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_store_that_never_answers_times_out_at_its_time_across_a_restart() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    put_quick_flow(&mut cluster).await?;
    let id = start(&mut cluster, "food-delivery-quick", "fd-3").await?;
    let waiting = awaiting(&mut cluster, &id, "store.accepted").await?;
    let wait_started = waiting.steps[2].started_at.expect("started");
    let started_ms = wait_started.seconds * 1000 + i64::from(wait_started.nanos / 1_000_000);

    // The orchestrator is down when the timeout falls due, and comes back after it.
    cluster.stop_orchestrator().await;
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    };
    let down_for = (started_ms + 2_300 - now_ms()).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(down_for)).await;
    let restarted_ms = now_ms();
    cluster.start_orchestrator_again().await?;

    let done = cluster.wait_terminal(&id).await?;
    assert_eq!(status(&done), "COMPENSATED", "{done:?}");
    let step = &done.steps[2];
    assert_eq!(
        step.last_error.as_ref().map(|e| e.code.as_str()),
        Some("DEADLINE_EXCEEDED")
    );
    let fired = step.finished_at.expect("timed out");
    let fired_ms = fired.seconds * 1000 + i64::from(fired.nanos / 1_000_000);
    assert!(fired_ms - started_ms >= 2_000, "fired early");
    // The timer is in the log: it fires as soon as the orchestrator is back, instead of
    // starting 2 s over from the restart.
    assert!(
        fired_ms - restarted_ms < 1_500,
        "fired {} ms after the restart",
        fired_ms - restarted_ms
    );
    assert_eq!(
        ops(&effects_of(&cluster.ledger(Kind::Payment).await?, &id)),
        ["authorize", "void"]
    );
    cluster.shutdown().await
}

#[tokio::test]
async fn the_customer_may_cancel_until_cooking_starts() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    // Accepted by the store, not cooking yet: the cancellation compensates.
    let id = start(&mut cluster, FLOW, "fd-4").await?;
    awaiting(&mut cluster, &id, "store.accepted").await?;
    signal(&mut cluster, &id, "store.accepted", json!({})).await?;
    awaiting(&mut cluster, &id, "cooking.started").await?;
    cluster
        .client
        .cancel_saga(pb::CancelSagaRequest {
            saga_id: id.clone(),
            reason: "customer changed their mind".into(),
        })
        .await?;
    let done = cluster.wait_terminal(&id).await?;
    assert_eq!(status(&done), "COMPENSATED");
    assert_eq!(done.business_status, "cancelled, payment refunded");
    assert_eq!(
        ops(&effects_of(&cluster.ledger(Kind::Store).await?, &id)),
        ["submit", "cancel"]
    );
    assert_eq!(
        ops(&effects_of(&cluster.ledger(Kind::Payment).await?, &id)),
        ["authorize", "void"]
    );

    // Cooking started: the cancellation is refused, naming why, and nothing changes.
    let id = start(&mut cluster, FLOW, "fd-5").await?;
    awaiting(&mut cluster, &id, "store.accepted").await?;
    signal(&mut cluster, &id, "store.accepted", json!({})).await?;
    signal(&mut cluster, &id, "cooking.started", json!({})).await?;
    awaiting(&mut cluster, &id, "cooking.finished").await?;
    let refused = cluster
        .client
        .cancel_saga(pb::CancelSagaRequest {
            saga_id: id.clone(),
            reason: "too late".into(),
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("cooking_started"),
        "{}",
        refused.message()
    );
    let saga = awaiting(&mut cluster, &id, "cooking.finished").await?;
    assert_eq!(status(&saga), "WAITING");
    cluster.shutdown().await
}

#[tokio::test]
async fn early_signals_are_kept_and_bad_ones_refused() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let id = start(&mut cluster, FLOW, "fd-6").await?;
    // The kitchen is quicker than the store's app: cooking.started arrives first and is
    // kept until the saga gets there.
    let early = signal(&mut cluster, &id, "cooking.started", json!({})).await?;
    assert!(early.buffered, "{early:?}");
    assert_eq!(early.step, "cooking_started");
    let saga = cluster
        .wait_until(&id, "keeping cooking.started", |s| {
            s.buffered_signals.iter().any(|b| b == "cooking.started")
                || s.awaiting_signals.iter().any(|a| a == "store.accepted")
        })
        .await?;
    assert!(
        saga.buffered_signals
            .contains(&"cooking.started".to_owned())
    );
    // The other answer to a kept signal's step, or a second copy with another payload,
    // is refused; the same copy again is a duplicate.
    let again = signal(&mut cluster, &id, "cooking.started", json!({})).await?;
    assert!(again.duplicate);
    signal(&mut cluster, &id, "store.accepted", json!({})).await?;
    // Both taken: the saga goes straight on to cooking.
    let saga = awaiting(&mut cluster, &id, "cooking.finished").await?;
    assert!(saga.buffered_signals.is_empty());

    let unknown = signal(&mut cluster, &id, "store.exploded", json!({}))
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert!(
        unknown.message().contains("rider.picked_up"),
        "the error lists the signals: {}",
        unknown.message()
    );
    let passed = signal(&mut cluster, &id, "store.rejected", json!({}))
        .await
        .expect_err("passed");
    assert_eq!(passed.code(), Code::FailedPrecondition);
    assert!(
        passed
            .message()
            .contains("already received `store.accepted`"),
        "{}",
        passed.message()
    );
    let missing = signal(&mut cluster, "no-such-saga", "store.accepted", json!({}))
        .await
        .expect_err("no saga");
    assert_eq!(missing.code(), Code::NotFound);
    let unnamed = signal(&mut cluster, &id, " ", json!({}))
        .await
        .expect_err("no name");
    assert_eq!(unnamed.code(), Code::InvalidArgument);
    cluster.shutdown().await
}

#[tokio::test]
async fn a_changed_definition_is_a_new_version_and_running_sagas_keep_theirs() -> anyhow::Result<()>
{
    let mut cluster = Cluster::start().await?;
    let old = start(&mut cluster, FLOW, "fd-7").await?;
    awaiting(&mut cluster, &old, "store.accepted").await?;

    let changed = std::fs::read_to_string(tests::sagas_dir().join("food-delivery.yaml"))?.replace(
        "status: waiting for the store",
        "status: the store is looking at your order",
    );
    let put = cluster
        .client
        .put_definition(pb::PutDefinitionRequest {
            yaml: changed.clone(),
        })
        .await?
        .into_inner();
    assert_eq!((put.version, put.created), (2, true));
    let same = cluster
        .client
        .put_definition(pb::PutDefinitionRequest { yaml: changed })
        .await?
        .into_inner();
    assert_eq!((same.version, same.created), (2, false));
    let list = cluster
        .client
        .list_definitions(pb::ListDefinitionsRequest {})
        .await?
        .into_inner();
    let versions = list
        .definitions
        .iter()
        .find(|d| d.name == FLOW)
        .map(|d| (d.versions.clone(), d.latest));
    assert_eq!(versions, Some((vec![1, 2], 2)));

    let new = start(&mut cluster, FLOW, "fd-8").await?;
    let new_saga = awaiting(&mut cluster, &new, "store.accepted").await?;
    assert_eq!(new_saga.version, 2);
    assert_eq!(
        new_saga.business_status,
        "the store is looking at your order"
    );
    let old_saga = awaiting(&mut cluster, &old, "store.accepted").await?;
    assert_eq!(old_saga.version, 1);
    assert_eq!(old_saga.business_status, "waiting for the store");

    // Both still run to the end on their own versions, also after a restart.
    cluster.restart_orchestrator().await?;
    for id in [&old, &new] {
        signal(&mut cluster, id, "store.rejected", json!({})).await?;
        let done = cluster.wait_terminal(id).await?;
        assert_eq!(status(&done), "COMPENSATED");
    }
    cluster.shutdown().await
}

#[tokio::test]
async fn a_waiting_saga_is_parked_without_a_driver_and_resumed_by_its_signal_or_timer()
-> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    put_quick_flow(&mut cluster).await?;

    // Waiting for the store: parked, no driver left.
    const SAGAS: usize = 4;
    let mut ids = Vec::new();
    for i in 0..SAGAS {
        let id = start(&mut cluster, FLOW, &format!("fd-park-{i}")).await?;
        awaiting(&mut cluster, &id, "store.accepted").await?;
        ids.push(id);
    }
    let runtime = cluster.orchestrator().runtime().clone();
    eventually("the sagas are parked", || {
        runtime.parked() == SAGAS && runtime.active() == 0
    })
    .await?;

    // Eight identical signals to each at once: one resumes the saga and records it, the
    // others are answered as duplicates of it, also those that read the saga's log before
    // the first one moved it on (and parked it again, at cooking).
    let mut replies = Vec::new();
    for id in &ids {
        for _ in 0..8 {
            let mut client = cluster.client.clone();
            let id = id.clone();
            replies.push(tokio::spawn(async move {
                let reply = client
                    .signal_saga(pb::SignalSagaRequest {
                        saga_id: id.clone(),
                        signal: "store.accepted".into(),
                        payload: Some(orchestrator::convert::json_to_struct(&json!({}))),
                    })
                    .await
                    .map(tonic::Response::into_inner);
                (id, reply)
            }));
        }
    }
    let mut recorded = std::collections::BTreeMap::new();
    for reply in replies {
        let (id, reply) = reply.await?;
        let reply = reply?;
        *recorded.entry(id).or_insert(0) += usize::from(!reply.duplicate);
    }
    for id in &ids {
        assert_eq!(
            recorded.get(id),
            Some(&1),
            "one signal of eight recorded for {id}"
        );
        // On to the next wait (cooking), parked again.
        awaiting(&mut cluster, id, "cooking.started").await?;
    }
    eventually("the sagas are parked again", || {
        runtime.parked() == SAGAS && runtime.active() == 0
    })
    .await?;

    // A parked saga's timer resumes it at its time, with no restart: the store never
    // answers, and the 2 s timeout compensates the order.
    let quick = start(&mut cluster, "food-delivery-quick", "fd-park-2").await?;
    let waiting = awaiting(&mut cluster, &quick, "store.accepted").await?;
    eventually("the quick saga is parked too", || {
        runtime.parked() == SAGAS + 1
    })
    .await?;
    let done = cluster.wait_terminal(&quick).await?;
    assert_eq!(status(&done), "COMPENSATED", "{done:?}");
    let step = &done.steps[2];
    assert_eq!(
        step.last_error.as_ref().map(|e| e.code.as_str()),
        Some("DEADLINE_EXCEEDED")
    );
    let ms = |t: prost_types::Timestamp| t.seconds * 1000 + i64::from(t.nanos / 1_000_000);
    let waited = ms(step.finished_at.expect("timed out"))
        - ms(waiting.steps[2].started_at.expect("started"));
    assert!(
        (2_000..3_500).contains(&waited),
        "the 2 s timeout fired after {waited} ms"
    );
    // The others are still parked, untouched.
    assert_eq!(runtime.parked(), SAGAS);
    cluster.shutdown().await
}
