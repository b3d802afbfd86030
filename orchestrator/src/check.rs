//! `orchestrator check`: replays every saga's log and compares the result with what the
//! store holds (its summary and its place in the status index). Needs no participant: the
//! definitions are compiled from the descriptors stored with them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use saga_engine::{Plan, Saga};
use saga_store::{SagaStore, SledStore, StoreError, Summary};

use crate::registry::Registry;

/// What a check found.
#[derive(Debug, Default)]
pub struct Report {
    pub sagas: usize,
    pub definitions: usize,
    /// One line per problem, naming the saga (or definition) and the disagreement.
    pub problems: Vec<String>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the store in `data` (which must not be open elsewhere).
pub fn check_dir(data: &Path) -> Result<Report, StoreError> {
    let store = SledStore::open(data)?;
    check(&store)
}

/// Checks every saga of `store`.
pub fn check(store: &dyn SagaStore) -> Result<Report, StoreError> {
    let mut report = Report::default();
    let mut plans: BTreeMap<(String, u32), Arc<Plan>> = BTreeMap::new();
    for stored in store.definitions()? {
        report.definitions += 1;
        match Registry::compile_stored(&stored) {
            Ok(plan) => {
                plans.insert((stored.name.clone(), stored.version), Arc::new(plan));
            }
            Err(e) => report.problems.push(format!(
                "definition {} v{}: {e}",
                stored.name, stored.version
            )),
        }
    }
    let mut indexed: BTreeMap<String, BTreeSet<&'static str>> = BTreeMap::new();
    for (status, saga_id) in store.status_index()? {
        indexed.entry(saga_id).or_default().insert(status.as_str());
    }
    for summary in store.summaries()? {
        report.sagas += 1;
        let id = summary.saga_id.clone();
        let Some(plan) = plans.get(&(summary.definition.clone(), summary.version)) else {
            report.problems.push(format!(
                "saga {id}: its definition {} v{} is not stored or does not compile",
                summary.definition, summary.version
            ));
            continue;
        };
        let Some(events) = store.events(&id)? else {
            report
                .problems
                .push(format!("saga {id}: a summary without an event log"));
            continue;
        };
        let saga = match Saga::from_events(plan, &events) {
            Ok(saga) => saga,
            Err(e) => {
                report
                    .problems
                    .push(format!("saga {id}: the log does not replay: {e}"));
                continue;
            }
        };
        report.problems.extend(
            compare(plan, &summary, &saga)
                .into_iter()
                .map(|p| format!("saga {id}: {p}")),
        );
        let in_index = indexed.remove(&id).unwrap_or_default();
        let replayed = saga.status().as_str();
        if in_index.len() != 1 || !in_index.contains(replayed) {
            report.problems.push(format!(
                "saga {id}: the status index disagrees: it lists {in_index:?}, replay says {replayed}"
            ));
        }
    }
    for (id, statuses) in indexed {
        report.problems.push(format!(
            "saga {id}: listed in the status index as {statuses:?} but has no summary"
        ));
    }
    Ok(report)
}

/// The fields of the stored summary that disagree with the replayed state.
fn compare(plan: &Plan, stored: &Summary, replayed: &Saga) -> Vec<String> {
    let mut problems = Vec::new();
    let mut differ = |field: &str, stored: String, replayed: String| {
        if stored != replayed {
            problems.push(format!(
                "{field} is {stored} in the store but {replayed} by replay"
            ));
        }
    };
    differ(
        "status",
        stored.status.as_str().into(),
        replayed.status().as_str().into(),
    );
    differ(
        "business status",
        format!("{:?}", stored.business_status),
        format!("{:?}", replayed.business_status(plan)),
    );
    differ(
        "last_seq",
        stored.last_seq.to_string(),
        replayed.last_seq.to_string(),
    );
    differ(
        "created_at_ms",
        stored.created_at_ms.to_string(),
        replayed.created_at_ms.to_string(),
    );
    differ(
        "updated_at_ms",
        stored.updated_at_ms.to_string(),
        replayed.updated_at_ms.to_string(),
    );
    differ(
        "definition",
        stored.definition.clone(),
        replayed.definition.clone(),
    );
    differ(
        "version",
        stored.version.to_string(),
        replayed.version.to_string(),
    );
    differ(
        "idempotency_key",
        stored.idempotency_key.clone(),
        replayed.idempotency_key.clone(),
    );
    problems
}
