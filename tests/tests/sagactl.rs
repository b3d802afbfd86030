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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_changes_and_time_filtered_lists() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let input = order_input("o-cli-fd", serde_json::json!({})).to_string();
    let (text, code) = sagactl(
        &cluster,
        &["-o", "json", "start", "food-delivery", "--input", &input],
    )
    .await?;
    assert_eq!(code, 0, "{text}");
    let started: Value = serde_json::from_str(&text)?;
    let id = started["saga_id"].as_str().expect("saga id").to_owned();

    // Early or not, the store's answer is taken (now or when the saga gets there).
    let (text, _) = sagactl(
        &cluster,
        &["signal", &id, "store.rejected", r#"{"why":"closed"}"#],
    )
    .await?;
    assert!(text.contains("store_decision"), "{text}");
    let err = sagactl(&cluster, &["signal", &id, "store.accepted", "[1]"])
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("payload must be a JSON object"),
        "{err:#}"
    );

    // The change feed shows the saga's statuses, with the customer's words.
    let (_, code) = sagactl(
        &cluster,
        &[
            "-o",
            "json",
            "changes",
            "--definition",
            "food-delivery",
            "--limit",
            "1",
        ],
    )
    .await?;
    assert_eq!(code, 0);

    let (list, _) = sagactl(
        &cluster,
        &[
            "-o",
            "json",
            "list",
            "--created-after",
            "1h",
            "--definition",
            "food-delivery",
        ],
    )
    .await?;
    let list: Value = serde_json::from_str(&list)?;
    assert_eq!(list["sagas"][0]["saga_id"], id.as_str());
    let (list, _) = sagactl(&cluster, &["-o", "json", "list", "--created-before", "1h"]).await?;
    let list: Value = serde_json::from_str(&list)?;
    assert_eq!(list["sagas"].as_array().map(Vec::len), Some(0), "{list}");
    let err = sagactl(&cluster, &["list", "--created-after", "yesterday"])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("--created-after `yesterday`"),
        "{err}"
    );
    cluster.shutdown().await
}

#[tokio::test]
async fn validate_prints_every_problem_with_its_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "name: bad\nparticipants:\n  store: { endpoint: \"http://127.0.0.1:1\" }\nsteps:\n  - name: wait\n    await: { signal: store.accepted, on_timeout: later }\n  - name: submit\n    participant: store\n    action: { method: store.v1.Store/Nope }\n    compensation: { method: store.v1.Store/CancelOrder }\n",
    )?;
    let shipped = ["order-placement.yaml", "food-delivery.yaml"]
        .map(|f| tests::sagas_dir().join(f).display().to_string());
    let mut argv = vec!["sagactl", "validate", "--builtin-descriptors"];
    argv.extend(shipped.iter().map(String::as_str));
    let outcome = run(Cli::try_parse_from(argv)?).await?;
    assert_eq!(outcome.exit_code, 0, "{}", outcome.text);
    assert!(
        outcome.text.contains("food-delivery.yaml: ok"),
        "{}",
        outcome.text
    );

    let bad = bad.display().to_string();
    let argv = vec!["sagactl", "validate", "--builtin-descriptors", bad.as_str()];
    let outcome = run(Cli::try_parse_from(argv)?).await?;
    assert_eq!(outcome.exit_code, 2, "{}", outcome.text);
    for expected in [
        format!("{bad}:6: step `wait`: unknown on_timeout `later`"),
        format!("{bad}:9: step `submit`:"),
        "2 problems found".to_owned(),
    ] {
        assert!(
            outcome.text.contains(&expected),
            "{expected:?} in:\n{}",
            outcome.text
        );
    }
    Ok(())
}
