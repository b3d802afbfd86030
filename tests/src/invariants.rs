//! The durability invariants, checked against the participants' ledgers.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::bail;
use participants::Kind;
use proto::participant::v1::LedgerEntry;
use proto::saga::v1 as pb;

use crate::ledger;
use crate::process::Participants;

/// What the check counted.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    pub sagas: usize,
    pub completed: usize,
    pub compensated: usize,
    pub failed: usize,
    pub effects: usize,
    pub undone: usize,
    pub noop_undos: usize,
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} acknowledged sagas, all terminal: {} COMPLETED, {} COMPENSATED, {} FAILED; {} effects applied, {} undone, {} undos found nothing; 0 keys with two effects",
            self.sagas,
            self.completed,
            self.compensated,
            self.failed,
            self.effects,
            self.undone,
            self.noop_undos
        )
    }
}

fn at(entry: &LedgerEntry) -> (i64, i32) {
    entry.at.as_ref().map_or((0, 0), |t| (t.seconds, t.nanos))
}

/// Checks, for the given (terminal) sagas, against all three ledgers:
/// - each ledger holds at most one entry per idempotency key;
/// - every saga is terminal;
/// - a COMPLETED saga has its three effects standing and nothing undone;
/// - a COMPENSATED saga has every applied (compensatable) effect undone, the undos in the
///   reverse order of the effects, and no pivot effect.
pub async fn check(participants: &Participants, sagas: &[pb::Saga]) -> anyhow::Result<Figures> {
    let mut violations = Vec::new();
    let mut by_saga: BTreeMap<String, Vec<LedgerEntry>> = BTreeMap::new();
    for kind in [Kind::Payment, Kind::Store, Kind::Rider] {
        let entries = ledger(participants.get(kind)).await?;
        let mut keys = BTreeMap::new();
        for entry in entries {
            if let Some(first) = keys.insert(entry.idempotency_key.clone(), entry.seq) {
                violations.push(format!(
                    "{kind}: key {} applied twice (seq {first} and {})",
                    entry.idempotency_key, entry.seq
                ));
            }
            let saga_id = entry
                .idempotency_key
                .split('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            by_saga.entry(saga_id).or_default().push(entry);
        }
    }
    let mut figures = Figures {
        sagas: sagas.len(),
        ..Figures::default()
    };
    for saga in sagas {
        let entries = by_saga.remove(&saga.saga_id).unwrap_or_default();
        let applied: Vec<&LedgerEntry> = entries
            .iter()
            .filter(|e| e.idempotency_key.ends_with("/action") && !e.noop)
            .collect();
        let undos: Vec<&LedgerEntry> = entries
            .iter()
            .filter(|e| e.idempotency_key.ends_with("/compensation") && !e.noop)
            .collect();
        figures.effects += applied.len();
        figures.undone += undos.len();
        figures.noop_undos += entries
            .iter()
            .filter(|e| e.idempotency_key.ends_with("/compensation") && e.noop)
            .count();
        let id = &saga.saga_id;
        match crate::status(saga) {
            "COMPLETED" => {
                figures.completed += 1;
                if applied.len() != 3 || !undos.is_empty() {
                    violations.push(format!(
                        "COMPLETED saga {id} has {} effects and {} undos (want 3 and 0)",
                        applied.len(),
                        undos.len()
                    ));
                }
            }
            "COMPENSATED" => {
                figures.compensated += 1;
                for effect in &applied {
                    let scope = effect.idempotency_key.trim_end_matches("/action");
                    if scope.ends_with("/request_rider") {
                        violations.push(format!(
                            "COMPENSATED saga {id} has a pivot effect {}",
                            effect.idempotency_key
                        ));
                        continue;
                    }
                    if !undos
                        .iter()
                        .any(|u| u.idempotency_key == format!("{scope}/compensation"))
                    {
                        violations.push(format!(
                            "COMPENSATED saga {id}: effect {} was never undone",
                            effect.idempotency_key
                        ));
                    }
                }
                // Undo order is the reverse of do order.
                let mut done: Vec<&&LedgerEntry> = applied
                    .iter()
                    .filter(|e| !e.idempotency_key.contains("/request_rider/"))
                    .collect();
                done.sort_by_key(|e| at(e));
                let mut undone: Vec<&&LedgerEntry> = undos.iter().collect();
                undone.sort_by_key(|e| at(e));
                let do_order: Vec<String> = done
                    .iter()
                    .map(|e| e.idempotency_key.trim_end_matches("/action").to_owned())
                    .collect();
                let mut undo_order: Vec<String> = undone
                    .iter()
                    .map(|e| {
                        e.idempotency_key
                            .trim_end_matches("/compensation")
                            .to_owned()
                    })
                    .collect();
                undo_order.reverse();
                if undo_order != do_order {
                    violations.push(format!("COMPENSATED saga {id}: did {do_order:?} but undid (reversed) {undo_order:?}"));
                }
            }
            "FAILED" => figures.failed += 1,
            other => violations.push(format!("saga {id} is {other}, not terminal")),
        }
    }
    if !violations.is_empty() {
        bail!(
            "{} invariant violation(s):\n  {}",
            violations.len(),
            violations.join("\n  ")
        );
    }
    Ok(figures)
}

/// One broken rule: the saga it concerns (when it concerns one) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Violation {
    pub saga_id: Option<String>,
    pub what: String,
}

impl Violation {
    pub fn saga(saga_id: &str, what: impl Into<String>) -> Violation {
        Violation {
            saga_id: Some(saga_id.to_owned()),
            what: what.into(),
        }
    }

    pub fn global(what: impl Into<String>) -> Violation {
        Violation {
            saga_id: None,
            what: what.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.saga_id {
            Some(id) => write!(f, "saga {id}: {}", self.what),
            None => f.write_str(&self.what),
        }
    }
}

/// A saga as the orchestrator tells it: its state (GetSaga) and its whole event log
/// (WatchSaga of a terminal saga).
#[derive(Debug, Clone)]
pub struct SagaRecord {
    pub saga: pb::Saga,
    pub events: Vec<pb::SagaEvent>,
}

/// The ledger of one participant, through its gRPC API at `addr` (no size limit on the
/// answer: a long chaos run leaves tens of thousands of entries).
pub async fn ledger_at(kind: Kind, addr: std::net::SocketAddr) -> anyhow::Result<Vec<LedgerEntry>> {
    use proto::participant::v1::ListLedgerRequest;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let request = tonic::Request::new(ListLedgerRequest {});
    let entries = match kind {
        Kind::Payment => {
            proto::payment::v1::payment_client::PaymentClient::new(channel)
                .max_decoding_message_size(usize::MAX)
                .list_ledger(request)
                .await?
        }
        Kind::Store => {
            proto::store::v1::store_client::StoreClient::new(channel)
                .max_decoding_message_size(usize::MAX)
                .list_ledger(request)
                .await?
        }
        Kind::Rider => {
            proto::rider::v1::rider_client::RiderClient::new(channel)
                .max_decoding_message_size(usize::MAX)
                .list_ledger(request)
                .await?
        }
    };
    Ok(entries.into_inner().entries)
}

const ACTION: &str = "/action";
const COMPENSATION: &str = "/compensation";

/// The ledger entries of one key scope (`<saga>/<step>` or `<saga>/<step>/fallback`).
#[derive(Debug, Default)]
struct Scope<'a> {
    participant: &'a str,
    /// Applied actions (not no-ops): more than one is a doubled effect.
    applied: Vec<&'a LedgerEntry>,
    /// Actions refused because their compensation came first (no effect).
    refused: Vec<&'a LedgerEntry>,
    /// Compensations that undid the effect.
    undone: Vec<&'a LedgerEntry>,
    /// Compensations that found nothing to undo.
    noop_undos: Vec<&'a LedgerEntry>,
}

impl Scope<'_> {
    fn compensations(&self) -> impl Iterator<Item = &&LedgerEntry> {
        self.undone.iter().chain(&self.noop_undos)
    }
}

/// Checks the rules of section 3 of the design for every given saga, against every
/// participant's ledger (`ledgers`: participant name → entries) and the sagas' own event
/// logs; returns what it counted and every violation found, each naming its saga:
///
/// - each ledger holds at most one entry per idempotency key;
/// - every saga is terminal; COMPENSATED and FAILED sagas carry their reason;
/// - COMPLETED: every step that ran has its effect applied, standing, and no compensation
///   was called;
/// - COMPENSATED: every applied effect of a step with a compensation is undone, a step
///   without one (the pivot) left no effect, every attempted step's compensation is in
///   the log, each compensation the log records as done was received by its participant,
///   and the compensations reached the participants in the reverse order of the actions;
/// - no effect was applied after its compensation;
/// - every ledger entry belongs to a saga the orchestrator knows.
pub fn check_sagas(
    ledgers: &BTreeMap<String, Vec<LedgerEntry>>,
    sagas: &[SagaRecord],
) -> (Figures, Vec<Violation>) {
    let mut violations = Vec::new();
    // saga id → scope → entries.
    let mut by_saga: BTreeMap<&str, BTreeMap<&str, Scope<'_>>> = BTreeMap::new();
    for (participant, entries) in ledgers {
        let mut keys: BTreeMap<&str, u64> = BTreeMap::new();
        for entry in entries {
            let key = entry.idempotency_key.as_str();
            if let Some(first) = keys.insert(key, entry.seq) {
                violations.push(Violation {
                    saga_id: key.split('/').next().map(str::to_owned),
                    what: format!(
                        "{participant}: idempotency key {key} has two ledger entries (seq {first} and {}): an effect applied twice",
                        entry.seq
                    ),
                });
            }
            let (scope, is_action) = if let Some(scope) = key.strip_suffix(ACTION) {
                (scope, true)
            } else if let Some(scope) = key.strip_suffix(COMPENSATION) {
                (scope, false)
            } else {
                violations.push(Violation::global(format!(
                    "{participant}: ledger entry {} has a key {key} that is neither an action nor a compensation",
                    entry.seq
                )));
                continue;
            };
            let saga_id = scope.split('/').next().unwrap_or_default();
            let slot = by_saga
                .entry(saga_id)
                .or_default()
                .entry(scope)
                .or_insert_with(|| Scope {
                    participant,
                    ..Scope::default()
                });
            match (is_action, entry.noop) {
                (true, false) => slot.applied.push(entry),
                (true, true) => slot.refused.push(entry),
                (false, false) => slot.undone.push(entry),
                (false, true) => slot.noop_undos.push(entry),
            }
        }
    }

    let mut figures = Figures {
        sagas: sagas.len(),
        ..Figures::default()
    };
    for record in sagas {
        let saga = &record.saga;
        let id = saga.saga_id.as_str();
        let scopes = by_saga.remove(id).unwrap_or_default();
        for scope in scopes.values() {
            figures.effects += scope.applied.len();
            figures.undone += scope.undone.len();
            figures.noop_undos += scope.noop_undos.len();
            // No forward effect after its compensation (the participant must refuse it).
            for effect in &scope.applied {
                if let Some(undo) = scope.compensations().find(|u| u.seq < effect.seq) {
                    violations.push(Violation::saga(
                        id,
                        format!(
                            "{}: effect {} (seq {}) was applied after its compensation (seq {})",
                            scope.participant, effect.idempotency_key, effect.seq, undo.seq
                        ),
                    ));
                }
            }
        }
        let status = crate::status(saga);
        match status {
            "COMPLETED" => {
                figures.completed += 1;
                check_completed(record, &scopes, &mut violations);
            }
            "COMPENSATED" => {
                figures.compensated += 1;
                if saga.reason.trim().is_empty() {
                    violations.push(Violation::saga(id, "COMPENSATED without a recorded reason"));
                }
                check_compensated(record, &scopes, &mut violations);
            }
            "FAILED" => {
                figures.failed += 1;
                if saga.reason.trim().is_empty() {
                    violations.push(Violation::saga(id, "FAILED without a recorded reason"));
                }
            }
            other => violations.push(Violation::saga(
                id,
                format!(
                    "not terminal: {other}{}",
                    if saga.waiting_for.is_empty() {
                        String::new()
                    } else {
                        format!(", waiting for {}", saga.waiting_for)
                    }
                ),
            )),
        }
    }
    for (saga_id, scopes) in by_saga {
        let keys: Vec<String> = scopes
            .values()
            .flat_map(|s| s.applied.iter().chain(&s.undone))
            .map(|e| e.idempotency_key.clone())
            .collect();
        if !keys.is_empty() {
            violations.push(Violation::saga(
                saga_id,
                format!(
                    "the orchestrator does not know this saga, yet participants hold its effects {keys:?}"
                ),
            ));
        }
    }
    (figures, violations)
}

/// The scope of a step's calls: `<saga>/<step>`, or `<saga>/<step>/fallback` once rerouted.
fn step_scopes<'s, 'a>(
    scopes: &'s BTreeMap<&'a str, Scope<'a>>,
    saga_id: &str,
    step: &str,
) -> impl Iterator<Item = (&'s &'a str, &'s Scope<'a>)> {
    let primary = format!("{saga_id}/{step}");
    let fallback = format!("{saga_id}/{step}/fallback");
    scopes
        .iter()
        .filter(move |(scope, _)| **scope == primary || **scope == fallback)
}

fn check_completed(
    record: &SagaRecord,
    scopes: &BTreeMap<&str, Scope<'_>>,
    violations: &mut Vec<Violation>,
) {
    let saga = &record.saga;
    let id = saga.saga_id.as_str();
    for step in &saga.steps {
        let ran = step.status == pb::StepStatus::Succeeded as i32 && !step.method.is_empty();
        let applied: usize = step_scopes(scopes, id, &step.name)
            .map(|(_, s)| s.applied.len())
            .sum();
        if ran && applied == 0 {
            violations.push(Violation::saga(
                id,
                format!(
                    "COMPLETED, but the effect of step {} is missing at {}",
                    step.name, step.participant
                ),
            ));
        }
        for (_, scope) in step_scopes(scopes, id, &step.name) {
            for undo in scope.compensations() {
                violations.push(Violation::saga(
                    id,
                    format!(
                        "COMPLETED, but {} received the compensation {}{}",
                        scope.participant,
                        undo.idempotency_key,
                        if undo.noop {
                            " (a no-op)"
                        } else {
                            " and undid the effect"
                        }
                    ),
                ));
            }
        }
    }
}

fn check_compensated(
    record: &SagaRecord,
    scopes: &BTreeMap<&str, Scope<'_>>,
    violations: &mut Vec<Violation>,
) {
    let saga = &record.saga;
    let id = saga.saga_id.as_str();
    // From the log: the steps whose action was attempted, the position of each step's last
    // action event (compensation goes in the reverse order of those), and the steps whose
    // compensation is recorded as done.
    let mut attempts: BTreeMap<&str, u64> = BTreeMap::new();
    let mut last_action: BTreeMap<&str, u64> = BTreeMap::new();
    let mut compensated: BTreeMap<&str, u64> = BTreeMap::new();
    for event in &record.events {
        if event.phase == "action" && !event.step.is_empty() {
            last_action.insert(&event.step, event.seq);
        }
        match (event.kind.as_str(), event.phase.as_str()) {
            ("step_started", "action") => {
                attempts.insert(&event.step, event.seq);
            }
            ("step_succeeded", "compensation") => {
                compensated.insert(&event.step, event.seq);
            }
            _ => {}
        }
    }
    for step in &saga.steps {
        let has_compensation = !step.compensation_method.is_empty();
        let attempted = attempts.contains_key(step.name.as_str());
        for (_, scope) in step_scopes(scopes, id, &step.name) {
            for effect in &scope.applied {
                if !has_compensation {
                    violations.push(Violation::saga(
                        id,
                        format!(
                            "COMPENSATED, but the effect {} of step {} (which has no compensation) stands at {}",
                            effect.idempotency_key, step.name, scope.participant
                        ),
                    ));
                } else if scope.undone.is_empty() {
                    violations.push(Violation::saga(
                        id,
                        format!(
                            "COMPENSATED, but the effect {} stands at {}: never undone",
                            effect.idempotency_key, scope.participant
                        ),
                    ));
                }
            }
        }
        if !has_compensation {
            continue;
        }
        if attempted && !compensated.contains_key(step.name.as_str()) {
            violations.push(Violation::saga(
                id,
                format!(
                    "COMPENSATED, but the log records no compensation of step {}, whose action was attempted",
                    step.name
                ),
            ));
        }
        if compensated.contains_key(step.name.as_str())
            && step_scopes(scopes, id, &step.name)
                .all(|(_, s)| s.undone.is_empty() && s.noop_undos.is_empty())
        {
            violations.push(Violation::saga(
                id,
                format!(
                    "the log records the compensation of step {} as done, but {} never received it",
                    step.name, step.participant
                ),
            ));
        }
    }
    // Compensations reach the participants in the reverse order of the actions.
    let mut undos: Vec<(&str, &LedgerEntry)> = Vec::new();
    for step in &saga.steps {
        for (_, scope) in step_scopes(scopes, id, &step.name) {
            if let Some(first) = scope.compensations().min_by_key(|e| at(e)) {
                undos.push((step.name.as_str(), first));
            }
        }
    }
    undos.sort_by_key(|(_, e)| at(e));
    let undo_order: Vec<&str> = undos.iter().map(|(step, _)| *step).collect();
    let mut expected: Vec<&str> = undo_order.clone();
    expected.sort_by_key(|step| std::cmp::Reverse(last_action.get(step).copied().unwrap_or(0)));
    if undo_order != expected {
        violations.push(Violation::saga(
            id,
            format!(
                "COMPENSATED, but the compensations reached the participants in the order {undo_order:?}, not {expected:?} (the reverse of the actions)"
            ),
        ));
    }
}
