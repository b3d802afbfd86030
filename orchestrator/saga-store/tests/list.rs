//! Filtered, paged lists served from the indexes, and the page token.

mod common;

use std::time::Instant;

use common::{BASE_MS, new_saga, step, summary};
use saga_engine::SagaStatus;
use saga_store::{Created, ListFilter, SagaStore, SledStore, StoreError, Summary, page_token};

const SAGAS: usize = 10_000;
const PAGE: usize = 20;
const DEFINITIONS: [&str; 4] = ["pizza", "sushi", "tacos", "pizza-deluxe"];

/// The brute-force answer: every record the filter admits, newest first.
fn expected(records: &[Summary], filter: &ListFilter) -> Vec<String> {
    let mut matching: Vec<&Summary> = records
        .iter()
        .filter(|s| {
            filter.status.is_none_or(|st| st == s.status)
                && filter
                    .definition
                    .as_ref()
                    .is_none_or(|d| *d == s.definition)
                && filter.created_from_ms.is_none_or(|f| s.created_at_ms >= f)
                && filter.created_to_ms.is_none_or(|t| s.created_at_ms < t)
        })
        .collect();
    matching.sort_by(|a, b| (b.created_at_ms, &b.saga_id).cmp(&(a.created_at_ms, &a.saga_id)));
    matching.into_iter().map(|s| s.saga_id.clone()).collect()
}

fn ids(page: &[Summary]) -> Vec<String> {
    page.iter().map(|s| s.saga_id.clone()).collect()
}

/// One page, checking that it read no more than it returns (plus one index entry).
fn page(
    store: &SledStore,
    filter: &ListFilter,
    after: Option<&str>,
) -> anyhow::Result<Vec<Summary>> {
    let before = store.stats();
    let page = store.list(filter, after, PAGE)?;
    let after_stats = store.stats();
    let read = after_stats.summaries_read - before.summaries_read;
    let scanned = after_stats.index_entries_scanned - before.index_entries_scanned;
    assert!(
        read <= PAGE as u64,
        "{filter:?}: a page of {PAGE} read {read} summaries"
    );
    assert!(
        scanned <= PAGE as u64 + 1,
        "{filter:?}: a page of {PAGE} scanned {scanned} index entries"
    );
    Ok(page)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_page_of_10_000_sagas_reads_only_the_page() -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;

    // Creation times spread over 50 s, two sagas per millisecond value on average (ties are
    // ordered by saga id), and not in the order of the ids.
    let mut records: Vec<Summary> = (0..SAGAS)
        .map(|i| {
            let created = BASE_MS + (i as u64 * 7_919) % 5_000 * 10;
            summary(
                &format!("saga-{i:05}"),
                DEFINITIONS[i % DEFINITIONS.len()],
                created,
            )
        })
        .collect();
    // Every create is queued before any is awaited, so they share flushes.
    let creates: Vec<_> = records.iter().map(|s| store.create(new_saga(s))).collect();
    for create in creates {
        assert_eq!(create.await?, Created::New);
    }
    // Three sagas in seven move on; the rest stay running.
    let advanced = |i: usize| match i % 7 {
        1 => Some((SagaStatus::Completed, "delivered")),
        2 => Some((SagaStatus::Compensated, "cancelled")),
        3 => Some((SagaStatus::Waiting, "waiting for the store")),
        _ => None,
    };
    let mut appends = Vec::new();
    for (i, record) in records.iter_mut().enumerate() {
        if let Some((status, business)) = advanced(i) {
            let (events, next) = step(record, status, business);
            appends.push(store.append(events, next.clone()));
            *record = next;
        }
    }
    for append in appends {
        append.await?;
    }
    let flushes = store.stats().flushes;
    assert!(
        flushes < 100,
        "{flushes} flushes: the writes were not batched"
    );

    let filters = [
        ListFilter::default(),
        ListFilter {
            status: Some(SagaStatus::Waiting),
            ..ListFilter::default()
        },
        ListFilter {
            definition: Some("pizza".into()),
            ..ListFilter::default()
        },
        ListFilter {
            status: Some(SagaStatus::Completed),
            definition: Some("sushi".into()),
            ..ListFilter::default()
        },
        ListFilter {
            status: Some(SagaStatus::Running),
            definition: Some("pizza".into()),
            created_from_ms: Some(BASE_MS + 12_340),
            created_to_ms: Some(BASE_MS + 30_000),
        },
        ListFilter {
            created_from_ms: Some(BASE_MS + 20_000),
            created_to_ms: Some(BASE_MS + 20_500),
            ..ListFilter::default()
        },
        ListFilter {
            created_to_ms: Some(BASE_MS + 1_000),
            ..ListFilter::default()
        },
        ListFilter {
            status: Some(SagaStatus::Compensated),
            created_from_ms: Some(BASE_MS + 48_000),
            ..ListFilter::default()
        },
        ListFilter {
            definition: Some("tacos".into()),
            created_from_ms: Some(BASE_MS + 10_000),
            ..ListFilter::default()
        },
    ];
    for filter in &filters {
        let want = expected(&records, filter);
        assert!(
            want.len() > PAGE,
            "{filter:?} matches only {}: a weak case",
            want.len()
        );
        // Every page, to the end: exactly the brute-force answer, each page cheap.
        let mut got = Vec::new();
        let mut token = None;
        loop {
            let page = page(&store, filter, token.as_deref())?;
            got.extend(ids(&page));
            if page.len() < PAGE {
                break;
            }
            token = page.last().map(page_token);
        }
        assert_eq!(got.len(), want.len(), "{filter:?}");
        assert!(
            got == want,
            "{filter:?}: the pages differ from the brute force"
        );
    }

    // Filters that match nothing read nothing.
    let nothing = [
        ListFilter {
            definition: Some("pizz".into()),
            ..ListFilter::default()
        },
        ListFilter {
            status: Some(SagaStatus::Failed),
            ..ListFilter::default()
        },
        ListFilter {
            created_from_ms: Some(BASE_MS + 30_000),
            created_to_ms: Some(BASE_MS + 20_000),
            ..ListFilter::default()
        },
        ListFilter {
            created_from_ms: Some(BASE_MS + 60_000),
            ..ListFilter::default()
        },
    ];
    for filter in &nothing {
        let before = store.stats();
        assert!(store.list(filter, None, PAGE)?.is_empty(), "{filter:?}");
        let stats = store.stats();
        assert_eq!(stats.summaries_read, before.summaries_read, "{filter:?}");
        assert_eq!(
            stats.index_entries_scanned, before.index_entries_scanned,
            "{filter:?}"
        );
    }

    // Every saga is in the status index once, under its summary's status.
    let mut indexed = store.status_index()?;
    indexed.sort_by(|a, b| a.1.cmp(&b.1));
    let mut summaries: Vec<(SagaStatus, String)> = records
        .iter()
        .map(|s| (s.status, s.saga_id.clone()))
        .collect();
    summaries.sort_by(|a, b| a.1.cmp(&b.1));
    assert!(
        indexed == summaries,
        "the status index differs from the summaries"
    );
    let unfinished = store.unfinished()?;
    assert_eq!(
        unfinished.len(),
        records.iter().filter(|s| !s.status.is_terminal()).count()
    );

    eprintln!(
        "10,000 sagas: {flushes} flushes, test took {:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn pages_follow_the_time_bounds_at_their_edges() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    // Two sagas at each of three times; the ids run against the times.
    let records = [
        summary("s-6", "pizza", BASE_MS + 10),
        summary("s-5", "pizza", BASE_MS + 10),
        summary("s-4", "pizza", BASE_MS + 20),
        summary("s-3", "pizza", BASE_MS + 20),
        summary("s-2", "pizza", BASE_MS + 30),
        summary("s-1", "pizza", BASE_MS + 30),
    ];
    for record in &records {
        store.create(new_saga(record)).await?;
    }
    let list = |from: Option<u64>, to: Option<u64>, after: Option<&str>, limit| {
        let filter = ListFilter {
            created_from_ms: from.map(|f| BASE_MS + f),
            created_to_ms: to.map(|t| BASE_MS + t),
            ..ListFilter::default()
        };
        store.list(&filter, after, limit).map(|page| ids(&page))
    };
    assert_eq!(
        list(None, None, None, 10)?,
        ["s-2", "s-1", "s-4", "s-3", "s-6", "s-5"]
    );
    // From is inclusive, to is exclusive.
    assert_eq!(list(Some(20), Some(30), None, 10)?, ["s-4", "s-3"]);
    assert_eq!(
        list(Some(20), None, None, 10)?,
        ["s-2", "s-1", "s-4", "s-3"]
    );
    assert_eq!(list(None, Some(20), None, 10)?, ["s-6", "s-5"]);
    assert!(list(Some(20), Some(20), None, 10)?.is_empty());
    // A page may end between two sagas of the same millisecond.
    let first = store.list(&ListFilter::default(), None, 3)?;
    assert_eq!(ids(&first), ["s-2", "s-1", "s-4"]);
    let token = page_token(first.last().expect("a full page"));
    assert_eq!(list(None, None, Some(&token), 2)?, ["s-3", "s-6"]);
    // A token from another filter's page still means "after this saga".
    assert_eq!(list(Some(20), None, Some(&token), 10)?, ["s-3"]);
    assert!(list(None, None, Some(&token), 0)?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_page_token_that_does_not_parse_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    store
        .create(new_saga(&summary("s-1", "pizza", BASE_MS)))
        .await?;
    let filter = ListFilter::default();
    for token in [
        "",
        "s-1",
        "12",
        "12.",
        ".s-1",
        "x12.s-1",
        "-12.s-1",
        "+12.s-1",
        "1e3.s-1",
        "99999999999999999999999.s-1",
    ] {
        let err = store.list(&filter, Some(token), 10).unwrap_err();
        assert_eq!(err, StoreError::InvalidToken(token.to_owned()));
        let message = err.to_string();
        assert!(
            message.contains(&format!("{token:?}"))
                && message.contains("not a page token from this API"),
            "{message}"
        );
    }
    // The store's own tokens parse, even for saga ids with dots in them.
    let dotted = summary("s.2.b", "pizza", BASE_MS + 1);
    store.create(new_saga(&dotted)).await?;
    let token = page_token(&dotted);
    assert_eq!(token, format!("{}.s.2.b", BASE_MS + 1));
    assert_eq!(ids(&store.list(&filter, Some(&token), 10)?), ["s-1"]);
    Ok(())
}
