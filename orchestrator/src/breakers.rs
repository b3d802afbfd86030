//! The participants' circuit breakers: built from the definitions' `circuit_breaker`
//! blocks (one breaker per participant name, shared by every saga and definition that
//! calls it), and shown through the API.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use circuit_breaker::{CallClock, CircuitBreaker, Config, Mode, SlidingWindow, Snapshot};
use saga_engine::definition::{BreakerSpec, WindowSpec};

use proto::saga::v1 as pb;

/// The breaker configuration of a definition's `circuit_breaker` block.
pub fn config(spec: &BreakerSpec) -> Config {
    Config {
        window: match spec.window {
            WindowSpec::Count(n) => SlidingWindow::Count(n),
            WindowSpec::Time(d) => SlidingWindow::Time(d),
        },
        minimum_calls: spec.minimum_calls,
        failure_rate_threshold: spec.failure_rate,
        slow_call_duration: spec.slow_call_duration,
        slow_call_rate_threshold: spec.slow_call_rate,
        wait_in_open: spec.wait_in_open,
        wait_in_open_multiplier: spec.wait_multiplier,
        max_wait_in_open: spec.max_wait_in_open,
        permitted_calls_in_half_open: spec.half_open_calls,
        // Participant calls take milliseconds; slow-call thresholds are far above a tick.
        call_clock: CallClock::Coarse,
    }
}

/// Told about every breaker, existing and new (for metrics).
pub type BreakerObserver = Arc<dyn Fn(&str, &CircuitBreaker) + Send + Sync>;

/// One breaker per participant name.
#[derive(Default)]
pub struct Breakers {
    /// A std Mutex: held only to look up or insert, never across an await.
    by_participant: Mutex<BTreeMap<String, CircuitBreaker>>,
    observer: Mutex<Option<BreakerObserver>>,
}

impl std::fmt::Debug for Breakers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breakers").finish_non_exhaustive()
    }
}

impl Breakers {
    /// Makes sure `participant` has a breaker; the first configuration seen wins (a
    /// different one in a later definition is logged and ignored: the breaker protects the
    /// participant, whichever saga calls it).
    pub fn ensure(&self, participant: &str, spec: &BreakerSpec) {
        let mut map = self
            .by_participant
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match map.get(participant) {
            Some(existing) if existing.config() != &config(spec) => tracing::warn!(
                participant,
                "a definition configures the circuit breaker of this participant differently; the first configuration stays"
            ),
            Some(_) => {}
            None => {
                let breaker = CircuitBreaker::new(participant, config(spec));
                map.insert(participant.to_owned(), breaker.clone());
                drop(map);
                let observer = self
                    .observer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if let Some(observer) = observer {
                    observer(participant, &breaker);
                }
            }
        }
    }

    /// Calls `observer` for every breaker now, and for every breaker created later.
    pub fn observe(&self, observer: BreakerObserver) {
        *self.observer.lock().unwrap_or_else(|e| e.into_inner()) = Some(observer.clone());
        let existing: Vec<(String, CircuitBreaker)> = self
            .by_participant
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, breaker)| (name.clone(), breaker.clone()))
            .collect();
        for (name, breaker) in existing {
            observer(&name, &breaker);
        }
    }

    pub fn get(&self, participant: &str) -> Option<CircuitBreaker> {
        self.by_participant
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(participant)
            .cloned()
    }

    pub fn all(&self) -> Vec<CircuitBreaker> {
        self.by_participant
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

fn timestamp(at: std::time::SystemTime) -> prost_types::Timestamp {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

/// The API's view of a breaker.
pub fn message(snapshot: &Snapshot) -> pb::CircuitBreaker {
    pb::CircuitBreaker {
        participant: snapshot.name.clone(),
        state: snapshot.state.as_str().to_owned(),
        failure_rate: snapshot.failure_rate,
        slow_call_rate: snapshot.slow_call_rate,
        calls: snapshot.calls,
        failed_calls: snapshot.failures,
        slow_calls: snapshot.slow_calls,
        next_probe_at: snapshot.next_probe_at.map(timestamp),
        openings: snapshot.openings,
    }
}

/// The breaker mode an API request asks for.
pub fn mode(mode: pb::BreakerMode) -> Option<Mode> {
    match mode {
        pb::BreakerMode::Unspecified => None,
        pb::BreakerMode::Normal => Some(Mode::Normal),
        pb::BreakerMode::ForcedOpen => Some(Mode::ForcedOpen),
        pb::BreakerMode::Disabled => Some(Mode::Disabled),
    }
}
