//! Filling an orchestrator's data directory with finished sagas, for the `history-1m`
//! scenario, without running them: one order-placement saga is run through the engine (the
//! same events, summaries and statuses the runtime would store), and its log is written
//! again for every saga with a fresh id, order id and times, through `SledStore`'s own
//! writes (create, then one append), so the store is exactly as the orchestrator leaves it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use prost_reflect::DescriptorPool;
use saga_engine::definition::{compile, parse};
use saga_engine::{Event, EventKind, Next, Plan, Saga, SagaStatus};
use saga_store::{Appended, Created, NewSaga, SagaStore, SledStore, Summary};
use serde_json::{Value, json};

use crate::load::order_input;

/// The order-placement plan, compiled against the participants' descriptors (as the
/// orchestrator numbers a definition's first version: 1).
pub fn order_placement(sagas_dir: &Path) -> anyhow::Result<Plan> {
    let file = sagas_dir.join("order-placement.yaml");
    let yaml = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET)
        .context("cannot decode the participants' descriptors")?;
    let pools: BTreeMap<String, DescriptorPool> = ["payment", "store", "rider"]
        .into_iter()
        .map(|p| (p.to_owned(), pool.clone()))
        .collect();
    let name = file.display().to_string();
    let raw = parse(&name, &yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut plan = compile(&name, &yaml, &raw, &pools).map_err(|e| anyhow::anyhow!("{e}"))?;
    if plan.version == 0 {
        plan.version = 1;
    }
    Ok(plan)
}

/// One saga run to completion through the engine, every call answered as the sample
/// participants answer it: its events and the (status, business status) after each.
pub struct Finished {
    pub events: Vec<Event>,
    pub statuses: Vec<(SagaStatus, String)>,
}

/// Runs a saga of `plan` through the state machine, every call succeeding with `output`.
pub fn run_to_end(
    plan: &Plan,
    saga_id: &str,
    input: Value,
    output: &Value,
) -> anyhow::Result<Finished> {
    let first = Saga::start_event(plan, saga_id, input, saga_id, 1_000);
    let mut saga = Saga::from_events(plan, [&first])?;
    let mut finished = Finished {
        statuses: vec![(saga.status(), saga.business_status(plan))],
        events: vec![first],
    };
    let mut now = 1_000;
    // Bounded: a 3-step saga has 8 events.
    for _ in 0..1_000 {
        now += 1;
        let event = match saga.next(plan, now) {
            Next::Record(event) => event,
            Next::Done => return Ok(finished),
            Next::Wait(wait) => {
                let Some(call) = wait.calls.first() else {
                    bail!("the saga waits for something other than a call");
                };
                saga.on_result(plan, call, Ok(output.clone()), now, 0.5)?
            }
        };
        saga.apply(plan, &event)?;
        finished.events.push(event);
        finished
            .statuses
            .push((saga.status(), saga.business_status(plan)));
    }
    bail!("the saga did not finish")
}

/// Writes `count` finished order-placement sagas into the store at `data` (created if
/// missing; the orchestrator must not be running on it). Returns the cursor of the last
/// change written, where a change-feed reader that wants only new changes starts.
pub async fn prefill(data: &Path, sagas_dir: &Path, count: usize) -> anyhow::Result<u64> {
    /// Sagas submitted before their writes are awaited (the writer batches them).
    const WINDOW: usize = 4_096;
    let plan = order_placement(sagas_dir)?;
    let output =
        json!({"authorization_id": "auth-1", "store_order_id": "so-1", "delivery_id": "d-1"});
    let template = run_to_end(&plan, "template", order_input("template", false), &output)?;
    std::fs::create_dir_all(data)?;
    let store = SledStore::open(data)?;
    // Creation times spread over the past, one saga per millisecond, ending now.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let first_ms = now_ms.saturating_sub(count as u64 + 60_000);
    let started = Instant::now();
    let mut creates = Vec::with_capacity(WINDOW);
    let mut appends = Vec::with_capacity(WINDOW);
    for i in 0..count {
        let saga_id = uuid::Uuid::now_v7().to_string();
        let created = first_ms + i as u64;
        let events: Vec<Event> = template
            .events
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.at_ms = created + (e.seq - 1) * 2;
                if let EventKind::SagaStarted {
                    saga_id: id,
                    idempotency_key,
                    input,
                    ..
                } = &mut e.kind
                {
                    id.clone_from(&saga_id);
                    idempotency_key.clone_from(&saga_id);
                    *input = order_input(&format!("history-{i}"), false);
                }
                e
            })
            .collect();
        let summary_after = |n: usize| {
            let (status, business) = &template.statuses[n - 1];
            let last = &events[n - 1];
            Summary {
                saga_id: saga_id.clone(),
                definition: plan.name.clone(),
                version: plan.version,
                status: *status,
                business_status: business.clone(),
                idempotency_key: saga_id.clone(),
                request_digest: format!("{i:016x}"),
                created_at_ms: created,
                updated_at_ms: last.at_ms,
                last_seq: last.seq,
            }
        };
        let n = events.len();
        let create = NewSaga::started(summary_after(1), events[0].clone());
        let append = Appended {
            summary: summary_after(n),
            statuses: template.statuses[1..].to_vec(),
            events: events[1..].to_vec(),
        };
        // One writer thread applies them in order: the append finds its saga created.
        creates.push(store.create(create));
        appends.push(store.append_with_statuses(append));
        if creates.len() >= WINDOW || i + 1 == count {
            for write in creates.drain(..) {
                if write.await.context("prefill create")? != Created::New {
                    bail!("a prefilled saga id was already stored");
                }
            }
            for write in appends.drain(..) {
                write.await.context("prefill append")?;
            }
        }
        if (i + 1) % 100_000 == 0 {
            eprintln!(
                "  history: {} sagas stored ({:.0} s)",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let last_cursor = *store.watch_changes().borrow();
    let size = store.size_on_disk().unwrap_or(0);
    drop(store);
    eprintln!(
        "  history: {count} finished sagas stored in {:.1} s; {:.0} MB on disk; last change {last_cursor}",
        started.elapsed().as_secs_f64(),
        size as f64 / 1e6
    );
    // The store's writer has been joined: the directory is free for the orchestrator.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(last_cursor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sagas_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sagas")
    }

    #[test]
    fn a_finished_order_placement_has_eight_events_and_ends_completed() {
        let plan = order_placement(&sagas_dir()).unwrap();
        assert_eq!(plan.version, 1);
        let output = json!({"authorization_id": "a", "store_order_id": "s"});
        let finished = run_to_end(&plan, "s-1", order_input("o-1", false), &output).unwrap();
        assert_eq!(finished.events.len(), 8);
        assert_eq!(finished.statuses.len(), 8);
        assert_eq!(finished.statuses[0].0, SagaStatus::Running);
        assert_eq!(finished.statuses[7].0, SagaStatus::Completed);
        // The log replays to the same end.
        let replayed = Saga::from_events(&plan, &finished.events).unwrap();
        assert_eq!(replayed.status(), SagaStatus::Completed);
    }

    #[tokio::test]
    async fn prefilled_sagas_are_stored_finished_with_their_changes() {
        let dir = tempfile::tempdir().unwrap();
        let last = prefill(dir.path(), &sagas_dir(), 25).await.unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.summaries().unwrap().len(), 25);
        assert!(store.unfinished().unwrap().is_empty());
        assert_eq!(store.count_by_status(SagaStatus::Running).unwrap(), 0);
        // The feed ends at the returned cursor, with a COMPLETED change per saga.
        let changes = store.changes(0, 10_000).unwrap();
        assert_eq!(changes.last().map(|c| c.cursor), Some(last));
        assert_eq!(
            changes
                .iter()
                .filter(|c| c.status == SagaStatus::Completed)
                .count(),
            25
        );
        let one = &store.summaries().unwrap()[0];
        assert_eq!(store.events(&one.saga_id).unwrap().unwrap().len(), 8);
    }
}
