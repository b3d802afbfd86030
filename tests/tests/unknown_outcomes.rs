//! Calls whose outcome is unknown (the effect was applied, the reply lost) are retried with
//! the same idempotency key, and a step that never got a reply is compensated as attempted.

use participants::Kind;
use serde_json::json;
use tests::{Cluster, effects_of, order_input, status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_is_retried_with_the_same_key_and_applied_once() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    cluster
        .participant(Kind::Store)
        .faults
        .lose_replies("SubmitOrder", 1);
    let saga = cluster
        .run("order-placement", order_input("o-lost-once", json!({})))
        .await?;
    assert_eq!(status(&saga), "COMPLETED", "{saga:?}");
    assert_eq!(saga.steps[1].attempts, 2);
    assert_eq!(
        cluster.participant(Kind::Store).faults.calls("SubmitOrder"),
        2
    );
    let store = cluster.ledger(Kind::Store).await?;
    assert_eq!(
        effects_of(&store, &saga.saga_id),
        [("submit".to_owned(), false)]
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_never_got_a_reply_is_compensated_as_attempted() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    // Every attempt applies the effect (once, by key) and loses the reply.
    cluster
        .participant(Kind::Store)
        .faults
        .lose_replies("SubmitOrder", 100);
    let saga = cluster
        .run("order-placement", order_input("o-lost-all", json!({})))
        .await?;
    assert_eq!(status(&saga), "COMPENSATED", "{saga:?}");
    assert_eq!(saga.steps[1].attempts, 5, "the definition's max_attempts");
    let id = &saga.saga_id;
    // The store did apply the order; the compensation found it and undid it.
    let store = cluster.ledger(Kind::Store).await?;
    assert_eq!(
        effects_of(&store, id),
        [("submit".to_owned(), false), ("cancel".to_owned(), false)]
    );
    let payment = cluster.ledger(Kind::Payment).await?;
    assert_eq!(
        effects_of(&payment, id),
        [("authorize".to_owned(), false), ("void".to_owned(), false)]
    );
    assert_eq!(
        cluster
            .participant(Kind::Rider)
            .faults
            .calls("RequestDelivery"),
        0
    );
    cluster.shutdown().await
}
