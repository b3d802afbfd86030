//! The final report of a chaos run.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::invariants::{Figures, Violation};

/// How many violations the report prints (all are counted).
const PRINTED_VIOLATIONS: usize = 100;

/// What the payment circuit breaker did around the outage, as `ListCircuitBreakers` showed it.
#[derive(Debug, Clone, Default)]
pub struct BreakerSeen {
    pub outage: Duration,
    /// From the outage's start to the first observation of the breaker not closed.
    pub opened_after: Option<Duration>,
    /// From the outage's end to the first observation of it closed again.
    pub closed_after: Option<Duration>,
    /// How many times it was seen going from closed to not closed (an orchestrator restart
    /// starts a closed breaker).
    pub times_opened: usize,
    /// Most consecutive openings seen.
    pub max_openings: u32,
    /// States seen (closed, open, half_open).
    pub states: Vec<String>,
}

/// Time from the heal until each saga open at (or after) it was seen terminal.
#[derive(Debug, Clone, Default)]
pub struct HealTimes {
    /// Sagas seen not terminal at or after the heal.
    pub open: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// When the last saga was seen terminal; None if some never were.
    pub all_terminal_after: Option<Duration>,
    pub bound: Duration,
    /// Sagas terminal within the bound, of those open.
    pub within_bound: usize,
}

impl HealTimes {
    pub fn from_times(mut times: Vec<Duration>, open: usize, bound: Duration) -> HealTimes {
        times.sort();
        let pick = |q: f64| -> Duration {
            if times.is_empty() {
                return Duration::ZERO;
            }
            let rank = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len());
            times[rank - 1]
        };
        HealTimes {
            open,
            p50: pick(0.50),
            p99: pick(0.99),
            max: times.last().copied().unwrap_or_default(),
            all_terminal_after: (times.len() == open)
                .then(|| times.last().copied().unwrap_or_default()),
            bound,
            within_bound: times.iter().filter(|t| **t <= bound).count(),
        }
    }
}

/// Everything a run measured and found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub seed: u64,
    /// The command that replays the run.
    pub replay: String,
    pub planned: usize,
    pub started: usize,
    pub acknowledged: usize,
    pub not_acknowledged: usize,
    pub retried_calls: usize,
    /// Sagas the orchestrator holds at the end.
    pub in_store: usize,
    pub completed: usize,
    pub compensated: usize,
    pub failed: usize,
    pub not_terminal: usize,
    pub figures: Figures,
    /// Why sagas ended COMPENSATED and FAILED: (status, reason, sagas), most frequent first.
    pub reasons: Vec<(String, String, usize)>,
    /// Faults injected, by kind, in print order: (kind, count, detail).
    pub faults: Vec<(String, u64, String)>,
    pub orchestrator_kills: usize,
    pub participant_kills: usize,
    pub breaker: Option<BreakerSeen>,
    /// Sagas whose log holds a `step_deferred` (a call the open breaker refused).
    pub deferred_sagas: usize,
    pub heal: HealTimes,
    /// Sagas replayed by `orchestrator check`.
    pub replayed: usize,
    pub violations: Vec<Violation>,
    /// What the run was asked to show and did not (e.g. the breaker never opened).
    pub unmet: Vec<String>,
    pub fault_time: Duration,
    pub total_time: Duration,
    /// Where data and logs were kept, if they were.
    pub kept: Option<PathBuf>,
}

impl Report {
    /// No violation and every expectation met.
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty() && self.unmet.is_empty()
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "chaos run, seed {}", self.seed)?;
        writeln!(f, "  replay: {}", self.replay)?;
        writeln!(
            f,
            "sagas: {} planned, {} started, {} acknowledged, {} never acknowledged ({} StartSaga calls retried)",
            self.planned,
            self.started,
            self.acknowledged,
            self.not_acknowledged,
            self.retried_calls
        )?;
        writeln!(
            f,
            "outcomes: {} COMPLETED, {} COMPENSATED, {} FAILED, {} not terminal ({} sagas in the orchestrator)",
            self.completed, self.compensated, self.failed, self.not_terminal, self.in_store
        )?;
        for (status, reason, count) in &self.reasons {
            writeln!(f, "  {count:>6} {status}: {reason}")?;
        }
        writeln!(
            f,
            "effects: {} applied, {} undone, {} compensations found nothing to undo",
            self.figures.effects, self.figures.undone, self.figures.noop_undos
        )?;
        writeln!(f, "faults injected:")?;
        for (kind, count, detail) in &self.faults {
            if detail.is_empty() {
                writeln!(f, "  {kind:<44} {count:>6}")?;
            } else {
                writeln!(f, "  {kind:<44} {count:>6}  {detail}")?;
            }
        }
        writeln!(
            f,
            "orchestrator kills: {}; participant kills: {}",
            self.orchestrator_kills, self.participant_kills
        )?;
        match &self.breaker {
            None => writeln!(f, "payment circuit breaker: no outage scheduled")?,
            Some(b) => writeln!(
                f,
                "payment circuit breaker: {} outage; {}; opened {} times; {}; most consecutive openings {}; states seen {}; {} sagas deferred by it",
                secs(b.outage),
                b.opened_after.map_or_else(
                    || "never seen open".to_owned(),
                    |d| format!("seen open {} into the outage", secs(d))
                ),
                b.times_opened,
                b.closed_after.map_or_else(
                    || "not seen closed again".to_owned(),
                    |d| format!("closed again {} after the outage", secs(d))
                ),
                b.max_openings,
                b.states.join(", "),
                self.deferred_sagas
            )?,
        }
        let h = &self.heal;
        writeln!(
            f,
            "heal to all-terminal: {} sagas open at the heal; {}; per saga p50 {}, p99 {}, max {}; {} of {} within {}",
            h.open,
            h.all_terminal_after.map_or_else(
                || "NOT all terminal".to_owned(),
                |d| format!("all terminal {} after it", secs(d))
            ),
            secs(h.p50),
            secs(h.p99),
            secs(h.max),
            h.within_bound,
            h.open,
            secs(h.bound)
        )?;
        writeln!(
            f,
            "offline replay (orchestrator check): {} sagas replayed",
            self.replayed
        )?;
        writeln!(f, "invariant violations: {}", self.violations.len())?;
        for v in self.violations.iter().take(PRINTED_VIOLATIONS) {
            writeln!(f, "  - {v}")?;
        }
        if self.violations.len() > PRINTED_VIOLATIONS {
            writeln!(
                f,
                "  ... and {} more (violations.txt in the kept directory)",
                self.violations.len() - PRINTED_VIOLATIONS
            )?;
        }
        for unmet in &self.unmet {
            writeln!(f, "NOT SHOWN: {unmet}")?;
        }
        writeln!(
            f,
            "time: {} of faults, {} in all",
            secs(self.fault_time),
            secs(self.total_time)
        )?;
        if let Some(dir) = &self.kept {
            writeln!(f, "data and logs kept in {}", dir.display())?;
        }
        write!(
            f,
            "result: {}",
            if self.violations.is_empty() && self.unmet.is_empty() {
                "PASS"
            } else if self.violations.is_empty() {
                "INCOMPLETE"
            } else {
                "FAIL"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let times: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let h = HealTimes::from_times(times, 100, Duration::from_millis(90));
        assert_eq!(h.p50, Duration::from_millis(50));
        assert_eq!(h.p99, Duration::from_millis(99));
        assert_eq!(h.max, Duration::from_millis(100));
        assert_eq!(h.all_terminal_after, Some(Duration::from_millis(100)));
        assert_eq!(h.within_bound, 90);
        let h = HealTimes::from_times(vec![Duration::from_millis(5)], 2, Duration::from_secs(1));
        assert_eq!(h.all_terminal_after, None);
        let h = HealTimes::from_times(Vec::new(), 0, Duration::from_secs(1));
        assert_eq!(
            (h.p50, h.all_terminal_after),
            (Duration::ZERO, Some(Duration::ZERO))
        );
    }
}
