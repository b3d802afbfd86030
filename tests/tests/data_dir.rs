//! The data directory: a second orchestrator on it is refused, and `orchestrator check`
//! finds a stored state that disagrees with the event log.

use clap::Parser;
use serde_json::json;
use tests::{Cluster, order_input, status};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_orchestrator_on_the_same_directory_is_refused() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let config = orchestrator::Config {
        data: cluster.dir.path().join("orchestrator"),
        sagas: None,
        participants: Default::default(),
        descriptor_wait: std::time::Duration::from_secs(1),
        shutdown_grace: std::time::Duration::from_secs(1),
    };
    let err = orchestrator::Orchestrator::start(config, TcpListener::bind("127.0.0.1:0").await?)
        .await
        .expect_err("the directory is in use");
    let message = err.to_string();
    assert!(
        message.contains("is in use by another process"),
        "{message}"
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_summary_that_disagrees_with_its_log() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let saga = cluster
        .run("order-placement", order_input("o-check", json!({})))
        .await?;
    assert_eq!(status(&saga), "COMPLETED");
    let data = cluster.dir.path().join("orchestrator");
    let orchestrator = cluster.orchestrator.take().expect("running");
    // Stop it, with the client's connection dropped first, so the directory is free.
    cluster.client = proto::saga::v1::saga_orchestrator_client::SagaOrchestratorClient::new(
        tonic::transport::Channel::from_static("http://127.0.0.1:9").connect_lazy(),
    );
    orchestrator.shutdown().await;

    let clean = orchestrator::check::check_dir(&data)?;
    assert!(clean.is_clean(), "{:?}", clean.problems);
    assert_eq!(clean.sagas, 1);

    // Corrupt the summary: claim the saga was compensated.
    {
        let db = sled::open(&data)?;
        let sagas = db.open_tree("sagas")?;
        let bytes = sagas.get(saga.saga_id.as_bytes())?.expect("summary");
        let mut summary: serde_json::Value = serde_json::from_slice(&bytes)?;
        summary["status"] = json!("COMPENSATED");
        sagas.insert(saga.saga_id.as_bytes(), serde_json::to_vec(&summary)?)?;
        // And list it under COMPENSATED in the status index too (status byte 5, then the
        // creation time and the id).
        let mut index_key = vec![5u8];
        let created = summary["created_at_ms"].as_u64().expect("created_at_ms");
        index_key.extend_from_slice(&created.to_be_bytes());
        index_key.extend_from_slice(saga.saga_id.as_bytes());
        db.open_tree("by_status")?.insert(index_key, &[])?;
        db.flush()?;
    }
    let report = orchestrator::check::check_dir(&data)?;
    let expected = format!(
        "saga {}: status is COMPENSATED in the store but COMPLETED by replay",
        saga.saga_id
    );
    assert!(report.problems.contains(&expected), "{:?}", report.problems);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains(r#"the status index disagrees: it lists {"COMPENSATED", "COMPLETED"}, replay says COMPLETED"#)),
        "{:?}",
        report.problems
    );

    // The command line says so and fails.
    let cli = orchestrator::cli::orchestrator::Cli::try_parse_from([
        "orchestrator",
        "check",
        "--data",
        &data.display().to_string(),
    ])?;
    let err = orchestrator::cli::orchestrator::run(cli, None)
        .await
        .expect_err("check must fail");
    assert!(err.to_string().contains("disagrees"), "{err}");
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_orchestrator_restarts_while_a_participant_is_down() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let rider = cluster.participants.remove("rider").expect("rider");
    rider.shutdown().await?;
    // The definitions in sagas/ are stored already; restarting must not need reflection.
    cluster.restart_orchestrator().await?;
    let listed = cluster
        .client
        .list_definitions(proto::saga::v1::ListDefinitionsRequest {})
        .await?
        .into_inner();
    assert!(
        listed
            .definitions
            .iter()
            .any(|d| d.name == "order-placement")
    );
    cluster.shutdown().await
}
