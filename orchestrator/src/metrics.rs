//! The orchestrator's Prometheus metrics (prometheus-client, no global registry), served
//! as text on the admin listener's `/metrics`.
//!
//! Names follow Prometheus conventions: a `saga_` prefix, base units (`_seconds`), `_total`
//! on counters. Gauges that describe stored state (sagas per status, breaker states) are
//! read when scraped, so they are never stale.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use saga_engine::SagaStatus;
use saga_store::SagaStore;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DefinitionLabels {
    definition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    definition: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    participant: String,
    step: String,
    phase: String,
    /// `ok`, or the gRPC code name of the failure (`CIRCUIT_OPEN` for a rejected call).
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    definition: String,
    step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    definition: String,
    step: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ParticipantLabels {
    participant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    participant: String,
    from: String,
    to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn saga_histogram() -> Histogram {
    // 10 ms to about 3 days: sagas that wait for people take hours.
    Histogram::new(exponential_buckets(0.01, 3.0, 17))
}

/// Every metric of the orchestrator.
pub struct Metrics {
    registry: Registry,
    sagas_started: Family<DefinitionLabels, Counter>,
    sagas_finished: Family<FinishedLabels, Counter>,
    saga_duration: Family<FinishedLabels, Histogram>,
    step_attempt_duration: Family<AttemptLabels, Histogram>,
    compensations: Family<StepLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    breaker_state: Family<ParticipantLabels, Gauge>,
    breaker_transitions: Family<TransitionLabels, Counter>,
    flush_duration: Histogram,
    flush_batch: Histogram,
    sagas_in_status: Family<StatusLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The value of the breaker state gauge.
pub fn breaker_state_value(state: circuit_breaker::State) -> i64 {
    match state {
        circuit_breaker::State::Closed => 0,
        circuit_breaker::State::Open => 1,
        circuit_breaker::State::HalfOpen => 2,
        circuit_breaker::State::ForcedOpen => 3,
        circuit_breaker::State::Disabled => 4,
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("saga");
        let sagas_started = Family::<DefinitionLabels, Counter>::default();
        registry.register(
            "sagas_started",
            "Sagas started (acknowledged to StartSaga), by definition",
            sagas_started.clone(),
        );
        let sagas_finished = Family::<FinishedLabels, Counter>::default();
        registry.register(
            "sagas_finished",
            "Sagas that reached a terminal status, by definition and status",
            sagas_finished.clone(),
        );
        let saga_duration =
            Family::<FinishedLabels, Histogram>::new_with_constructor(saga_histogram as fn() -> _);
        registry.register(
            "saga_duration_seconds",
            "Time from StartSaga to the terminal status, by definition and status",
            saga_duration.clone(),
        );
        let step_attempt_duration = Family::<AttemptLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> _,
        );
        registry.register(
            "step_attempt_duration_seconds",
            "Duration of one call to a participant (an action or compensation attempt), by participant, step, phase and outcome",
            step_attempt_duration.clone(),
        );
        let compensations = Family::<StepLabels, Counter>::default();
        registry.register(
            "compensations",
            "Steps compensated (compensation succeeded), by definition and step",
            compensations.clone(),
        );
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "step_retries",
            "Failed attempts that will be retried, by definition, step and phase",
            retries.clone(),
        );
        let breaker_state = Family::<ParticipantLabels, Gauge>::default();
        registry.register(
            "circuit_breaker_state",
            "Circuit breaker state by participant: 0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled",
            breaker_state.clone(),
        );
        let breaker_transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "circuit_breaker_transitions",
            "Circuit breaker state changes, by participant and states",
            breaker_transitions.clone(),
        );
        let flush_duration = latency_histogram();
        registry.register(
            "store_flush_duration_seconds",
            "Duration of one flush of the event log (group commit: one per batch)",
            flush_duration.clone(),
        );
        let flush_batch = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        registry.register(
            "store_flush_batch_writes",
            "Writes (saga creations and appends) made durable by one flush",
            flush_batch.clone(),
        );
        let sagas_in_status = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "sagas",
            "Sagas in each non-terminal status",
            sagas_in_status.clone(),
        );
        Arc::new(Metrics {
            registry,
            sagas_started,
            sagas_finished,
            saga_duration,
            step_attempt_duration,
            compensations,
            retries,
            breaker_state,
            breaker_transitions,
            flush_duration,
            flush_batch,
            sagas_in_status,
        })
    }

    pub fn saga_started(&self, definition: &str) {
        self.sagas_started
            .get_or_create(&DefinitionLabels {
                definition: definition.to_owned(),
            })
            .inc();
    }

    pub fn saga_finished(&self, definition: &str, status: SagaStatus, took: Duration) {
        let labels = FinishedLabels {
            definition: definition.to_owned(),
            status: status.as_str().to_owned(),
        };
        self.sagas_finished.get_or_create(&labels).inc();
        self.saga_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub fn step_attempt(
        &self,
        participant: &str,
        step: &str,
        phase: &str,
        outcome: &str,
        took: Duration,
    ) {
        self.step_attempt_duration
            .get_or_create(&AttemptLabels {
                participant: participant.to_owned(),
                step: step.to_owned(),
                phase: phase.to_owned(),
                outcome: outcome.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn compensated(&self, definition: &str, step: &str) {
        self.compensations
            .get_or_create(&StepLabels {
                definition: definition.to_owned(),
                step: step.to_owned(),
            })
            .inc();
    }

    pub fn retry(&self, definition: &str, step: &str, phase: &str) {
        self.retries
            .get_or_create(&RetryLabels {
                definition: definition.to_owned(),
                step: step.to_owned(),
                phase: phase.to_owned(),
            })
            .inc();
    }

    pub fn breaker_transition(&self, participant: &str, from: &str, to: &str) {
        self.breaker_transitions
            .get_or_create(&TransitionLabels {
                participant: participant.to_owned(),
                from: from.to_owned(),
                to: to.to_owned(),
            })
            .inc();
    }

    pub fn flushed(&self, took: Duration, writes: usize) {
        self.flush_duration.observe(took.as_secs_f64());
        self.flush_batch.observe(writes as f64);
    }

    /// The text exposition, with the gauges of stored state read now.
    pub fn render(
        &self,
        store: &dyn SagaStore,
        breakers: &[(String, circuit_breaker::State)],
    ) -> String {
        for status in SagaStatus::ALL.iter().filter(|s| !s.is_terminal()) {
            // A store fault shows as a missing update, not a failed scrape.
            if let Ok(count) = store.count_by_status(*status) {
                self.sagas_in_status
                    .get_or_create(&StatusLabels {
                        status: status.as_str().to_owned(),
                    })
                    .set(count as i64);
            }
        }
        for (participant, state) in breakers {
            self.breaker_state
                .get_or_create(&ParticipantLabels {
                    participant: participant.clone(),
                })
                .set(breaker_state_value(*state));
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(cause = %e, "cannot encode metrics");
        }
        text
    }
}
