//! sagactl against a live cluster, through the same code the binary runs.

use clap::Parser;
use orchestrator::cli::sagactl::{Cli, run};
use serde_json::Value;
use tests::{Cluster, order_input};

async fn sagactl(cluster: &Cluster, args: &[&str]) -> anyhow::Result<(String, u8)> {
    let endpoint = format!("http://{}", cluster.orchestrator().addr());
    let mut argv = vec!["sagactl", "--endpoint", endpoint.as_str()];
    argv.extend_from_slice(args);
    let outcome = run(Cli::try_parse_from(argv)?).await?;
    Ok((outcome.text, outcome.exit_code))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_wait_get_list_and_definitions() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let input = order_input("o-cli", serde_json::json!({})).to_string();
    let (text, code) = sagactl(
        &cluster,
        &[
            "--output",
            "json",
            "start",
            "order-placement",
            "--input",
            &input,
            "--wait",
        ],
    )
    .await?;
    assert_eq!(code, 0, "{text}");
    let saga: Value = serde_json::from_str(&text)?;
    assert_eq!(saga["status"], "COMPLETED");
    let id = saga["saga_id"].as_str().expect("saga id").to_owned();

    let (table, _) = sagactl(&cluster, &["get", &id]).await?;
    assert!(table.contains("status      COMPLETED"), "{table}");
    assert!(table.contains("request_rider"), "{table}");

    let (list, _) = sagactl(&cluster, &["-o", "json", "list", "--status", "completed"]).await?;
    let list: Value = serde_json::from_str(&list)?;
    assert_eq!(list["sagas"][0]["saga_id"], id.as_str());

    let failing = order_input("o-cli-2", serde_json::json!({"card": "tok_declined"})).to_string();
    let (text, code) = sagactl(
        &cluster,
        &["start", "order-placement", "--input", &failing, "--wait"],
    )
    .await?;
    assert_eq!(code, 3, "a compensated saga exits 3 with --wait");
    assert!(
        text.contains("COMPENSATED") && text.contains("card declined"),
        "{text}"
    );

    let (defs, _) = sagactl(&cluster, &["definitions", "list"]).await?;
    assert!(defs.contains("order-placement"), "{defs}");

    let err = sagactl(&cluster, &["list", "--status", "SLEEPING"])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--status `SLEEPING`"), "{err}");
    let err = sagactl(
        &cluster,
        &["start", "order-placement", "--input", "{not json"],
    )
    .await
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("--input is not valid JSON"),
        "{err:#}"
    );
    let err = sagactl(&cluster, &["get", "missing-id"]).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("NOT_FOUND: saga `missing-id` not found"),
        "{err}"
    );
    cluster.shutdown().await
}
