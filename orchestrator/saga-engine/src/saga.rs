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

use crate::definition::{CallPlan, OnOpen, OnTimeout, Plan, RetryPolicy, StepKind, StepPlan};
use crate::duration::format_time;
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
    /// The error code of an await step failed by one of its `fail_on` signals.
    pub const SIGNALLED: &'static str = "SIGNALLED";
    /// The error code of a step whose `when` could not be evaluated.
    pub const CONDITION_ERROR: &'static str = "CONDITION_ERROR";
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Where a saga's trace is: its trace id and the span id of its first root span (W3C
/// hex: 32 and 16 characters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRef {
    pub trace_id: String,
    pub span_id: String,
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
        /// The saga's trace (when traces are exported): every run of the saga, also after
        /// a restart, joins it, so one saga is one trace.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace: Option<TraceRef>,
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
    /// An await step took a signal: it succeeds (its signal) or fails (a `fail_on` signal).
    SignalReceived {
        step: String,
        signal: String,
        payload: Value,
    },
    /// A signal arrived before the saga waited for it; kept until the await step starts.
    SignalBuffered {
        signal: String,
        payload: Value,
    },
    /// An await step's timeout passed without a signal.
    StepTimedOut {
        step: String,
    },
    /// A step that will not run: its `when` was false, or an await's timeout continued past it.
    StepSkipped {
        step: String,
        reason: String,
    },
    /// A step's `when` condition could not be evaluated: the step fails.
    ConditionFailed {
        step: String,
        error: String,
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
            EventKind::SignalReceived { .. } => "signal_received",
            EventKind::SignalBuffered { .. } => "signal_buffered",
            EventKind::StepTimedOut { .. } => "step_timed_out",
            EventKind::StepSkipped { .. } => "step_skipped",
            EventKind::ConditionFailed { .. } => "condition_failed",
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
    /// An await step waiting for its signal.
    Waiting,
    /// Not run (a false `when`, or skipped by an await's `on_timeout: continue`).
    Skipped,
}

impl StepStatus {
    /// The action is over for good (it succeeded or will not run).
    fn is_done(self) -> bool {
        matches!(self, StepStatus::Succeeded | StepStatus::Skipped)
    }
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
    /// `seq` of the last event of the step's action: compensations run in reverse order of
    /// it (for a parallel group, reverse order of completion).
    pub last_action_seq: u64,
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
            last_action_seq: 0,
        }
    }
}

/// A signal received before the saga waited for it.
#[derive(Debug, Clone, PartialEq)]
pub struct BufferedSignal {
    pub signal: String,
    pub payload: Value,
    pub at_ms: u64,
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
    /// Nothing to record now: have these calls in flight and wait for what comes first.
    Wait(Wait),
    /// The saga is terminal.
    Done,
}

/// What a saga waits for. The runtime makes every call of `calls` that is not already in
/// flight, then asks [`Saga::next`] again when a call ends, at `wake_at_ms`, when a
/// breaker of `breakers` lets calls through (after [`Saga::resume`]), or when a signal or
/// a cancellation is recorded.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Wait {
    /// Calls whose intent is stored: each must be in flight.
    pub calls: Vec<Call>,
    /// The earliest time something is due (a retry, a timeout, a deadline).
    pub wake_at_ms: Option<u64>,
    /// Steps deferred by an open breaker: (step index, participant).
    pub breakers: Vec<(usize, String)>,
    /// Signals awaited now.
    pub signals: Vec<String>,
}

impl Wait {
    fn wake(&mut self, at_ms: u64) {
        self.wake_at_ms = Some(self.wake_at_ms.map_or(at_ms, |w| w.min(at_ms)));
    }
}

/// The outcome of [`Saga::signal`].
#[derive(Debug, Clone, PartialEq)]
pub enum SignalOutcome {
    /// Record this event: the signal is taken now (`buffered` false) or kept until its
    /// await step starts (`buffered` true).
    Record {
        event: Event,
        step: String,
        buffered: bool,
    },
    /// The same signal with the same payload was already delivered: nothing to do.
    Duplicate { step: String },
}

/// Why a signal is refused. Nothing is recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalRefused {
    #[error("definition has no await step for signal `{signal}` (it accepts: {known})")]
    Unknown { signal: String, known: String },
    #[error("saga is already {}", .0.as_str())]
    Terminal(SagaStatus),
    #[error("saga is compensating and takes no more signals: {0}")]
    Compensating(String),
    #[error("saga is not waiting for signal `{signal}`: {why}")]
    NotWaiting { signal: String, why: String },
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
    #[error("step `{step}` is not waiting for signal `{signal}`")]
    NotWaiting { step: String, signal: String },
    #[error("step `{0}` has already started")]
    NotPending(String),
}

/// The step of an event about a step's action (not its compensation).
fn action_step(kind: &EventKind) -> Option<&str> {
    match kind {
        EventKind::StepStarted { step, phase, .. }
        | EventKind::StepSucceeded { step, phase, .. }
        | EventKind::StepFailed { step, phase, .. }
        | EventKind::StepDeferred { step, phase, .. } => {
            (*phase == Phase::Action).then_some(step.as_str())
        }
        EventKind::StepRerouted { step, .. }
        | EventKind::SignalReceived { step, .. }
        | EventKind::StepTimedOut { step }
        | EventKind::StepSkipped { step, .. }
        | EventKind::ConditionFailed { step, .. } => Some(step),
        _ => None,
    }
}

/// Why a cancellation is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelRefused {
    #[error("saga is already {}", .0.as_str())]
    Terminal(SagaStatus),
    #[error("saga reached its pivot step `{0}` and can no longer be cancelled")]
    PastPivot(String),
    #[error("saga is already compensating: {0}")]
    Compensating(String),
    #[error("step `{0}` is done, and the definition allows cancelling only until then")]
    PastPoint(String),
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
    /// Signals received before the saga waited for them.
    pub buffered: Vec<BufferedSignal>,
    /// Signals taken by await steps, with their payloads (to recognise a repeated one).
    pub received: Vec<(String, Value)>,
    /// When the whole saga's deadline passes, if the definition sets one.
    pub deadline_ms: Option<u64>,
    /// The saga's trace, if it was started with one.
    pub trace: Option<TraceRef>,
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
        Saga::start_event_traced(plan, saga_id, input, idempotency_key, now_ms, None)
    }

    /// [`Saga::start_event`] with the trace the saga belongs to.
    pub fn start_event_traced(
        plan: &Plan,
        saga_id: &str,
        input: Value,
        idempotency_key: &str,
        now_ms: u64,
        trace: Option<TraceRef>,
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
                trace,
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
            trace,
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
            buffered: Vec::new(),
            received: Vec::new(),
            trace: trace.clone(),
            deadline_ms: plan
                .deadline
                .map(|d| first.at_ms.saturating_add(d.as_millis() as u64)),
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
        } else if self.steps.iter().any(|s| s.in_flight) {
            SagaStatus::Running
        } else if self.steps.iter().any(|s| {
            matches!(s.status, StepStatus::Retrying | StepStatus::Waiting) || s.deferral.is_some()
        }) {
            SagaStatus::Waiting
        } else {
            SagaStatus::Running
        }
    }

    /// The signals the saga's await steps wait for now.
    pub fn awaiting_signals(&self, plan: &Plan) -> Vec<String> {
        if self.terminal.is_some() || self.compensating {
            return Vec::new();
        }
        self.steps
            .iter()
            .zip(&plan.steps)
            .filter(|(s, _)| s.status == StepStatus::Waiting)
            .filter_map(|(_, p)| p.awaits())
            .flat_map(|a| std::iter::once(a.signal.clone()).chain(a.fail_on.iter().cloned()))
            .collect()
    }

    /// For a WAITING saga, what it waits for.
    pub fn waiting_for(&self, plan: &Plan) -> Option<String> {
        if self.status() != SagaStatus::Waiting {
            return None;
        }
        let mut waits = Vec::new();
        for (s, p) in self.steps.iter().zip(&plan.steps) {
            if s.status == StepStatus::Waiting
                && let Some(a) = p.awaits()
            {
                let mut text = format!("signal `{}`", a.signal);
                for other in &a.fail_on {
                    text.push_str(&format!(" or `{other}`"));
                }
                text.push_str(&format!(" (step `{}`", p.name));
                match (a.timeout, s.started_at_ms) {
                    (Some(t), Some(at)) => text.push_str(&format!(
                        ", until {})",
                        format_time(at.saturating_add(t.as_millis() as u64))
                    )),
                    _ => text.push(')'),
                }
                waits.push(text);
            } else if let Some(deferral) = &s.deferral {
                waits.push(match deferral.deadline_ms {
                    Some(at) => format!(
                        "step `{}` deferred: {} (until {})",
                        p.name,
                        deferral.reason,
                        format_time(at)
                    ),
                    None => format!("step `{}` deferred: {}", p.name, deferral.reason),
                });
            } else if s.status == StepStatus::Retrying {
                waits.push(match s.retry_at_ms {
                    Some(at) => format!("retry of step `{}` at {}", p.name, format_time(at)),
                    None => format!("retry of step `{}`", p.name),
                });
            }
        }
        (!waits.is_empty()).then(|| waits.join("; "))
    }

    /// The first step whose action is not done (the saga's current step), if any.
    fn frontier(&self) -> Option<usize> {
        self.steps.iter().position(|s| !s.status.is_done())
    }

    /// The order's status in the customer's words, as the definition declares it: the
    /// current step's `status` (or the nearest earlier one that has one), or the outcome's.
    pub fn business_status(&self, plan: &Plan) -> String {
        let statuses = &plan.statuses;
        let pick = |custom: &Option<String>, default: &str| {
            custom.clone().unwrap_or_else(|| default.to_owned())
        };
        match self.terminal {
            Some(SagaStatus::Completed) => return pick(&statuses.completed, "completed"),
            Some(SagaStatus::Compensated) if self.cancel_reason.is_some() => {
                return pick(&statuses.cancelled, "cancelled");
            }
            Some(SagaStatus::Compensated) => {
                return pick(&statuses.compensated, "could not be completed; rolled back");
            }
            Some(_) => return pick(&statuses.failed, "needs attention"),
            None => {}
        }
        if self.compensating {
            return pick(&statuses.compensating, "cancelling");
        }
        let current = self
            .frontier()
            .unwrap_or(self.steps.len().saturating_sub(1));
        (0..=current)
            .rev()
            .filter(|&i| {
                self.steps
                    .get(i)
                    .is_some_and(|s| s.status != StepStatus::Skipped)
            })
            .find_map(|i| plan.steps.get(i).and_then(|p| p.status.clone()))
            .unwrap_or_else(|| "in progress".to_owned())
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
                let is_await = plan.steps[i].awaits().is_some();
                let s = &mut self.steps[i];
                if is_await && (*phase != Phase::Action || s.status != StepStatus::Pending) {
                    return Err(EngineError::NotInFlight {
                        step: step.clone(),
                        phase: *phase,
                        attempt: *attempt,
                    });
                }
                s.in_flight = !is_await;
                s.retry_at_ms = None;
                s.deferral = None;
                match phase {
                    Phase::Action if is_await => {
                        s.attempts = *attempt;
                        s.status = StepStatus::Waiting;
                        s.started_at_ms.get_or_insert(event.at_ms);
                    }
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
                if s.primary_reached || plan.steps[i].call().is_none_or(|c| c.fallback.is_none()) {
                    return Err(EngineError::NotInFlight {
                        step: step.clone(),
                        phase: Phase::Action,
                        attempt: *attempt,
                    });
                }
                s.in_flight = false;
                s.rerouted = true;
            }
            EventKind::SignalReceived {
                step,
                signal,
                payload,
            } => {
                let i = self.step_index(plan, step)?;
                let accepts = plan.steps[i]
                    .awaits()
                    .map(|a| (a.signal == *signal, a.accepts(signal)));
                let s = &mut self.steps[i];
                let Some((success, true)) = accepts.filter(|_| s.status == StepStatus::Waiting)
                else {
                    return Err(EngineError::NotWaiting {
                        step: step.clone(),
                        signal: signal.clone(),
                    });
                };
                s.output = Some(json!({"signal": signal, "payload": payload, "timed_out": false}));
                s.finished_at_ms = Some(event.at_ms);
                if success {
                    s.status = StepStatus::Succeeded;
                } else {
                    s.status = StepStatus::Failed;
                    s.last_error = Some(CallError {
                        code: CallError::SIGNALLED.to_owned(),
                        message: format!("signal `{signal}` received"),
                        retryable: false,
                        rejected: false,
                    });
                }
                self.buffered.retain(|b| b.signal != *signal);
                self.received.push((signal.clone(), payload.clone()));
            }
            EventKind::SignalBuffered { signal, payload } => {
                self.buffered.push(BufferedSignal {
                    signal: signal.clone(),
                    payload: payload.clone(),
                    at_ms: event.at_ms,
                });
            }
            EventKind::StepTimedOut { step } => {
                let i = self.step_index(plan, step)?;
                let Some(wait) = plan.steps[i].awaits() else {
                    return Err(EngineError::NotWaiting {
                        step: step.clone(),
                        signal: String::new(),
                    });
                };
                if self.steps[i].status != StepStatus::Waiting {
                    return Err(EngineError::NotWaiting {
                        step: step.clone(),
                        signal: wait.signal.clone(),
                    });
                }
                let s = &mut self.steps[i];
                s.finished_at_ms = Some(event.at_ms);
                match wait.on_timeout {
                    OnTimeout::Fail => {
                        s.status = StepStatus::Failed;
                        s.last_error = Some(CallError {
                            code: "DEADLINE_EXCEEDED".to_owned(),
                            message: format!(
                                "no signal `{}` within {} ms",
                                wait.signal,
                                wait.timeout.map_or(0, |t| t.as_millis())
                            ),
                            retryable: false,
                            rejected: false,
                        });
                    }
                    OnTimeout::Continue { at } => {
                        s.status = StepStatus::Succeeded;
                        s.output =
                            Some(json!({"signal": null, "payload": null, "timed_out": true}));
                        for skipped in self.steps.iter_mut().take(at).skip(i + 1) {
                            if skipped.status == StepStatus::Pending {
                                skipped.status = StepStatus::Skipped;
                            }
                        }
                    }
                }
            }
            EventKind::StepSkipped { step, .. } => {
                let i = self.step_index(plan, step)?;
                let s = &mut self.steps[i];
                if s.status != StepStatus::Pending {
                    return Err(EngineError::NotPending(step.clone()));
                }
                s.status = StepStatus::Skipped;
            }
            EventKind::ConditionFailed { step, error } => {
                let i = self.step_index(plan, step)?;
                let s = &mut self.steps[i];
                if s.status != StepStatus::Pending {
                    return Err(EngineError::NotPending(step.clone()));
                }
                s.status = StepStatus::Failed;
                s.finished_at_ms = Some(event.at_ms);
                s.last_error = Some(CallError {
                    code: CallError::CONDITION_ERROR.to_owned(),
                    message: error.clone(),
                    retryable: false,
                    rejected: false,
                });
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
        if let Some(step) = action_step(&event.kind)
            && let Some((i, _)) = plan.step(step)
        {
            self.steps[i].last_action_seq = event.seq;
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

    /// Where a call step's calls go: (participant, action, compensation, idempotency key
    /// scope). A rerouted step uses its fallback and the scope `<saga>/<step>/fallback`.
    /// `None` for an await step.
    pub fn route<'p>(&self, plan: &'p Plan, index: usize) -> Option<Route<'p>> {
        let step = plan.steps.get(index)?;
        let call = step.call()?;
        Some(
            match (
                &call.fallback,
                self.steps.get(index).is_some_and(|s| s.rerouted),
            ) {
                (Some(fallback), true) => (
                    fallback.participant.as_str(),
                    &fallback.action,
                    fallback.compensation.as_ref(),
                    format!("{}/{}/fallback", self.id, step.name),
                ),
                _ => (
                    call.participant.as_str(),
                    &call.action,
                    call.compensation.as_ref(),
                    format!("{}/{}", self.id, step.name),
                ),
            },
        )
    }

    /// The call of attempt `attempt` of a call step; `None` for an await step.
    fn call(&self, plan: &Plan, index: usize, phase: Phase, attempt: u32) -> Option<Call> {
        let step = &plan.steps[index];
        let timeout = step.call()?.timeout;
        let (participant, action, compensation, scope) = self.route(plan, index)?;
        let spec: &CallPlan = match phase {
            Phase::Action => action,
            // `next` asks for a compensation call only for steps that have one.
            Phase::Compensation => compensation.unwrap_or(action),
        };
        Some(Call {
            step_index: index,
            step: step.name.clone(),
            phase,
            attempt,
            participant: participant.to_owned(),
            method: spec.method.clone(),
            request: template::render(&spec.request, &self.context(plan)),
            idempotency_key: format!("{scope}/{}", phase.as_str()),
            timeout_ms: timeout.as_millis() as u64,
        })
    }

    /// Whether the pivot step (if any) has succeeded: the saga can only go forward.
    pub fn past_pivot(&self, plan: &Plan) -> bool {
        plan.pivot()
            .is_some_and(|p| self.steps[p].status == StepStatus::Succeeded)
    }

    /// Whether the pivot's action was attempted: from then on its outcome (perhaps unknown)
    /// decides, so neither the deadline nor a cancellation may compensate around it.
    /// (An await pivot has no effect while it waits: it counts once its signal came.)
    pub fn pivot_attempted(&self, plan: &Plan) -> bool {
        plan.pivot().is_some_and(|p| {
            let state = &self.steps[p];
            match plan.steps[p].awaits() {
                Some(_) => !matches!(state.status, StepStatus::Pending | StepStatus::Waiting),
                None => state.attempts > 0,
            }
        })
    }

    /// The action calls in flight now (their results are awaited).
    fn calls_in_flight(&self, plan: &Plan) -> Vec<Call> {
        self.steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.in_flight && s.status == StepStatus::Running)
            .filter_map(|(i, s)| self.call(plan, i, Phase::Action, s.attempts))
            .collect()
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
        // Reasons to stop going forward. Calls in flight are awaited first: compensation
        // never overtakes an action whose outcome is still coming.
        let stop = if let Some(reason) = &self.cancel_reason {
            Some(EventKind::CompensationStarted {
                reason: format!("cancelled: {reason}"),
            })
        } else if let Some(deadline) = self.deadline_ms
            && now_ms >= deadline
            && !self.pivot_attempted(plan)
        {
            Some(EventKind::CompensationStarted {
                reason: format!(
                    "the saga's deadline of {} ms passed",
                    plan.deadline.map_or(0, |d| d.as_millis())
                ),
            })
        } else {
            self.steps
                .iter()
                .zip(&plan.steps)
                .find(|(s, _)| s.status == StepStatus::Failed)
                .map(|(step, plan_step)| {
                    let error = step
                        .last_error
                        .as_ref()
                        .map_or_else(|| "unknown error".to_owned(), ToString::to_string);
                    if plan_step.kind == StepKind::Retriable {
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
                    }
                })
        };
        if let Some(kind) = stop {
            let calls = self.calls_in_flight(plan);
            if calls.is_empty() {
                return Next::Record(self.event(now_ms, kind));
            }
            return Next::Wait(Wait {
                calls,
                ..Wait::default()
            });
        }
        let Some(frontier) = self.frontier() else {
            return Next::Record(self.event(now_ms, EventKind::SagaCompleted));
        };
        let mut wait = Wait::default();
        for index in plan.group_of(frontier) {
            let step = &self.steps[index];
            let plan_step = &plan.steps[index];
            let started = |attempt| {
                Next::Record(self.event(
                    now_ms,
                    EventKind::StepStarted {
                        step: plan_step.name.clone(),
                        phase: Phase::Action,
                        attempt,
                    },
                ))
            };
            match step.status {
                StepStatus::Succeeded | StepStatus::Skipped => {}
                StepStatus::Pending => {
                    if let Some(condition) = &plan_step.when {
                        match condition.eval(&self.context(plan)) {
                            Ok(true) => {}
                            Ok(false) => {
                                return Next::Record(self.event(
                                    now_ms,
                                    EventKind::StepSkipped {
                                        step: plan_step.name.clone(),
                                        reason: format!("`when: {}` is false", condition.source()),
                                    },
                                ));
                            }
                            Err(error) => {
                                return Next::Record(self.event(
                                    now_ms,
                                    EventKind::ConditionFailed {
                                        step: plan_step.name.clone(),
                                        error: error.to_string(),
                                    },
                                ));
                            }
                        }
                    }
                    return started(1);
                }
                StepStatus::Waiting => {
                    let Some(awaits) = plan_step.awaits() else {
                        continue;
                    };
                    // A signal that came early is taken first, in the order of arrival.
                    if let Some(early) = self.buffered.iter().find(|b| awaits.accepts(&b.signal)) {
                        return Next::Record(self.event(
                            now_ms,
                            EventKind::SignalReceived {
                                step: plan_step.name.clone(),
                                signal: early.signal.clone(),
                                payload: early.payload.clone(),
                            },
                        ));
                    }
                    if let (Some(timeout), Some(since)) = (awaits.timeout, step.started_at_ms) {
                        let at = since.saturating_add(timeout.as_millis() as u64);
                        if now_ms >= at {
                            return Next::Record(self.event(
                                now_ms,
                                EventKind::StepTimedOut {
                                    step: plan_step.name.clone(),
                                },
                            ));
                        }
                        wait.wake(at);
                    }
                    wait.signals.push(awaits.signal.clone());
                    wait.signals.extend(awaits.fail_on.iter().cloned());
                }
                StepStatus::Running if step.deferral.is_some() => {
                    match self.deferred(plan, index, now_ms) {
                        Ok(event) => return Next::Record(event),
                        Err(until_ms) => {
                            wait.breakers
                                .push((index, plan_step.participant().to_owned()));
                            if let Some(at) = until_ms {
                                wait.wake(at);
                            }
                        }
                    }
                }
                // Rerouted to the fallback: the next attempt goes there.
                StepStatus::Running if !step.in_flight => return started(step.attempts + 1),
                StepStatus::Running => {
                    if let Some(call) = self.call(plan, index, Phase::Action, step.attempts) {
                        wait.calls.push(call);
                    }
                }
                StepStatus::Retrying => {
                    let until = step.retry_at_ms.unwrap_or(0);
                    if now_ms >= until {
                        return started(step.attempts + 1);
                    }
                    wait.wake(until);
                }
                // Failures stop the saga above; compensation states only occur once
                // `compensating` is set.
                StepStatus::Failed
                | StepStatus::Compensating
                | StepStatus::Compensated
                | StepStatus::CompensationFailed => {}
            }
        }
        if let Some(deadline) = self.deadline_ms
            && !self.pivot_attempted(plan)
        {
            wait.wake(deadline);
        }
        Next::Wait(wait)
    }

    /// Steps to compensate, in the order to compensate them: every step whose action was
    /// attempted and that has a compensation on its route, latest action first.
    fn compensation_order(&self, plan: &Plan) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.steps.len())
            .filter(|&i| {
                self.steps[i].attempts > 0 && self.route(plan, i).is_some_and(|r| r.2.is_some())
            })
            .collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.steps[i].last_action_seq));
        order
    }

    fn next_compensation(&self, plan: &Plan, now_ms: u64) -> Next {
        for index in self.compensation_order(plan) {
            let step = &self.steps[index];
            let plan_step = &plan.steps[index];
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
                    return match self.deferred(plan, index, now_ms) {
                        Ok(event) => Next::Record(event),
                        Err(until_ms) => Next::Wait(Wait {
                            breakers: vec![(index, plan_step.participant().to_owned())],
                            wake_at_ms: until_ms,
                            ..Wait::default()
                        }),
                    };
                }
                StepStatus::Compensating if step.in_flight => {
                    return Next::Wait(Wait {
                        calls: self
                            .call(plan, index, Phase::Compensation, step.compensation_attempts)
                            .into_iter()
                            .collect(),
                        ..Wait::default()
                    });
                }
                StepStatus::Compensating => {
                    let until = step.retry_at_ms.unwrap_or(0);
                    if now_ms < until {
                        return Next::Wait(Wait {
                            wake_at_ms: Some(until),
                            ..Wait::default()
                        });
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
                | StepStatus::Pending
                | StepStatus::Waiting
                | StepStatus::Skipped => {
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
        let Some(call_step) = plan_step.call() else {
            return Err(EngineError::NotInFlight {
                step: call.step.clone(),
                phase: call.phase,
                attempt: call.attempt,
            });
        };
        let kind = match result {
            Ok(output) => EventKind::StepSucceeded {
                step: call.step.clone(),
                phase: call.phase,
                attempt: call.attempt,
                output,
            },
            Err(error) => {
                let policy: &RetryPolicy = match call.phase {
                    Phase::Action => &call_step.retry,
                    Phase::Compensation => &call_step.compensation_retry,
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
        let (on_open, has_fallback) = plan_step
            .call()
            .map_or((OnOpen::Fail, false), |c| (c.on_open, c.fallback.is_some()));
        let deferral = match (call.phase, on_open) {
            (Phase::Compensation, _) => Some(None),
            // After the pivot the saga only goes forward: a retriable step waits for the
            // breaker as long as it takes, whatever its `on_open`.
            (Phase::Action, _) if plan_step.kind == StepKind::Retriable => Some(None),
            (Phase::Action, OnOpen::Defer { max_wait }) => {
                let since = self.steps[call.step_index]
                    .deferred_since_ms
                    .unwrap_or(now_ms);
                Some(Some(since + max_wait.as_millis() as u64))
            }
            (Phase::Action, OnOpen::Fail) => None,
            (Phase::Action, OnOpen::Call) => {
                let state = &self.steps[call.step_index];
                if !state.rerouted && !state.primary_reached && has_fallback {
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

    /// A deferred step: `Ok(event)` failing it if its deadline passed, else `Err(deadline)`
    /// (keep waiting for the breaker, until the deadline if there is one).
    fn deferred(&self, plan: &Plan, index: usize, now_ms: u64) -> Result<Event, Option<u64>> {
        let step = &self.steps[index];
        let plan_step = &plan.steps[index];
        let Some(deferral) = &step.deferral else {
            return Err(None);
        };
        match deferral.deadline_ms {
            Some(deadline) if now_ms >= deadline => {
                let waited = now_ms.saturating_sub(step.deferred_since_ms.unwrap_or(now_ms));
                Ok(self.event(
                    now_ms,
                    EventKind::StepFailed {
                        step: plan_step.name.clone(),
                        phase: deferral.phase,
                        attempt: deferral.attempt,
                        error: CallError {
                            code: CallError::CIRCUIT_OPEN.to_owned(),
                            message: format!(
                                "deferred {waited} ms; the circuit breaker of `{}` stayed open",
                                plan_step.participant()
                            ),
                            retryable: false,
                            rejected: true,
                        },
                        retry_at_ms: None,
                    },
                ))
            }
            until_ms => Err(until_ms),
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
        if let Some(point) = plan.cancellable_until
            && self.steps[point].status.is_done()
        {
            return Err(CancelRefused::PastPoint(plan.steps[point].name.clone()));
        }
        if self.pivot_attempted(plan)
            && let Some(pivot) = plan.pivot()
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

    /// What delivering `signal` with `payload` does: take it now (its await step waits),
    /// keep it for later (its await step has not started yet), recognise it as a repeat, or
    /// refuse it.
    pub fn signal(
        &self,
        plan: &Plan,
        signal: &str,
        payload: &Value,
        now_ms: u64,
    ) -> Result<SignalOutcome, SignalRefused> {
        let Some((index, plan_step)) = plan
            .steps
            .iter()
            .enumerate()
            .find(|(_, s)| s.awaits().is_some_and(|a| a.accepts(signal)))
        else {
            let known = plan.signals();
            return Err(SignalRefused::Unknown {
                signal: signal.to_owned(),
                known: if known.is_empty() {
                    "no signals".to_owned()
                } else {
                    known.join(", ")
                },
            });
        };
        let step = plan_step.name.clone();
        let same = |(s, p): &(String, Value)| s == signal && p == payload;
        if self.received.iter().any(same)
            || self
                .buffered
                .iter()
                .any(|b| b.signal == signal && b.payload == *payload)
        {
            return Ok(SignalOutcome::Duplicate { step });
        }
        if let Some(status) = self.terminal {
            return Err(SignalRefused::Terminal(status));
        }
        if self.compensating || self.cancel_reason.is_some() {
            return Err(SignalRefused::Compensating(
                self.reason
                    .clone()
                    .or_else(|| self.cancel_reason.clone())
                    .unwrap_or_default(),
            ));
        }
        let not_waiting = |why: String| {
            Err(SignalRefused::NotWaiting {
                signal: signal.to_owned(),
                why,
            })
        };
        let accepts = |s: &str| plan_step.awaits().is_some_and(|a| a.accepts(s));
        let state = &self.steps[index];
        match state.status {
            StepStatus::Waiting => Ok(SignalOutcome::Record {
                event: self.event(
                    now_ms,
                    EventKind::SignalReceived {
                        step: step.clone(),
                        signal: signal.to_owned(),
                        payload: payload.clone(),
                    },
                ),
                step,
                buffered: false,
            }),
            StepStatus::Pending => {
                if let Some(first) = self.buffered.iter().find(|b| accepts(&b.signal)) {
                    return not_waiting(format!(
                        "step `{step}` already has signal `{}` kept for it",
                        first.signal
                    ));
                }
                Ok(SignalOutcome::Record {
                    event: self.event(
                        now_ms,
                        EventKind::SignalBuffered {
                            signal: signal.to_owned(),
                            payload: payload.clone(),
                        },
                    ),
                    step,
                    buffered: true,
                })
            }
            StepStatus::Skipped => not_waiting(format!("step `{step}` was skipped")),
            _ => {
                let how = match self.received.iter().find(|(s, _)| accepts(s)) {
                    Some((s, _)) if s == signal => {
                        format!("it was already received with another payload by step `{step}`")
                    }
                    Some((s, _)) => format!("step `{step}` already received `{s}`"),
                    None => format!("step `{step}` has already ended"),
                };
                not_waiting(how)
            }
        }
    }
}

/// Where a call step's calls go: (participant, action, compensation, idempotency scope).
pub type Route<'p> = (&'p str, &'p CallPlan, Option<&'p CallPlan>, String);

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
