//! The sled store through its public trait.

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
        },
    }
}

async fn create(store: &SledStore, id: &str, key: &str) -> Created {
    store
        .create(NewSaga {
            summary: summary(id, key, SagaStatus::Running, 1),
            first_event: started(id),
        })
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
                .create(NewSaga {
                    summary: summary(&id, &id, SagaStatus::Running, 1),
                    first_event: started(&id),
                })
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
        .create(NewSaga {
            summary: summary("s-2", "k2", SagaStatus::Running, 1),
            first_event: started("s-2"),
        })
        .await
        .unwrap_err();
    assert_eq!(err, StoreError::Fault("flush failed: disk on fire".into()));
    assert!(store.health().is_err());
    // The store refuses writes from now on, even though the next flush would work.
    let again = store
        .create(NewSaga {
            summary: summary("s-3", "k3", SagaStatus::Running, 1),
            first_event: started("s-3"),
        })
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
