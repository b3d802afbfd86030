//! A parked saga resumed by two callers at once, one of which stalls after reading the
//! log: the other resumes it, moves it on and parks it again meanwhile, so the stalled
//! one must not start a driver from the log it read. (Its own test binary: the failpoint
//! it sets is process-wide.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use proto::saga::v1 as pb;
use serde_json::json;
use tests::{Cluster, eventually, order_input};

async fn signal(
    client: &mut proto::saga::v1::saga_orchestrator_client::SagaOrchestratorClient<
        tonic::transport::Channel,
    >,
    saga_id: &str,
    name: &str,
) -> Result<pb::SignalSagaResponse, tonic::Status> {
    client
        .signal_saga(pb::SignalSagaRequest {
            saga_id: saga_id.to_owned(),
            signal: name.to_owned(),
            payload: Some(orchestrator::convert::json_to_struct(&json!({}))),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resume_that_read_an_old_log_does_not_start_a_driver_from_it() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let id = cluster
        .start_saga("food-delivery", order_input("fd-stale", json!({})), "")
        .await?
        .saga_id;
    cluster
        .wait_until(&id, "awaiting store.accepted", |s| {
            s.awaiting_signals.iter().any(|a| a == "store.accepted")
        })
        .await?;
    let runtime = cluster.orchestrator().runtime().clone();
    eventually("the saga is parked", || runtime.parked() == 1).await?;

    // The first resume to read the log stops there until released; later ones pass.
    let (reached_tx, reached_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    let first = Arc::new(AtomicBool::new(true));
    fail::cfg_callback("runtime::resume_after_load", move || {
        if first.swap(false, Ordering::SeqCst) {
            let _ = reached_tx.send(());
            if let Ok(release) = release_rx.lock() {
                let _ = release.recv_timeout(Duration::from_secs(20));
            }
        }
    })
    .map_err(anyhow::Error::msg)?;

    let mut stalled_client = cluster.client.clone();
    let stalled_id = id.clone();
    let stalled =
        tokio::spawn(
            async move { signal(&mut stalled_client, &stalled_id, "store.accepted").await },
        );
    tokio::task::spawn_blocking(move || reached_rx.recv_timeout(Duration::from_secs(10))).await??;

    // Meanwhile the same signal again resumes the saga, which moves on to cooking and
    // parks again.
    let first_reply = signal(&mut cluster.client, &id, "store.accepted").await?;
    assert!(!first_reply.duplicate, "{first_reply:?}");
    cluster
        .wait_until(&id, "awaiting cooking.started", |s| {
            s.awaiting_signals.iter().any(|a| a == "cooking.started")
        })
        .await?;
    eventually("the saga is parked again", || {
        runtime.parked() == 1 && runtime.active() == 0
    })
    .await?;

    // The stalled resume goes on: it answers from the saga as it is now (a duplicate), and
    // the saga stays in the table.
    release_tx.send(())?;
    let late = stalled.await??;
    assert!(late.duplicate, "{late:?}");
    fail::remove("runtime::resume_after_load");
    eventually("the saga is still parked", || {
        runtime.parked() == 1 && runtime.active() == 0
    })
    .await?;
    // And it still answers its next signal.
    let cooking = signal(&mut cluster.client, &id, "cooking.started").await?;
    assert!(!cooking.duplicate, "{cooking:?}");
    cluster.shutdown().await
}
