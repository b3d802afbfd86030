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
