//! The notifier consumes the orchestrator's change feed (WatchSagas) and records one
//! notification per status change: every change of every saga, exactly once, in order,
//! across an orchestrator restart in the middle of the load.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use participants::notifier::NotifierConfig;
use proto::notifier::v1 as npb;
use proto::notifier::v1::notifier_client::NotifierClient;
use proto::saga::v1 as pb;
use serde_json::json;
use tests::{Cluster, DEADLINE, mixed_input, order_input, status};
use tokio::net::TcpListener;

async fn signal(cluster: &mut Cluster, saga_id: &str, name: &str) -> anyhow::Result<()> {
    cluster
        .client
        .signal_saga(pb::SignalSagaRequest {
            saga_id: saga_id.to_owned(),
            signal: name.to_owned(),
            payload: None,
        })
        .await
        .with_context(|| format!("signal {name} to {saga_id}"))?;
    Ok(())
}

/// The statuses a saga went through, from its own event history (WatchSaga), without
/// repeats: an account of its changes independent of the feed.
async fn statuses_from_history(
    cluster: &mut Cluster,
    saga_id: &str,
) -> anyhow::Result<Vec<String>> {
    let mut stream = cluster
        .client
        .watch_saga(pb::WatchSagaRequest {
            saga_id: saga_id.to_owned(),
        })
        .await?
        .into_inner();
    let mut statuses: Vec<String> = Vec::new();
    while let Some(event) = stream.message().await? {
        let name = orchestrator::cli::sagactl::status_name(event.status).to_owned();
        if statuses.last() != Some(&name) {
            statuses.push(name);
        }
    }
    Ok(statuses)
}

#[tokio::test]
async fn every_status_change_is_notified_once_in_order_across_a_restart() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let notifier = participants::spawn_notifier(
        NotifierConfig {
            orchestrator: cluster.orchestrator_url(),
            data: cluster.dir.path().join("notifier"),
            definition: None,
        },
        listener,
    )
    .await?;
    let mut notifications = NotifierClient::connect(format!("http://{}", notifier.addr())).await?;

    // A first wave: order placements (completing, and compensating at the store or the
    // rider) and two food deliveries waiting for the store.
    let mut ids = Vec::new();
    for i in 0..9 {
        ids.push(
            cluster
                .start_saga("order-placement", mixed_input(i), "")
                .await?
                .saga_id,
        );
    }
    let mut deliveries = Vec::new();
    for order in ["n-fd-1", "n-fd-2"] {
        let id = cluster
            .start_saga("food-delivery", order_input(order, json!({})), "")
            .await?
            .saga_id;
        cluster
            .wait_until(&id, "waiting for the store", |s| {
                !s.awaiting_signals.is_empty()
            })
            .await?;
        deliveries.push(id);
    }
    signal(&mut cluster, &deliveries[0], "store.accepted").await?;

    // The orchestrator restarts with sagas in flight; the notifier's stream breaks and it
    // resumes from its cursor.
    cluster.restart_orchestrator().await?;

    for i in 9..18 {
        ids.push(
            cluster
                .start_saga("order-placement", mixed_input(i), "")
                .await?
                .saga_id,
        );
    }
    for name in [
        "cooking.started",
        "cooking.finished",
        "rider.picked_up",
        "rider.delivered",
    ] {
        signal(&mut cluster, &deliveries[0], name).await?;
    }
    signal(&mut cluster, &deliveries[1], "store.rejected").await?;
    ids.extend(deliveries.iter().cloned());
    let mut finals = BTreeMap::new();
    for id in &ids {
        let saga = cluster.wait_terminal(id).await?;
        finals.insert(id.clone(), (status(&saga).to_owned(), saga.business_status));
    }

    // Wait until the notifier told every customer the final status.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let all = loop {
        let all = notifications
            .list_notifications(npb::ListNotificationsRequest::default())
            .await?
            .into_inner();
        let mut last: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
        for n in &all.notifications {
            last.insert(&n.saga_id, (&n.status, &n.business_status));
        }
        let caught_up = finals
            .iter()
            .all(|(id, (s, b))| last.get(id.as_str()) == Some(&(s.as_str(), b.as_str())));
        if caught_up {
            break all;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the notifier did not catch up: {:?}", all.cursor);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // The feed as the orchestrator serves it, from the start, up to the notifier's cursor.
    let mut feed = cluster
        .client
        .watch_sagas(pb::WatchSagasRequest::default())
        .await?
        .into_inner();
    let mut changes = Vec::new();
    while changes.len() < all.cursor as usize {
        let change = tokio::time::timeout(DEADLINE, feed.message())
            .await
            .context("feed stalled")??
            .context("feed ended")?;
        changes.push(change);
    }
    // Cursors are 1, 2, 3, ... and every change is one notification, in the same order.
    let cursors: Vec<u64> = changes.iter().map(|c| c.cursor).collect();
    assert_eq!(cursors, (1..=all.cursor).collect::<Vec<_>>());
    let from_feed: Vec<(u64, String, String, String)> = changes
        .iter()
        .map(|c| {
            (
                c.cursor,
                c.saga_id.clone(),
                orchestrator::cli::sagactl::status_name(c.status).to_owned(),
                c.business_status.clone(),
            )
        })
        .collect();
    let notified: Vec<(u64, String, String, String)> = all
        .notifications
        .iter()
        .map(|n| {
            (
                n.cursor,
                n.saga_id.clone(),
                n.status.clone(),
                n.business_status.clone(),
            )
        })
        .collect();
    assert_eq!(notified, from_feed, "no loss, no duplicate, same order");

    // Per saga: each notification is a change (never the same status twice in a row),
    // and the statuses are exactly those of the saga's own history.
    for id in &ids {
        let mine: Vec<&(u64, String, String, String)> =
            notified.iter().filter(|n| &n.1 == id).collect();
        for pair in mine.windows(2) {
            assert_ne!(
                (&pair[0].2, &pair[0].3),
                (&pair[1].2, &pair[1].3),
                "saga {id}: a notification repeats the previous one"
            );
        }
        let mut statuses: Vec<String> = Vec::new();
        for n in &mine {
            if statuses.last() != Some(&n.2) {
                statuses.push(n.2.clone());
            }
        }
        assert_eq!(
            statuses,
            statuses_from_history(&mut cluster, id).await?,
            "saga {id}"
        );
    }
    // The delivered order told its customer every step of the way.
    let delivered: Vec<&str> = notified
        .iter()
        .filter(|n| n.1 == deliveries[0])
        .map(|n| n.3.as_str())
        .collect();
    for expected in [
        "waiting for the store",
        "cooking",
        "on the way",
        "delivered",
    ] {
        assert!(delivered.contains(&expected), "{delivered:?}");
    }

    notifier.shutdown().await?;
    cluster.shutdown().await
}
