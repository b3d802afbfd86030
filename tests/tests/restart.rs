//! Restarting the orchestrator while sagas are in flight: every saga still finishes, and
//! no participant applies an effect twice.

use std::time::Duration;

use participants::Kind;
use serde_json::json;
use tests::{Cluster, assert_no_doubled_effects, effects_of, order_input, status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_in_flight_survive_a_restart_without_doubled_effects() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    // Slow the rider so sagas are mid-way when the orchestrator stops.
    cluster
        .participant(Kind::Rider)
        .faults
        .set_delay("*", Duration::from_millis(200));
    let mut ids = Vec::new();
    for i in 0..24 {
        let changes = match i % 3 {
            0 => json!({}),
            1 => json!({"zone": "nowhere"}),
            _ => json!({"items": ["udon"], "store_id": "s-3"}),
        };
        let started = cluster
            .start_saga(
                "order-placement",
                order_input(&format!("o-{i}"), changes),
                &format!("k-{i}"),
            )
            .await?;
        ids.push((started.saga_id, i % 3));
    }
    cluster.restart_orchestrator().await?;
    cluster.participant(Kind::Rider).faults.clear();

    for (id, case) in &ids {
        let saga = cluster.wait_terminal(id).await?;
        let expected = if *case == 0 {
            "COMPLETED"
        } else {
            "COMPENSATED"
        };
        assert_eq!(status(&saga), expected, "saga {id} (case {case}): {saga:?}");
    }
    let payment = cluster.ledger(Kind::Payment).await?;
    let store = cluster.ledger(Kind::Store).await?;
    let rider = cluster.ledger(Kind::Rider).await?;
    for ledger in [&payment, &store, &rider] {
        assert_no_doubled_effects(ledger)?;
    }
    for (id, case) in &ids {
        let pay: Vec<String> = effects_of(&payment, id)
            .into_iter()
            .filter(|(_, noop)| !noop)
            .map(|(op, _)| op)
            .collect();
        match case {
            0 => assert_eq!(pay, ["authorize"], "{id}"),
            _ => assert_eq!(pay, ["authorize", "void"], "{id}"),
        }
    }
    // The same idempotency key after the restart still gives the same saga.
    let again = cluster
        .start_saga("order-placement", order_input("o-0", json!({})), "k-0")
        .await?;
    assert!(!again.created);
    assert_eq!(again.saga_id, ids[0].0);
    cluster.shutdown().await
}
