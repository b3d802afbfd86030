//! Saga definitions: YAML parsed into raw structs, then compiled into a validated [`Plan`].
//!
//! Compilation collects every error it finds, each with file, line and step, instead of
//! stopping at the first. Method and field checks use the participants' protobuf
//! descriptors, which the caller supplies through [`DescriptorLookup`] (the engine does no
//! I/O to fetch them).

mod compile;
mod condition;
mod json_schema;
mod raw;
mod schema;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use prost_reflect::{DescriptorPool, MessageDescriptor};
use serde_json::Value;

pub use compile::{compile, parse};
pub use condition::{Condition, ConditionError};
pub use json_schema::json_schema;
pub use raw::RawDefinition;
pub use schema::{FieldType, InputField, InputSchema};

/// One problem in a definition, located as precisely as the YAML allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionError {
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<u32>,
    /// The step the problem belongs to, if any.
    pub step: Option<String>,
    pub message: String,
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(step) = &self.step {
            write!(f, ": step `{step}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in one definition, sorted by line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DefinitionErrors(pub Vec<DefinitionError>);

impl fmt::Display for DefinitionErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.0.len();
        write!(
            f,
            "invalid definition ({count} error{})",
            if count == 1 { "" } else { "s" }
        )?;
        for error in &self.0 {
            write!(f, "\n  {error}")?;
        }
        Ok(())
    }
}

/// Where the engine may find a participant's protobuf descriptors.
pub trait DescriptorLookup {
    /// The descriptors for `participant`, or a sentence saying why they could not be had.
    fn pool(&self, participant: &str) -> Result<DescriptorPool, String>;
}

impl DescriptorLookup for BTreeMap<String, DescriptorPool> {
    fn pool(&self, participant: &str) -> Result<DescriptorPool, String> {
        self.get(participant)
            .cloned()
            .ok_or_else(|| format!("no descriptors for participant `{participant}`"))
    }
}

/// A validated definition: what the engine runs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub version: u32,
    /// The file (or `PutDefinition` source name) it came from.
    pub file: String,
    /// The exact YAML text, kept so a version can be compared and served back.
    pub yaml: String,
    pub description: Option<String>,
    pub input: Option<InputSchema>,
    pub participants: BTreeMap<String, Participant>,
    pub steps: Vec<StepPlan>,
    /// Whether StartSaga is refused while the first step's breaker is open.
    pub reject_when_open: bool,
    /// The whole saga's deadline, from its start.
    pub deadline: Option<Duration>,
    /// The index of the step after whose completion cancellation is refused.
    pub cancellable_until: Option<usize>,
    pub statuses: Statuses,
}

/// Business statuses of the saga's outcomes (the steps declare their own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Statuses {
    pub completed: Option<String>,
    pub compensating: Option<String>,
    pub compensated: Option<String>,
    pub cancelled: Option<String>,
    pub failed: Option<String>,
}

impl Plan {
    /// The step called `name`, with its index.
    pub fn step(&self, name: &str) -> Option<(usize, &StepPlan)> {
        self.steps.iter().enumerate().find(|(_, s)| s.name == name)
    }

    /// The pivot step's index, if the definition has one.
    pub fn pivot(&self) -> Option<usize> {
        self.steps.iter().position(|s| s.kind == StepKind::Pivot)
    }

    /// Every signal the definition's await steps accept, sorted, without repeats.
    pub fn signals(&self) -> Vec<&str> {
        let mut signals: Vec<&str> = self
            .steps
            .iter()
            .filter_map(StepPlan::awaits)
            .flat_map(|a| {
                std::iter::once(a.signal.as_str()).chain(a.fail_on.iter().map(String::as_str))
            })
            .collect();
        signals.sort_unstable();
        signals.dedup();
        signals
    }

    /// The range of step indexes that run together with step `index`: its parallel group,
    /// or the step alone.
    pub fn group_of(&self, index: usize) -> std::ops::Range<usize> {
        let Some(group) = self.steps.get(index).and_then(|s| s.group.as_deref()) else {
            return index..index + 1;
        };
        let same = |i: &usize| self.steps[*i].group.as_deref() == Some(group);
        let start = (0..=index).rev().take_while(same).last().unwrap_or(index);
        let end = (index..self.steps.len())
            .take_while(same)
            .last()
            .unwrap_or(index)
            + 1;
        start..end
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Participant {
    pub name: String,
    /// The participant's URL, e.g. `http://127.0.0.1:50061`; the runtime may override it.
    pub endpoint: String,
    /// Path of a descriptor set file, if the definition names one; otherwise reflection.
    pub descriptor_set: Option<String>,
    /// The circuit breaker on calls to this participant, if any.
    pub breaker: Option<BreakerSpec>,
}

/// How the breaker's window is measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WindowSpec {
    /// The last N calls.
    Count(u32),
    /// The calls of the last duration.
    Time(Duration),
}

/// A circuit breaker's configuration (Resilience4j's model); the runtime builds the breaker.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSpec {
    pub window: WindowSpec,
    pub minimum_calls: u32,
    /// Percent.
    pub failure_rate: f64,
    pub slow_call_duration: Duration,
    /// Percent.
    pub slow_call_rate: f64,
    pub wait_in_open: Duration,
    pub wait_multiplier: f64,
    pub max_wait_in_open: Duration,
    pub half_open_calls: u32,
}

impl Default for BreakerSpec {
    fn default() -> Self {
        BreakerSpec {
            window: WindowSpec::Count(20),
            minimum_calls: 10,
            failure_rate: 50.0,
            slow_call_duration: Duration::from_secs(5),
            slow_call_rate: 100.0,
            wait_in_open: Duration::from_secs(10),
            wait_multiplier: 1.0,
            max_wait_in_open: Duration::from_secs(60),
            half_open_calls: 3,
        }
    }
}

/// What a step's action does when the breaker rejects the call (nothing was sent).
/// Compensations always wait for the breaker, with no limit: an undo is never dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOpen {
    /// The step fails at once; the saga compensates.
    Fail,
    /// The saga waits (WAITING) until the breaker lets a probe through, without using a
    /// retry attempt; after `max_wait` the step fails and the saga compensates.
    Defer { max_wait: Duration },
    /// The step calls its `fallback` (another participant) instead, if the primary has not
    /// received any call of this step; otherwise it fails.
    Call,
}

/// The alternative a step calls when its participant's breaker is open (`on_open: call`).
#[derive(Debug, Clone)]
pub struct FallbackPlan {
    pub participant: String,
    pub action: CallPlan,
    pub compensation: Option<CallPlan>,
}

/// The classic saga step kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Has a compensation; runs before the pivot.
    Compensatable,
    /// The go/no-go step: once it succeeds the saga can only go forward. Never compensated.
    Pivot,
    /// After the pivot; retried until it succeeds and never compensated.
    Retriable,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Compensatable => "compensatable",
            StepKind::Pivot => "pivot",
            StepKind::Retriable => "retriable",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StepPlan {
    pub name: String,
    pub kind: StepKind,
    /// Runs only if this holds.
    pub when: Option<Condition>,
    /// The business status while this is the saga's current step.
    pub status: Option<String>,
    /// The parallel group; consecutive steps of one group run concurrently.
    pub group: Option<String>,
    pub body: StepBody,
}

impl StepPlan {
    /// The call of a call step.
    pub fn call(&self) -> Option<&CallStep> {
        match &self.body {
            StepBody::Call(call) => Some(call),
            StepBody::Await(_) => None,
        }
    }

    /// The wait of an await step.
    pub fn awaits(&self) -> Option<&AwaitPlan> {
        match &self.body {
            StepBody::Await(wait) => Some(wait),
            StepBody::Call(_) => None,
        }
    }

    /// The participant a call step calls; empty for an await step.
    pub fn participant(&self) -> &str {
        self.call().map_or("", |c| c.participant.as_str())
    }

    /// Whether the step has something to undo.
    pub fn has_compensation(&self) -> bool {
        self.call().is_some_and(|c| c.compensation.is_some())
    }
}

/// What a step does.
#[derive(Debug, Clone)]
pub enum StepBody {
    /// Calls a participant (and undoes it with its compensation).
    Call(Box<CallStep>),
    /// Waits for a signal.
    Await(AwaitPlan),
}

/// A step that waits for a named signal.
#[derive(Debug, Clone, PartialEq)]
pub struct AwaitPlan {
    /// The signal that completes the step.
    pub signal: String,
    /// Signals that fail the step.
    pub fail_on: Vec<String>,
    pub timeout: Option<Duration>,
    pub on_timeout: OnTimeout,
}

impl AwaitPlan {
    /// Whether `signal` ends this wait (either way).
    pub fn accepts(&self, signal: &str) -> bool {
        self.signal == signal || self.fail_on.iter().any(|s| s == signal)
    }
}

/// What an await step does when its timeout passes without a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTimeout {
    /// The step fails; the saga compensates.
    Fail,
    /// The step ends without a signal and the saga continues at step `at` (an index after
    /// the await step); the steps in between are skipped.
    Continue { at: usize },
}

/// A step that calls a participant.
#[derive(Debug, Clone)]
pub struct CallStep {
    pub participant: String,
    pub action: CallPlan,
    pub compensation: Option<CallPlan>,
    /// Per-attempt deadline.
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub compensation_retry: RetryPolicy,
    /// What the action does when its participant's breaker rejects it.
    pub on_open: OnOpen,
    /// The alternative of `on_open: call`.
    pub fallback: Option<FallbackPlan>,
}

/// One unary gRPC call: the method and the request mapping.
#[derive(Debug, Clone)]
pub struct CallPlan {
    /// `package.Service/Method`.
    pub method: String,
    /// The request mapping, with `${...}` references (see [`crate::template`]).
    pub request: Value,
    pub input: MessageDescriptor,
    pub output: MessageDescriptor,
}

impl CallPlan {
    /// The HTTP/2 path of the method, `/package.Service/Method`.
    pub fn path(&self) -> String {
        format!("/{}", self.method)
    }
}

/// Exponential backoff with jitter, bounded by a number of attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f64,
}

impl RetryPolicy {
    pub const ACTION_DEFAULT: RetryPolicy = RetryPolicy {
        max_attempts: 5,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(5),
        multiplier: 2.0,
    };

    pub const COMPENSATION_DEFAULT: RetryPolicy = RetryPolicy {
        max_attempts: 30,
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(30),
        multiplier: 2.0,
    };

    /// The wait after failed attempt `attempt` (1-based). `jitter` in `[0, 1)` spreads the
    /// wait over its upper half ("equal jitter"), so retries of many sagas do not align.
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = base.min(self.max_backoff.as_secs_f64());
        let jitter = jitter.clamp(0.0, 1.0);
        Duration::from_secs_f64(capped * (0.5 + 0.5 * jitter))
    }
}

/// The default per-attempt deadline of a call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            multiplier: 2.0,
        };
        assert_eq!(policy.backoff(1, 1.0), Duration::from_millis(100));
        assert_eq!(policy.backoff(3, 1.0), Duration::from_millis(400));
        assert_eq!(policy.backoff(3, 0.0), Duration::from_millis(200));
        assert_eq!(policy.backoff(20, 1.0), Duration::from_millis(1000));
        assert_eq!(policy.backoff(u32::MAX, 1.0), Duration::from_millis(1000));
    }
}
