//! The saga state machine: state is a fold of events, decisions are pure functions.
//!
//! The runtime drives a saga with three calls:
//! - [`Saga::next`]: what to do now: record an event, call a participant, sleep until a
//!   time, or nothing (terminal). A call is only ever returned for an attempt whose
//!   `step_started` event is already in the state, so the intent is stored before the call.
//! - [`Saga::on_result`]: the event recording a call's outcome (with the retry time, drawn
//!   from the jitter the runtime passes in).
//! - [`Saga::cancel`]: the event recording a cancellation, or why it is refused.
//!
//! [`Saga::apply`] folds an event into the state and rejects events that break the log's
//! rules (wrong sequence number, anything after a terminal status, an unknown step).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::definition::{CallPlan, OnOpen, Plan, RetryPolicy, StepKind, StepPlan};
use crate::template;

/// Whether a call does a step or undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Action,
    Compensation,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Action => "action",
            Phase::Compensation => "compensation",
        }
    }
}

/// Why a call did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallError {
    /// gRPC code name (`UNAVAILABLE`), or `INVALID_REQUEST` when no request could be built.
    pub code: String,
    pub message: String,
    /// Transient: another attempt may succeed.
    pub retryable: bool,
    /// The participant's circuit breaker refused the call: nothing was sent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rejected: bool,
}

impl CallError {
    /// The error code of a step whose breaker stayed open past its deferral.
    pub const CIRCUIT_OPEN: &'static str = "CIRCUIT_OPEN";
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// One entry of a saga's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// 1 for `SagaStarted`, then +1 per event.
    pub seq: u64,
    /// Milliseconds since the Unix epoch, from the runtime's clock.
    pub at_ms: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    SagaStarted {
        saga_id: String,
        definition: String,
        version: u32,
        input: Value,
        idempotency_key: String,
    },
    /// The intent to make attempt `attempt` of a call, stored before the call is made.
    StepStarted {
        step: String,
        phase: Phase,
        attempt: u32,
    },
    StepSucceeded {
        step: String,
        phase: Phase,
        attempt: u32,
        output: Value,
    },
    /// `retry_at_ms` is set when another attempt will follow, at that time.
    StepFailed {
        step: String,
        phase: Phase,
        attempt: u32,
        error: CallError,
        retry_at_ms: Option<u64>,
    },
    /// The breaker refused attempt `attempt` (nothing was sent); the step waits for the
    /// breaker, until `deadline_ms` if set, and then makes the same attempt again.
    StepDeferred {
        step: String,
        phase: Phase,
        attempt: u32,
        reason: String,
        deadline_ms: Option<u64>,
    },
    /// The breaker refused attempt `attempt` and the step has `on_open: call`: from now on
    /// the step's calls (and its compensation) go to its fallback participant.
    StepRerouted {
        step: String,
        attempt: u32,
        reason: String,
    },
    CancelRequested {
        reason: String,
    },
    CompensationStarted {
        reason: String,
    },
    SagaCompleted,
    SagaCompensated,
    SagaFailed {
        reason: String,
    },
}

impl EventKind {
    /// The snake_case name used in the log and the API.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::SagaStarted { .. } => "saga_started",
            EventKind::StepStarted { .. } => "step_started",
            EventKind::StepSucceeded { .. } => "step_succeeded",
            EventKind::StepFailed { .. } => "step_failed",
            EventKind::StepDeferred { .. } => "step_deferred",
            EventKind::StepRerouted { .. } => "step_rerouted",
            EventKind::CancelRequested { .. } => "cancel_requested",
            EventKind::CompensationStarted { .. } => "compensation_started",
            EventKind::SagaCompleted => "saga_completed",
            EventKind::SagaCompensated => "saga_compensated",
            EventKind::SagaFailed { .. } => "saga_failed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SagaStatus {
    Running,
    Waiting,
    Compensating,
    Completed,
    Compensated,
    Failed,
}

impl SagaStatus {
    pub const ALL: [SagaStatus; 6] = [
        SagaStatus::Running,
        SagaStatus::Waiting,
        SagaStatus::Compensating,
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Failed,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Failed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "RUNNING",
            SagaStatus::Waiting => "WAITING",
            SagaStatus::Compensating => "COMPENSATING",
            SagaStatus::Completed => "COMPLETED",
            SagaStatus::Compensated => "COMPENSATED",
            SagaStatus::Failed => "FAILED",
        }
    }

    pub fn parse(text: &str) -> Option<SagaStatus> {
        SagaStatus::ALL
            .into_iter()
            .find(|s| s.as_str().eq_ignore_ascii_case(text))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepStatus {
    Pending,
    Running,
    Retrying,
    Succeeded,
    Failed,
    Compensating,
    Compensated,
    CompensationFailed,
}

/// What the state says about one step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepState {
    pub status: StepStatus,
    /// Action attempts started.
    pub attempts: u32,
    pub compensation_attempts: u32,
    /// An attempt was started and its outcome is not recorded yet.
    pub in_flight: bool,
    pub retry_at_ms: Option<u64>,
    pub last_error: Option<CallError>,
    pub output: Option<Value>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub compensated_at_ms: Option<u64>,
    /// Set while the step waits for its participant's breaker.
    pub deferral: Option<Deferral>,
    /// When the current phase was first deferred; cleared by a real outcome.
    pub deferred_since_ms: Option<u64>,
    /// Whether the step's calls go to its fallback (after a `step_rerouted`).
    pub rerouted: bool,
    /// Whether a call of this step reached the primary participant (an outcome other than a
    /// breaker rejection was recorded): such a step is never rerouted.
    pub primary_reached: bool,
}

/// A step waiting for its participant's circuit breaker.
#[derive(Debug, Clone, PartialEq)]
pub struct Deferral {
    pub phase: Phase,
    pub attempt: u32,
    pub reason: String,
    /// After this the step fails (actions); `None` waits as long as it takes (compensations).
    pub deadline_ms: Option<u64>,
}

impl StepState {
    fn new() -> Self {
        StepState {
            status: StepStatus::Pending,
            attempts: 0,
            compensation_attempts: 0,
            in_flight: false,
            retry_at_ms: None,
            last_error: None,
            output: None,
            started_at_ms: None,
            finished_at_ms: None,
            compensated_at_ms: None,
            deferral: None,
            deferred_since_ms: None,
            rerouted: false,
            primary_reached: false,
        }
    }
}

/// A call the runtime should make now.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub step_index: usize,
    pub step: String,
    pub phase: Phase,
    pub attempt: u32,
    pub participant: String,
    /// `package.Service/Method`.
    pub method: String,
    /// The rendered request mapping (JSON).
    pub request: Value,
    /// `<saga_id>/<step>/<action|compensation>`: the same for every attempt.
    pub idempotency_key: String,
    pub timeout_ms: u64,
}

/// What the runtime should do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Apply this event and store it before doing anything else that depends on it.
    Record(Event),
    Call(Call),
    /// Nothing to do before this time (a retry backoff).
    Sleep {
        until_ms: u64,
        reason: String,
    },
    /// Wait until the participant's breaker would let a call through (then call
    /// [`Saga::resume`]), or until `until_ms`, whichever comes first.
    AwaitBreaker {
        step_index: usize,
        participant: String,
        until_ms: Option<u64>,
        reason: String,
    },
    /// The saga is terminal.
    Done,
}

/// An event that does not fit the saga's log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("event {got} out of order: expected seq {expected}")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("saga is {0:?}: a terminal status never changes")]
    Terminal(SagaStatus),
    #[error("the first event must be saga_started")]
    NotStarted,
    #[error("unknown step `{0}` for this definition version")]
    UnknownStep(String),
    #[error("no attempt {attempt} of {phase:?} `{step}` is in flight")]
    NotInFlight {
        step: String,
        phase: Phase,
        attempt: u32,
    },
    #[error("event log is empty")]
    Empty,
    #[error("event saga_started for definition {got}, expected {expected}")]
    WrongDefinition { expected: String, got: String },
}

/// Why a cancellation is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelRefused {
    #[error("saga is already {}", .0.as_str())]
    Terminal(SagaStatus),
    #[error("saga passed its pivot step `{0}` and can no longer be cancelled")]
    PastPivot(String),
    #[error("saga is already compensating: {0}")]
    Compensating(String),
}

/// One saga's state, derived from its events.
#[derive(Debug, Clone, PartialEq)]
pub struct Saga {
    pub id: String,
    pub definition: String,
    pub version: u32,
    pub input: Value,
    pub idempotency_key: String,
    pub steps: Vec<StepState>,
    /// Set by `compensation_started`.
    pub compensating: bool,
    pub cancel_reason: Option<String>,
    /// Why the saga compensated or failed.
    pub reason: Option<String>,
    pub terminal: Option<SagaStatus>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub last_seq: u64,
}

impl Saga {
    /// The first event of a new saga. The runtime stores it, then folds it with
    /// [`Saga::from_events`].
    pub fn start_event(
        plan: &Plan,
        saga_id: &str,
        input: Value,
        idempotency_key: &str,
        now_ms: u64,
    ) -> Event {
        Event {
            seq: 1,
            at_ms: now_ms,
            kind: EventKind::SagaStarted {
                saga_id: saga_id.to_owned(),
                definition: plan.name.clone(),
                version: plan.version,
                input,
                idempotency_key: idempotency_key.to_owned(),
            },
        }
    }

    /// Rebuilds a saga from its whole log.
    pub fn from_events<'a>(
        plan: &Plan,
        events: impl IntoIterator<Item = &'a Event>,
    ) -> Result<Saga, EngineError> {
        let mut events = events.into_iter();
        let first = events.next().ok_or(EngineError::Empty)?;
        let EventKind::SagaStarted {
            saga_id,
            definition,
            version,
            input,
            idempotency_key,
        } = &first.kind
        else {
            return Err(EngineError::NotStarted);
        };
        if first.seq != 1 {
            return Err(EngineError::OutOfOrder {
                expected: 1,
                got: first.seq,
            });
        }
        if definition != &plan.name || *version != plan.version {
            return Err(EngineError::WrongDefinition {
                expected: format!("{} v{}", plan.name, plan.version),
                got: format!("{definition} v{version}"),
            });
        }
        let mut saga = Saga {
            id: saga_id.clone(),
            definition: definition.clone(),
            version: *version,
            input: input.clone(),
            idempotency_key: idempotency_key.clone(),
            steps: plan.steps.iter().map(|_| StepState::new()).collect(),
            compensating: false,
            cancel_reason: None,
            reason: None,
            terminal: None,
            created_at_ms: first.at_ms,
            updated_at_ms: first.at_ms,
            last_seq: 1,
        };
        for event in events {
            saga.apply(plan, event)?;
        }
        Ok(saga)
    }

    /// The saga's status as clients see it.
    pub fn status(&self) -> SagaStatus {
        if let Some(terminal) = self.terminal {
            terminal
        } else if self.compensating {
            SagaStatus::Compensating
        } else if self
            .steps
            .iter()
            .any(|s| s.status == StepStatus::Retrying || s.deferral.is_some())
        {
            SagaStatus::Waiting
        } else {
            SagaStatus::Running
        }
    }

    /// For a WAITING saga, what it waits for.
    pub fn waiting_for(&self, plan: &Plan) -> Option<String> {
        if self.status() != SagaStatus::Waiting {
            return None;
        }
        if let Some((s, p)) = self
            .steps
            .iter()
            .zip(&plan.steps)
            .find(|(s, _)| s.deferral.is_some())
        {
            let deferral = s.deferral.as_ref()?;
            return Some(match deferral.deadline_ms {
                Some(at) => format!(
                    "step `{}` deferred: {} (until {at} ms)",
                    p.name, deferral.reason
                ),
                None => format!("step `{}` deferred: {}", p.name, deferral.reason),
            });
        }
        self.steps
            .iter()
            .zip(&plan.steps)
            .find(|(s, _)| s.status == StepStatus::Retrying)
            .map(|(s, p)| match s.retry_at_ms {
                Some(at) => format!("retry of step `{}` at {at} ms", p.name),
                None => format!("retry of step `{}`", p.name),
            })
    }

    fn step_index(&self, plan: &Plan, name: &str) -> Result<usize, EngineError> {
        plan.step(name)
            .map(|(i, _)| i)
            .ok_or_else(|| EngineError::UnknownStep(name.to_owned()))
    }

    /// Folds one event into the state.
    pub fn apply(&mut self, plan: &Plan, event: &Event) -> Result<(), EngineError> {
        if let Some(status) = self.terminal {
            return Err(EngineError::Terminal(status));
        }
        if event.seq != self.last_seq + 1 {
            return Err(EngineError::OutOfOrder {
                expected: self.last_seq + 1,
                got: event.seq,
            });
        }
        match &event.kind {
            EventKind::SagaStarted { .. } => {
                return Err(EngineError::OutOfOrder {
                    expected: self.last_seq + 1,
                    got: 1,
                });
            }
            EventKind::StepStarted {
                step,
                phase,
                attempt,
            } => {
                let i = self.step_index(plan, step)?;
                let s = &mut self.steps[i];
                s.in_flight = true;
                s.retry_at_ms = None;
                s.deferral = None;
                match phase {
                    Phase::Action => {
                        s.attempts = *attempt;
                        s.status = StepStatus::Running;
                        s.started_at_ms.get_or_insert(event.at_ms);
                    }
                    Phase::Compensation => {
                        s.compensation_attempts = *attempt;
                        s.status = StepStatus::Compensating;
                    }
                }
            }
            EventKind::StepSucceeded {
                step,
                phase,
                attempt,
                output,
            } => {
                let i = self.step_index(plan, step)?;
                let s = &mut self.steps[i];
                check_in_flight(s, step, *phase, *attempt)?;
                s.in_flight = false;
                s.deferred_since_ms = None;
                if *phase == Phase::Action && !s.rerouted {
                    s.primary_reached = true;
                }
                match phase {
                    Phase::Action => {
                        s.status = StepStatus::Succeeded;
                        s.output = Some(output.clone());
                        s.finished_at_ms = Some(event.at_ms);
                    }
                    Phase::Compensation => {
                        s.status = StepStatus::Compensated;
                        s.compensated_at_ms = Some(event.at_ms);
                    }
                }
            }
            EventKind::StepFailed {
                step,
                phase,
                attempt,
                error,
                retry_at_ms,
            } => {
                let i = self.step_index(plan, step)?;
                let s = &mut self.steps[i];
                check_in_flight(s, step, *phase, *attempt)?;
                s.in_flight = false;
                s.deferral = None;
                s.deferred_since_ms = None;
                if *phase == Phase::Action && !s.rerouted && !error.rejected {
                    s.primary_reached = true;
                }
                s.last_error = Some(error.clone());
                s.retry_at_ms = *retry_at_ms;
                s.status = match (phase, retry_at_ms) {
                    (Phase::Action, Some(_)) => StepStatus::Retrying,
                    (Phase::Action, None) => {
                        s.finished_at_ms = Some(event.at_ms);
                        StepStatus::Failed
                    }
                    (Phase::Compensation, Some(_)) => StepStatus::Compensating,
                    (Phase::Compensation, None) => StepStatus::CompensationFailed,
                };
            }
            EventKind::StepDeferred {
                step,
                phase,
                attempt,
                reason,
                deadline_ms,
            } => {
                let i = self.step_index(plan, step)?;
                let s = &mut self.steps[i];
                check_in_flight(s, step, *phase, *attempt)?;
                s.in_flight = false;
                s.deferred_since_ms.get_or_insert(event.at_ms);
                s.deferral = Some(Deferral {
                    phase: *phase,
                    attempt: *attempt,
                    reason: reason.clone(),
                    deadline_ms: *deadline_ms,
                });
            }
            EventKind::StepRerouted { step, attempt, .. } => {
                let i = self.step_index(plan, step)?;
                let s = &mut self.steps[i];
                check_in_flight(s, step, Phase::Action, *attempt)?;
                if s.primary_reached || plan.steps[i].fallback.is_none() {
                    return Err(EngineError::NotInFlight {
                        step: step.clone(),
                        phase: Phase::Action,
                        attempt: *attempt,
                    });
                }
                s.in_flight = false;
                s.rerouted = true;
            }
            EventKind::CancelRequested { reason } => {
                self.cancel_reason = Some(reason.clone());
            }
            EventKind::CompensationStarted { reason } => {
                self.compensating = true;
                self.reason = Some(reason.clone());
            }
            EventKind::SagaCompleted => self.terminal = Some(SagaStatus::Completed),
            EventKind::SagaCompensated => self.terminal = Some(SagaStatus::Compensated),
            EventKind::SagaFailed { reason } => {
                self.terminal = Some(SagaStatus::Failed);
                self.reason = Some(reason.clone());
            }
        }
        self.last_seq = event.seq;
        self.updated_at_ms = event.at_ms;
        Ok(())
    }

    fn event(&self, now_ms: u64, kind: EventKind) -> Event {
        Event {
            seq: self.last_seq + 1,
            at_ms: now_ms,
            kind,
        }
    }

    /// The JSON that request mappings are rendered against.
    pub fn context(&self, plan: &Plan) -> Value {
        let steps: serde_json::Map<String, Value> = plan
            .steps
            .iter()
            .zip(&self.steps)
            .filter_map(|(p, s)| {
                s.output
                    .as_ref()
                    .map(|o| (p.name.clone(), json!({ "output": o })))
            })
            .collect();
        json!({
            "input": self.input,
            "steps": steps,
            "saga": {"id": self.id, "definition": self.definition, "version": self.version},
        })
    }

    /// Where a step's calls go: (participant, action, compensation, idempotency key scope).
    /// A rerouted step uses its fallback and the scope `<saga>/<step>/fallback`.
    pub fn route<'p>(
        &self,
        plan: &'p Plan,
        index: usize,
    ) -> (&'p str, &'p CallPlan, Option<&'p CallPlan>, String) {
        let step = &plan.steps[index];
        match (&step.fallback, self.steps[index].rerouted) {
            (Some(fallback), true) => (
                fallback.participant.as_str(),
                &fallback.action,
                fallback.compensation.as_ref(),
                format!("{}/{}/fallback", self.id, step.name),
            ),
            _ => (
                step.participant.as_str(),
                &step.action,
                step.compensation.as_ref(),
                format!("{}/{}", self.id, step.name),
            ),
        }
    }

    fn call(&self, plan: &Plan, index: usize, phase: Phase, attempt: u32) -> Call {
        let step = &plan.steps[index];
        let (participant, action, compensation, scope) = self.route(plan, index);
        let spec: &CallPlan = match phase {
            Phase::Action => action,
            // `next` asks for a compensation call only for steps that have one.
            Phase::Compensation => compensation.unwrap_or(action),
        };
        Call {
            step_index: index,
            step: step.name.clone(),
            phase,
            attempt,
            participant: participant.to_owned(),
            method: spec.method.clone(),
            request: template::render(&spec.request, &self.context(plan)),
            idempotency_key: format!("{scope}/{}", phase.as_str()),
            timeout_ms: step.timeout.as_millis() as u64,
        }
    }

    /// What the runtime should do now. Pure: the same state, plan and time give the same
    /// answer.
    pub fn next(&self, plan: &Plan, now_ms: u64) -> Next {
        if self.terminal.is_some() {
            return Next::Done;
        }
        if self.compensating {
            return self.next_compensation(plan, now_ms);
        }
        if let Some(reason) = &self.cancel_reason {
            return Next::Record(self.event(
                now_ms,
                EventKind::CompensationStarted {
                    reason: format!("cancelled: {reason}"),
                },
            ));
        }
        for (index, (step, plan_step)) in self.steps.iter().zip(&plan.steps).enumerate() {
            match step.status {
                StepStatus::Succeeded => continue,
                StepStatus::Pending => {
                    return Next::Record(self.event(
                        now_ms,
                        EventKind::StepStarted {
                            step: plan_step.name.clone(),
                            phase: Phase::Action,
                            attempt: 1,
                        },
                    ));
                }
                StepStatus::Running if step.deferral.is_some() => {
                    return self.deferred(plan, index, now_ms);
                }
                // Rerouted to the fallback: the next attempt goes there.
                StepStatus::Running if !step.in_flight => {
                    return Next::Record(self.event(
                        now_ms,
                        EventKind::StepStarted {
                            step: plan_step.name.clone(),
                            phase: Phase::Action,
                            attempt: step.attempts + 1,
                        },
                    ));
                }
                StepStatus::Running => {
                    return Next::Call(self.call(plan, index, Phase::Action, step.attempts));
                }
                StepStatus::Retrying => {
                    let until = step.retry_at_ms.unwrap_or(0);
                    if now_ms < until {
                        return Next::Sleep {
                            until_ms: until,
                            reason: format!("retry of step `{}`", plan_step.name),
                        };
                    }
                    return Next::Record(self.event(
                        now_ms,
                        EventKind::StepStarted {
                            step: plan_step.name.clone(),
                            phase: Phase::Action,
                            attempt: step.attempts + 1,
                        },
                    ));
                }
                StepStatus::Failed => {
                    let error = step
                        .last_error
                        .as_ref()
                        .map_or_else(|| "unknown error".to_owned(), ToString::to_string);
                    let kind = if plan_step.kind == StepKind::Retriable {
                        EventKind::SagaFailed {
                            reason: format!(
                                "retriable step `{}` failed for good after the pivot: {error}",
                                plan_step.name
                            ),
                        }
                    } else {
                        EventKind::CompensationStarted {
                            reason: format!("step `{}` failed: {error}", plan_step.name),
                        }
                    };
                    return Next::Record(self.event(now_ms, kind));
                }
                StepStatus::Compensating
                | StepStatus::Compensated
                | StepStatus::CompensationFailed => {
                    // Compensation states only occur once `compensating` is set.
                    return self.next_compensation(plan, now_ms);
                }
            }
        }
        Next::Record(self.event(now_ms, EventKind::SagaCompleted))
    }

    fn next_compensation(&self, plan: &Plan, now_ms: u64) -> Next {
        for (index, (step, plan_step)) in self.steps.iter().zip(&plan.steps).enumerate().rev() {
            if step.attempts == 0 || self.route(plan, index).2.is_none() {
                continue;
            }
            match step.status {
                StepStatus::Compensated => continue,
                StepStatus::CompensationFailed => {
                    let error = step
                        .last_error
                        .as_ref()
                        .map_or_else(|| "unknown error".to_owned(), ToString::to_string);
                    return Next::Record(self.event(
                        now_ms,
                        EventKind::SagaFailed {
                            reason: format!(
                                "compensation of step `{}` failed after {} attempt(s): {error}",
                                plan_step.name, step.compensation_attempts
                            ),
                        },
                    ));
                }
                StepStatus::Compensating if step.deferral.is_some() => {
                    return self.deferred(plan, index, now_ms);
                }
                StepStatus::Compensating if step.in_flight => {
                    return Next::Call(self.call(
                        plan,
                        index,
                        Phase::Compensation,
                        step.compensation_attempts,
                    ));
                }
                StepStatus::Compensating => {
                    let until = step.retry_at_ms.unwrap_or(0);
                    if now_ms < until {
                        return Next::Sleep {
                            until_ms: until,
                            reason: format!(
                                "retry of the compensation of step `{}`",
                                plan_step.name
                            ),
                        };
                    }
                    return Next::Record(self.event(
                        now_ms,
                        EventKind::StepStarted {
                            step: plan_step.name.clone(),
                            phase: Phase::Compensation,
                            attempt: step.compensation_attempts + 1,
                        },
                    ));
                }
                // The action was attempted (whatever its outcome): undo it.
                StepStatus::Running
                | StepStatus::Retrying
                | StepStatus::Succeeded
                | StepStatus::Failed
                | StepStatus::Pending => {
                    return Next::Record(self.event(
                        now_ms,
                        EventKind::StepStarted {
                            step: plan_step.name.clone(),
                            phase: Phase::Compensation,
                            attempt: 1,
                        },
                    ));
                }
            }
        }
        Next::Record(self.event(now_ms, EventKind::SagaCompensated))
    }

    /// The event recording the outcome of an in-flight call. `jitter` in `[0, 1)` comes from
    /// the runtime's randomness and spreads the retry time.
    pub fn on_result(
        &self,
        plan: &Plan,
        call: &Call,
        result: Result<Value, CallError>,
        now_ms: u64,
        jitter: f64,
    ) -> Result<Event, EngineError> {
        let index = self.step_index(plan, &call.step)?;
        let state = &self.steps[index];
        check_in_flight(state, &call.step, call.phase, call.attempt)?;
        let plan_step: &StepPlan = &plan.steps[index];
        let kind = match result {
            Ok(output) => EventKind::StepSucceeded {
                step: call.step.clone(),
                phase: call.phase,
                attempt: call.attempt,
                output,
            },
            Err(error) => {
                let policy: &RetryPolicy = match call.phase {
                    Phase::Action => &plan_step.retry,
                    Phase::Compensation => &plan_step.compensation_retry,
                };
                // Retriable steps come after the pivot: the saga can only go forward, so
                // transient failures are retried without a limit.
                let unlimited =
                    call.phase == Phase::Action && plan_step.kind == StepKind::Retriable;
                if error.rejected {
                    return Ok(self.event(now_ms, self.rejected(plan_step, call, error, now_ms)));
                }
                let again = error.retryable && (unlimited || call.attempt < policy.max_attempts);
                let retry_at_ms =
                    again.then(|| now_ms + policy.backoff(call.attempt, jitter).as_millis() as u64);
                EventKind::StepFailed {
                    step: call.step.clone(),
                    phase: call.phase,
                    attempt: call.attempt,
                    error,
                    retry_at_ms,
                }
            }
        };
        Ok(self.event(now_ms, kind))
    }

    /// The event for a call the breaker rejected (nothing was sent). Actions follow the
    /// step's `on_open`; compensations always wait for the breaker, with no limit.
    fn rejected(
        &self,
        plan_step: &StepPlan,
        call: &Call,
        error: CallError,
        now_ms: u64,
    ) -> EventKind {
        let deferral = match (call.phase, plan_step.on_open) {
            (Phase::Compensation, _) => Some(None),
            (Phase::Action, OnOpen::Defer { max_wait }) => {
                let since = self.steps[call.step_index]
                    .deferred_since_ms
                    .unwrap_or(now_ms);
                Some(Some(since + max_wait.as_millis() as u64))
            }
            (Phase::Action, OnOpen::Fail) => None,
            (Phase::Action, OnOpen::Call) => {
                let state = &self.steps[call.step_index];
                if !state.rerouted && !state.primary_reached && plan_step.fallback.is_some() {
                    return EventKind::StepRerouted {
                        step: call.step.clone(),
                        attempt: call.attempt,
                        reason: format!(
                            "{} rejected the call: circuit open; calling the fallback",
                            call.participant
                        ),
                    };
                }
                None
            }
        };
        match deferral {
            Some(deadline_ms) => EventKind::StepDeferred {
                step: call.step.clone(),
                phase: call.phase,
                attempt: call.attempt,
                reason: format!("{} deferred: circuit open", call.participant),
                deadline_ms,
            },
            None => EventKind::StepFailed {
                step: call.step.clone(),
                phase: call.phase,
                attempt: call.attempt,
                error: CallError {
                    code: CallError::CIRCUIT_OPEN.to_owned(),
                    ..error
                },
                retry_at_ms: None,
            },
        }
    }

    /// What a deferred step does now: fail if its deadline passed, else wait for the breaker.
    fn deferred(&self, plan: &Plan, index: usize, now_ms: u64) -> Next {
        let step = &self.steps[index];
        let plan_step = &plan.steps[index];
        let Some(deferral) = &step.deferral else {
            return Next::Done;
        };
        match deferral.deadline_ms {
            Some(deadline) if now_ms >= deadline => {
                let waited = now_ms.saturating_sub(step.deferred_since_ms.unwrap_or(now_ms));
                Next::Record(self.event(
                    now_ms,
                    EventKind::StepFailed {
                        step: plan_step.name.clone(),
                        phase: deferral.phase,
                        attempt: deferral.attempt,
                        error: CallError {
                            code: CallError::CIRCUIT_OPEN.to_owned(),
                            message: format!(
                                "deferred {waited} ms; the circuit breaker of `{}` stayed open",
                                plan_step.participant
                            ),
                            retryable: false,
                            rejected: true,
                        },
                        retry_at_ms: None,
                    },
                ))
            }
            until_ms => Next::AwaitBreaker {
                step_index: index,
                participant: plan_step.participant.clone(),
                until_ms,
                reason: deferral.reason.clone(),
            },
        }
    }

    /// The event resuming a deferred step (the breaker would now let a call through): the
    /// same attempt, started again. `None` if the step is not deferred.
    pub fn resume(&self, plan: &Plan, step_index: usize, now_ms: u64) -> Option<Event> {
        let deferral = self.steps.get(step_index)?.deferral.as_ref()?;
        Some(self.event(
            now_ms,
            EventKind::StepStarted {
                step: plan.steps.get(step_index)?.name.clone(),
                phase: deferral.phase,
                attempt: deferral.attempt,
            },
        ))
    }

    /// The event recording a cancellation request; `Ok(None)` when the saga is already
    /// compensating because of an earlier cancellation.
    pub fn cancel(
        &self,
        plan: &Plan,
        reason: &str,
        now_ms: u64,
    ) -> Result<Option<Event>, CancelRefused> {
        if let Some(status) = self.terminal {
            return Err(CancelRefused::Terminal(status));
        }
        if self.cancel_reason.is_some() {
            return Ok(None);
        }
        if self.compensating {
            return Err(CancelRefused::Compensating(
                self.reason.clone().unwrap_or_default(),
            ));
        }
        if let Some(pivot) = plan.pivot()
            && self.steps[pivot].status == StepStatus::Succeeded
        {
            return Err(CancelRefused::PastPivot(plan.steps[pivot].name.clone()));
        }
        Ok(Some(self.event(
            now_ms,
            EventKind::CancelRequested {
                reason: reason.to_owned(),
            },
        )))
    }
}

fn check_in_flight(
    state: &StepState,
    step: &str,
    phase: Phase,
    attempt: u32,
) -> Result<(), EngineError> {
    let current = match phase {
        Phase::Action => state.attempts,
        Phase::Compensation => state.compensation_attempts,
    };
    let phase_matches = match phase {
        Phase::Action => state.status == StepStatus::Running,
        Phase::Compensation => state.status == StepStatus::Compensating,
    };
    // A deferred attempt may also end: its deferral expired (the step fails).
    let deferred = state
        .deferral
        .as_ref()
        .is_some_and(|d| d.phase == phase && d.attempt == attempt);
    if (state.in_flight || deferred) && phase_matches && current == attempt {
        Ok(())
    } else {
        Err(EngineError::NotInFlight {
            step: step.to_owned(),
            phase,
            attempt,
        })
    }
}
