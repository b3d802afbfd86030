//! The sled store through its public trait.

mod common;

use saga_engine::{Event, EventKind, SagaStatus};
use saga_store::{
    Created, ListFilter, NewSaga, PutDefinition, SagaStore, SledStore, StoreError,
    StoredDefinition, Summary, page_token,
};
use serde_json::json;

fn summary(id: &str, key: &str, status: SagaStatus, last_seq: u64) -> Summary {
    Summary {
        saga_id: id.to_owned(),
        definition: if id.ends_with('b') {
            "beta".into()
        } else {
            "alpha".into()
        },
        version: 1,
        status,
        business_status: String::new(),
        idempotency_key: key.to_owned(),
        request_digest: "d".into(),
        created_at_ms: 1,
        updated_at_ms: last_seq,
        last_seq,
    }
}

fn started(id: &str) -> Event {
    Event {
        seq: 1,
        at_ms: 1,
        kind: EventKind::SagaStarted {
            saga_id: id.to_owned(),
            definition: "alpha".into(),
            version: 1,
            input: json!({"a": 1}),
            idempotency_key: "k".into(),
            trace: None,
        },
    }
}

async fn create(store: &SledStore, id: &str, key: &str) -> Created {
    store
        .create(NewSaga::started(
            summary(id, key, SagaStatus::Running, 1),
            started(id),
        ))
        .await
        .expect("create")
}

#[tokio::test]
async fn create_is_idempotent_on_the_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    assert_eq!(create(&store, "s-1", "key").await, Created::New);
    match create(&store, "s-2", "key").await {
        Created::Existing(existing) => assert_eq!(existing.saga_id, "s-1"),
        other => panic!("expected the existing saga, got {other:?}"),
    }
    assert!(
        store.summary("s-2")?.is_none(),
        "nothing is written for a repeated key"
    );
    Ok(())
}

#[tokio::test]
async fn appends_survive_reopen_and_keep_order() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let store = SledStore::open(dir.path())?;
        create(&store, "s-1", "k1").await;
        let events = vec![
            Event {
                seq: 2,
                at_ms: 2,
                kind: EventKind::CancelRequested { reason: "r".into() },
            },
            Event {
                seq: 3,
                at_ms: 3,
                kind: EventKind::SagaCompensated,
            },
        ];
        store
            .append(events, summary("s-1", "k1", SagaStatus::Compensated, 3))
            .await?;
        // A gap in the sequence is refused and changes nothing.
        let gap = vec![Event {
            seq: 9,
            at_ms: 9,
            kind: EventKind::SagaCompleted,
        }];
        let err = store
            .append(gap, summary("s-1", "k1", SagaStatus::Completed, 9))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(
            store.health().is_ok(),
            "a refused append is not a storage fault"
        );
    }
    let store = SledStore::open(dir.path())?;
    let events = store.events("s-1")?.expect("saga exists");
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(
        store.summary("s-1")?.map(|s| s.status),
        Some(SagaStatus::Compensated)
    );
    assert!(store.unfinished()?.is_empty());
    // Appending to a terminal saga is refused.
    let late = vec![Event {
        seq: 4,
        at_ms: 4,
        kind: EventKind::SagaCompleted,
    }];
    assert!(
        store
            .append(late, summary("s-1", "k1", SagaStatus::Completed, 4))
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn list_pages_newest_first_with_filters() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    for (id, key) in [
        ("s-1a", "k1"),
        ("s-2b", "k2"),
        ("s-3a", "k3"),
        ("s-4b", "k4"),
    ] {
        create(&store, id, key).await;
    }
    let done = vec![Event {
        seq: 2,
        at_ms: 2,
        kind: EventKind::SagaCompleted,
    }];
    store
        .append(done, summary("s-3a", "k3", SagaStatus::Completed, 2))
        .await?;

    let ids = |list: &[Summary]| list.iter().map(|s| s.saga_id.clone()).collect::<Vec<_>>();
    let all = ListFilter::default();
    let first = store.list(&all, None, 3)?;
    assert_eq!(ids(&first), ["s-4b", "s-3a", "s-2b"]);
    let token = page_token(first.last().expect("a full page"));
    assert_eq!(ids(&store.list(&all, Some(&token), 3)?), ["s-1a"]);
    let ids = |list: Vec<Summary>| ids(&list);
    let running = ListFilter {
        status: Some(SagaStatus::Running),
        ..ListFilter::default()
    };
    assert_eq!(
        ids(store.list(&running, None, 10)?),
        ["s-4b", "s-2b", "s-1a"]
    );
    let beta = ListFilter {
        definition: Some("beta".into()),
        ..ListFilter::default()
    };
    assert_eq!(ids(store.list(&beta, None, 10)?), ["s-4b", "s-2b"]);
    let both = ListFilter {
        status: Some(SagaStatus::Completed),
        definition: Some("beta".into()),
        ..ListFilter::default()
    };
    assert!(store.list(&both, None, 10)?.is_empty());
    let both = ListFilter {
        status: Some(SagaStatus::Completed),
        definition: Some("alpha".into()),
        ..ListFilter::default()
    };
    assert_eq!(ids(store.list(&both, None, 10)?), ["s-3a"]);
    assert_eq!(ids(store.unfinished()?), ["s-1a", "s-2b", "s-4b"]);
    Ok(())
}

#[tokio::test]
async fn definitions_are_immutable_per_version() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    let def = |yaml: &str, descriptor: &[u8]| StoredDefinition {
        name: "alpha".into(),
        version: 1,
        yaml: yaml.into(),
        descriptors: [
            ("payment".to_owned(), descriptor.to_vec()),
            ("rider".to_owned(), vec![9]),
        ]
        .into(),
    };
    assert_eq!(
        store.put_definition(def("a: 1", &[1, 2])).await?,
        PutDefinition::Created
    );
    // The same text again keeps the descriptors the version was first compiled against.
    assert_eq!(
        store.put_definition(def("a: 1", &[7, 7])).await?,
        PutDefinition::Unchanged
    );
    assert_eq!(
        store.put_definition(def("a: 2", &[1, 2])).await?,
        PutDefinition::Conflict {
            existing: "a: 1".into()
        }
    );
    assert_eq!(store.definitions()?, [def("a: 1", &[1, 2])]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_flushes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    let before = store.stats();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("s-{i:04}");
            store
                .create(NewSaga::started(
                    summary(&id, &id, SagaStatus::Running, 1),
                    started(&id),
                ))
                .await
        }));
    }
    for task in tasks {
        assert_eq!(task.await??, Created::New);
    }
    let stats = store.stats();
    let flushes = stats.flushes - before.flushes;
    assert_eq!(stats.writes - before.writes, 200);
    assert!(
        flushes < 200,
        "200 concurrent creates took {flushes} flushes: no group commit"
    );
    Ok(())
}

/// Writes queued together share one transaction, but each is judged alone: a refused
/// append or an existing key does not fail the writes around it. A create may carry
/// several events, with a change for each move of (status, business status).
#[tokio::test]
async fn writes_of_one_batch_are_judged_each_alone() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    create(&store, "s-1", "k1").await;
    let after_first = store.changes(0, 100)?.len() as u64;
    // Queued without awaiting, so that the writer finds them together.
    let mut two = summary("s-2", "k2", SagaStatus::Running, 2);
    two.business_status = "paying".into();
    let intent = Event {
        seq: 2,
        at_ms: 2,
        kind: EventKind::StepStarted {
            step: "pay".into(),
            phase: saga_engine::Phase::Action,
            attempt: 1,
        },
    };
    let new = store.create(NewSaga {
        summary: two,
        events: vec![started("s-2"), intent],
        statuses: vec![
            (SagaStatus::Running, String::new()),
            (SagaStatus::Running, "paying".into()),
        ],
    });
    let gap = store.append(
        vec![Event {
            seq: 7,
            at_ms: 7,
            kind: EventKind::SagaCompleted,
        }],
        summary("s-1", "k1", SagaStatus::Completed, 7),
    );
    let missing = store.append(
        vec![Event {
            seq: 2,
            at_ms: 2,
            kind: EventKind::SagaCompleted,
        }],
        summary("s-9", "k9", SagaStatus::Completed, 2),
    );
    let again = store.create(NewSaga::started(
        summary("s-3", "k1", SagaStatus::Running, 1),
        started("s-3"),
    ));
    let done = store.append(
        vec![Event {
            seq: 2,
            at_ms: 2,
            kind: EventKind::SagaCompleted,
        }],
        summary("s-1", "k1", SagaStatus::Completed, 2),
    );
    assert_eq!(new.await?, Created::New);
    assert!(matches!(gap.await, Err(StoreError::Corrupt { .. })));
    assert!(matches!(missing.await, Err(StoreError::Corrupt { .. })));
    assert!(matches!(again.await?, Created::Existing(s) if s.saga_id == "s-1"));
    done.await?;
    assert!(store.health().is_ok());
    assert_eq!(
        store.events("s-2")?.map(|e| e.len()),
        Some(2),
        "both events of the create are stored"
    );
    assert_eq!(
        store.summary("s-3")?,
        None,
        "an existing key creates nothing"
    );
    assert_eq!(store.events("s-9")?, None);
    let changes = store.changes(after_first, 100)?;
    let seen: Vec<(String, u64, String)> = changes
        .iter()
        .map(|c| (c.saga_id.clone(), c.seq, c.business_status.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            ("s-2".to_owned(), 1, String::new()),
            ("s-2".to_owned(), 2, "paying".to_owned()),
            ("s-1".to_owned(), 2, String::new()),
        ]
    );
    let cursors: Vec<u64> = changes.iter().map(|c| c.cursor).collect();
    assert_eq!(cursors, [after_first + 1, after_first + 2, after_first + 3]);
    Ok(())
}

#[tokio::test]
async fn a_failed_flush_stops_every_later_write() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    create(&store, "s-1", "k1").await;
    *store
        .fault_injection()
        .fail_next_flush
        .lock()
        .expect("lock") = Some("disk on fire".into());
    let err = store
        .create(NewSaga::started(
            summary("s-2", "k2", SagaStatus::Running, 1),
            started("s-2"),
        ))
        .await
        .unwrap_err();
    assert_eq!(err, StoreError::Fault("flush failed: disk on fire".into()));
    assert!(store.health().is_err());
    // The store refuses writes from now on, even though the next flush would work.
    let again = store
        .create(NewSaga::started(
            summary("s-3", "k3", SagaStatus::Running, 1),
            started("s-3"),
        ))
        .await;
    assert!(matches!(again, Err(StoreError::Fault(_))));
    Ok(())
}

#[tokio::test]
async fn a_second_opener_is_refused_with_a_clear_message() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let _first = SledStore::open(dir.path())?;
    let second = SledStore::open(dir.path()).unwrap_err();
    assert!(matches!(second, StoreError::InUse(_)), "{second:?}");
    assert!(
        second.to_string().contains("is in use by another process"),
        "{second}"
    );
    Ok(())
}

#[tokio::test]
async fn a_newer_format_is_refused_not_misread() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    drop(SledStore::open(dir.path())?);
    {
        let db = sled::open(dir.path())?;
        db.open_tree("meta")?
            .insert("format_version", &99u32.to_be_bytes())?;
        db.flush()?;
    }
    let err = SledStore::open(dir.path()).unwrap_err();
    assert_eq!(
        err,
        StoreError::NewerFormat {
            dir: dir.path().display().to_string(),
            found: 99,
            supported: saga_store::sled_store::FORMAT_VERSION
        }
    );
    assert!(err.to_string().contains("refusing to misread it"), "{err}");
    Ok(())
}

/// Format 1's status index key: `status(u8) saga_id`.
fn format_1_status_key(status: SagaStatus, saga_id: &str) -> Vec<u8> {
    let byte = match status {
        SagaStatus::Running => 1,
        SagaStatus::Waiting => 2,
        SagaStatus::Compensating => 3,
        SagaStatus::Completed => 4,
        SagaStatus::Compensated => 5,
        SagaStatus::Failed => 6,
    };
    let mut key = vec![byte];
    key.extend_from_slice(saga_id.as_bytes());
    key
}

#[tokio::test]
async fn a_format_1_directory_is_upgraded_on_open() -> anyhow::Result<()> {
    // With the format key, and from before the key existed.
    for format_1_key in [true, false] {
        let dir = tempfile::tempdir()?;
        let mut records = Vec::new();
        {
            let store = SledStore::open(dir.path())?;
            for i in 0..12u64 {
                let definition = if i % 2 == 0 { "alpha" } else { "beta" };
                let created = common::BASE_MS + (i * 5) % 12;
                let s = common::summary(&format!("m-{i:02}"), definition, created);
                store.create(common::new_saga(&s)).await?;
                let s = match i % 3 {
                    0 => s,
                    1 => {
                        let (events, next) = common::step(&s, SagaStatus::Completed, "done");
                        store.append(events, next.clone()).await?;
                        next
                    }
                    _ => {
                        let (events, next) = common::step(&s, SagaStatus::Waiting, "waiting");
                        store.append(events, next.clone()).await?;
                        next
                    }
                };
                records.push(s);
            }
        }
        // Leave the directory as format 1 left it: its two indexes in their old layout,
        // none of the new trees, summaries without a business status.
        {
            let db = sled::open(dir.path())?;
            for tree in ["by_created", "by_status_definition", "changes"] {
                db.drop_tree(tree)?;
            }
            let by_status = db.open_tree("by_status")?;
            let by_definition = db.open_tree("by_definition")?;
            by_status.clear()?;
            by_definition.clear()?;
            let sagas = db.open_tree("sagas")?;
            for s in &records {
                by_status.insert(format_1_status_key(s.status, &s.saga_id), &[])?;
                let mut key = s.definition.as_bytes().to_vec();
                key.push(0);
                key.extend_from_slice(s.saga_id.as_bytes());
                by_definition.insert(key, &[])?;
                let mut json = serde_json::to_value(s)?;
                json.as_object_mut()
                    .and_then(|o| o.remove("business_status"))
                    .expect("a business status to remove");
                sagas.insert(s.saga_id.as_bytes(), serde_json::to_vec(&json)?)?;
            }
            let meta = db.open_tree("meta")?;
            if format_1_key {
                meta.insert("format_version", &1u32.to_be_bytes())?;
            } else {
                meta.remove("format_version")?;
            }
            db.flush()?;
        }
        for s in &mut records {
            s.business_status = String::new();
        }

        let store = SledStore::open(dir.path())?;
        // Every combination of filters finds exactly its sagas, newest first.
        let statuses = [
            None,
            Some(SagaStatus::Running),
            Some(SagaStatus::Waiting),
            Some(SagaStatus::Completed),
        ];
        for status in statuses {
            for definition in [None, Some("alpha"), Some("beta")] {
                for (from, to) in [(None, None), (Some(3), Some(9))] {
                    let filter = ListFilter {
                        status,
                        definition: definition.map(str::to_owned),
                        created_from_ms: from.map(|f| common::BASE_MS + f),
                        created_to_ms: to.map(|t| common::BASE_MS + t),
                    };
                    let mut want: Vec<&Summary> = records
                        .iter()
                        .filter(|s| {
                            status.is_none_or(|st| st == s.status)
                                && definition.is_none_or(|d| d == s.definition)
                                && filter.created_from_ms.is_none_or(|f| s.created_at_ms >= f)
                                && filter.created_to_ms.is_none_or(|t| s.created_at_ms < t)
                        })
                        .collect();
                    want.sort_by(|a, b| {
                        (b.created_at_ms, &b.saga_id).cmp(&(a.created_at_ms, &a.saga_id))
                    });
                    let want: Vec<Summary> = want.into_iter().cloned().collect();
                    assert_eq!(store.list(&filter, None, 100)?, want, "{filter:?}");
                }
            }
        }
        let mut indexed = store.status_index()?;
        indexed.sort_by(|a, b| a.1.cmp(&b.1));
        let summaries: Vec<(SagaStatus, String)> = store
            .summaries()?
            .into_iter()
            .map(|s| (s.status, s.saga_id))
            .collect();
        assert_eq!(indexed, summaries);
        assert_eq!(store.unfinished()?.len(), 8);
        // The feed starts with the first change after the upgrade.
        assert!(store.changes(0, 10)?.is_empty());
        let (events, next) = common::step(&records[0], SagaStatus::Completed, "done");
        store.append(events, next).await?;
        assert_eq!(
            store
                .changes(0, 10)?
                .iter()
                .map(|c| c.cursor)
                .collect::<Vec<_>>(),
            [1]
        );
        drop(store);
        let db = sled::open(dir.path())?;
        assert_eq!(
            db.open_tree("meta")?
                .get("format_version")?
                .map(|v| v.to_vec()),
            Some(2u32.to_be_bytes().to_vec()),
            "the upgrade is recorded"
        );
    }
    Ok(())
}
