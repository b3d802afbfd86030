//! The feed of status changes: numbered without gaps, durable, resumable.

mod common;

use std::time::Duration;

use common::{BASE_MS, new_saga, step, summary};
use saga_engine::SagaStatus;
use saga_store::{Change, Created, SagaStore, SledStore, StoreError, Summary};

/// A bound on waits for something that should already have happened; never reached when
/// the test passes.
const GUARD: Duration = Duration::from_secs(10);

fn change(cursor: u64, s: &Summary) -> Change {
    Change {
        cursor,
        saga_id: s.saga_id.clone(),
        definition: s.definition.clone(),
        version: s.version,
        status: s.status,
        business_status: s.business_status.clone(),
        seq: s.last_seq,
        at_ms: s.updated_at_ms,
    }
}

fn cursors(changes: &[Change]) -> Vec<u64> {
    changes.iter().map(|c| c.cursor).collect()
}

#[tokio::test]
async fn one_change_per_create_and_per_status_or_business_status_change() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    let mut watch = store.watch_changes();
    assert_eq!(*watch.borrow_and_update(), 0, "an empty feed");
    assert!(store.changes(0, 10)?.is_empty());

    let a = summary("s-a", "pizza", BASE_MS);
    let b = summary("s-b", "sushi", BASE_MS + 1);
    store.create(new_saga(&a)).await?;
    store.create(new_saga(&b)).await?;
    assert!(watch.has_changed()?, "the flush of new changes notifies");
    assert_eq!(*watch.borrow_and_update(), 2);

    // An idempotent create writes nothing, so no change and no notification.
    let again = summary("s-a2", "pizza", BASE_MS + 2);
    let again = Summary {
        idempotency_key: a.idempotency_key.clone(),
        ..again
    };
    assert!(matches!(
        store.create(new_saga(&again)).await?,
        Created::Existing(_)
    ));
    // An event that changes neither status nor business status: no change.
    let (events, a1) = step(&a, SagaStatus::Running, "placed");
    store.append(events, a1.clone()).await?;
    assert!(!watch.has_changed()?, "no new change, no notification");
    // A business status change alone is a change.
    let (events, a2) = step(&a1, SagaStatus::Running, "cooking");
    store.append(events, a2.clone()).await?;
    // So is a status change alone.
    let (events, b1) = step(&b, SagaStatus::Waiting, "placed");
    store.append(events, b1.clone()).await?;
    // A refused append takes no cursor.
    let (mut events, gap) = step(&b1, SagaStatus::Completed, "delivered");
    events[0].seq += 5;
    let refused = store.append(events, gap).await.unwrap_err();
    assert!(matches!(refused, StoreError::Corrupt { .. }), "{refused}");
    let (events, a3) = step(&a2, SagaStatus::Completed, "delivered");
    store.append(events, a3.clone()).await?;

    let all = store.changes(0, 100)?;
    assert_eq!(
        all,
        [
            change(1, &a),
            change(2, &b),
            change(3, &a2),
            change(4, &b1),
            change(5, &a3),
        ]
    );
    assert_eq!(all[2].seq, 3, "the seq of the event that made the change");
    assert!(watch.has_changed()?);
    assert_eq!(*watch.borrow_and_update(), 5);

    // Paging.
    assert_eq!(cursors(&store.changes(0, 2)?), [1, 2]);
    assert_eq!(cursors(&store.changes(2, 2)?), [3, 4]);
    assert_eq!(cursors(&store.changes(4, 2)?), [5]);
    assert!(store.changes(5, 2)?.is_empty());
    assert!(store.changes(99, 2)?.is_empty());
    assert!(store.changes(0, 0)?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_waiting_watcher_is_woken_by_the_flush() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    let mut watch = store.watch_changes();
    let reader = store.clone();
    let waiter = tokio::spawn(async move {
        watch.changed().await?;
        let cursor = *watch.borrow_and_update();
        // Whatever the watch says is durable can be read.
        let changes = reader.changes(0, 10)?;
        anyhow::Ok((cursor, changes))
    });
    let a = summary("s-a", "pizza", BASE_MS);
    store.create(new_saga(&a)).await?;
    let (cursor, changes) = tokio::time::timeout(GUARD, waiter).await???;
    assert_eq!(cursor, 1);
    assert_eq!(changes, [change(1, &a)]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_number_the_feed_without_gaps() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    let sagas: Vec<Summary> = (0..300)
        .map(|i| summary(&format!("s-{i:03}"), "pizza", BASE_MS + i))
        .collect();
    let creates: Vec<_> = sagas.iter().map(|s| store.create(new_saga(s))).collect();
    for create in creates {
        create.await?;
    }
    // Queued together, so they share batches: changes, non-changes and refusals mixed.
    let mut appends = Vec::new();
    let mut expected_changes = sagas.len();
    for (i, s) in sagas.iter().enumerate() {
        let (mut events, next) = match i % 3 {
            0 => step(s, SagaStatus::Completed, "delivered"),
            1 => step(s, SagaStatus::Running, "placed"),
            _ => step(s, SagaStatus::Running, "cooking"),
        };
        let refused = i % 5 == 0;
        if refused {
            events[0].seq = 7;
        } else if i % 3 != 1 {
            expected_changes += 1;
        }
        appends.push((refused, store.append(events, next)));
    }
    for (refused, append) in appends {
        assert_eq!(append.await.is_err(), refused);
    }
    let feed = store.changes(0, usize::MAX)?;
    assert_eq!(
        cursors(&feed),
        (1..=expected_changes as u64).collect::<Vec<_>>()
    );
    assert_eq!(*store.watch_changes().borrow(), expected_changes as u64);
    Ok(())
}

#[tokio::test]
async fn the_feed_continues_after_a_reopen_with_nothing_lost_or_repeated() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = summary("s-a", "pizza", BASE_MS);
    let (events_a1, a1) = step(&a, SagaStatus::Waiting, "waiting for the store");
    let before = {
        let store = SledStore::open(dir.path())?;
        store.create(new_saga(&a)).await?;
        store.append(events_a1, a1.clone()).await?;
        store.changes(0, 100)?
    };
    assert_eq!(before, [change(1, &a), change(2, &a1)]);

    let store = SledStore::open(dir.path())?;
    assert_eq!(store.changes(0, 100)?, before, "nothing lost");
    assert_eq!(*store.watch_changes().borrow(), 2);
    let b = summary("s-b", "sushi", BASE_MS + 1);
    store.create(new_saga(&b)).await?;
    let (events, a2) = step(&a1, SagaStatus::Completed, "delivered");
    store.append(events, a2.clone()).await?;
    assert_eq!(
        store.changes(0, 100)?,
        [change(1, &a), change(2, &a1), change(3, &b), change(4, &a2)],
        "the next cursors follow on, nothing repeated"
    );
    drop(store);
    let store = SledStore::open(dir.path())?;
    assert_eq!(cursors(&store.changes(1, 100)?), [2, 3, 4]);
    Ok(())
}

#[tokio::test]
async fn changes_of_a_batch_that_failed_to_flush_are_not_returned() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    let a = summary("s-a", "pizza", BASE_MS);
    store.create(new_saga(&a)).await?;
    *store
        .fault_injection()
        .fail_next_flush
        .lock()
        .expect("lock") = Some("disk on fire".into());
    let mut watch = store.watch_changes();
    let b = summary("s-b", "pizza", BASE_MS + 1);
    assert!(store.create(new_saga(&b)).await.is_err());
    // The change was written to sled but never flushed: it is not in the feed.
    assert_eq!(store.changes(0, 100)?, [change(1, &a)]);
    assert!(!watch.has_changed()?);
    assert_eq!(*watch.borrow_and_update(), 1);
    Ok(())
}

#[tokio::test]
async fn an_append_of_several_events_reports_every_status_in_between() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    let a = summary("s-a", "pizza", BASE_MS);
    store.create(new_saga(&a)).await?;
    // Three events in one append: WAITING after the first, RUNNING after the second (a
    // status that lasted only between two events of the write), RUNNING again after the
    // third with the same business status: two changes, not one and not three.
    let (mut events, _) = step(&a, SagaStatus::Waiting, "w");
    let (more, _) = step(&a, SagaStatus::Running, "r");
    let (last, after) = step(&a, SagaStatus::Running, "r");
    for (i, mut event) in more.into_iter().chain(last).enumerate() {
        event.seq = a.last_seq + 2 + i as u64;
        events.push(event);
    }
    let summary = Summary {
        last_seq: a.last_seq + 3,
        status: SagaStatus::Running,
        business_status: "r".into(),
        ..after
    };
    store
        .append_with_statuses(saga_store::Appended {
            events: events.clone(),
            summary,
            statuses: vec![
                (SagaStatus::Waiting, "w".into()),
                (SagaStatus::Running, "r".into()),
                (SagaStatus::Running, "r".into()),
            ],
        })
        .await?;
    let feed = store.changes(1, 10)?;
    let seen: Vec<(u64, SagaStatus, &str, u64)> = feed
        .iter()
        .map(|c| (c.cursor, c.status, c.business_status.as_str(), c.seq))
        .collect();
    assert_eq!(
        seen,
        [
            (2, SagaStatus::Waiting, "w", events[0].seq),
            (3, SagaStatus::Running, "r", events[1].seq)
        ]
    );
    Ok(())
}
