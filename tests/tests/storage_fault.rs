//! A failed flush stops the world: the orchestrator answers UNAVAILABLE to everything that
//! needs the store, reports NOT_SERVING on gRPC health and logs the cause; nothing is
//! acknowledged after the failure. A restart recovers from what is on disk.

use std::time::Duration;

use proto::saga::v1::GetSagaRequest;
use serde_json::json;
use tests::{Cluster, order_input, status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn serving(cluster: &Cluster) -> anyhow::Result<i32> {
    let mut health = HealthClient::new(
        tonic::transport::Channel::from_shared(format!(
            "http://{}",
            cluster.orchestrator().addr()
        ))?
        .connect()
        .await?,
    );
    let reply = health
        .check(HealthCheckRequest {
            service: "saga.v1.SagaOrchestrator".into(),
        })
        .await?
        .into_inner();
    Ok(reply.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_stops_acknowledging_until_restart() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let before = cluster
        .run("order-placement", order_input("o-before", json!({})))
        .await?;
    assert_eq!(status(&before), "COMPLETED");
    assert_eq!(serving(&cluster).await?, ServingStatus::Serving as i32);

    *cluster
        .orchestrator()
        .store()
        .fault_injection()
        .fail_next_flush
        .lock()
        .expect("lock") = Some("disk full".into());
    let refused = cluster
        .start_saga(
            "order-placement",
            order_input("o-lost", json!({})),
            "key-lost",
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        refused.message().contains("flush failed: disk full"),
        "{}",
        refused.message()
    );
    // Still refused: the store does not accept writes after a failed flush, even if the
    // disk came back; and reads refuse too, since memory may hold what never became durable.
    let again = cluster
        .start_saga("order-placement", order_input("o-next", json!({})), "")
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::Unavailable);
    let read = cluster
        .client
        .get_saga(GetSagaRequest {
            saga_id: before.saga_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(read.code(), tonic::Code::Unavailable);
    // Health follows (the Watch stream pushes each change).
    let mut health = HealthClient::new(
        tonic::transport::Channel::from_shared(format!(
            "http://{}",
            cluster.orchestrator().addr()
        ))?
        .connect()
        .await?,
    );
    let mut changes = health
        .watch(HealthCheckRequest {
            service: "saga.v1.SagaOrchestrator".into(),
        })
        .await?
        .into_inner();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(change) = changes.message().await? {
            if change.status == ServingStatus::NotServing as i32 {
                return Ok(());
            }
        }
        anyhow::bail!("health stream ended without NOT_SERVING")
    })
    .await??;
    drop(changes);
    drop(health);

    cluster.restart_orchestrator().await?;
    assert_eq!(serving(&cluster).await?, ServingStatus::Serving as i32);
    let kept = cluster
        .client
        .get_saga(GetSagaRequest {
            saga_id: before.saga_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(status(&kept), "COMPLETED");
    // The refused request may or may not have reached the disk; its key settles it.
    let retried = cluster
        .start_saga(
            "order-placement",
            order_input("o-lost", json!({})),
            "key-lost",
        )
        .await?;
    let saga = cluster.wait_terminal(&retried.saga_id).await?;
    assert_eq!(status(&saga), "COMPLETED");
    cluster.shutdown().await
}
