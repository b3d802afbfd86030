//! The YAML shape of a definition, as written, with source positions kept for errors.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefinition {
    pub name: Spanned<String>,
    /// Absent: the orchestrator numbers versions itself (a changed text is a new version).
    #[serde(default)]
    pub version: Option<Spanned<u32>>,
    #[serde(default)]
    pub description: Option<String>,
    /// Field name to type (`string`, `integer`, `number`, `boolean`, `list`, `object`,
    /// `any`; a trailing `?` marks the field optional).
    #[serde(default)]
    pub input: Option<BTreeMap<String, Spanned<String>>>,
    pub participants: BTreeMap<String, Spanned<RawParticipant>>,
    pub steps: Vec<Spanned<RawStep>>,
    /// `reject_when_open`: StartSaga is refused while the first step's breaker is open.
    #[serde(default)]
    pub admission: Option<Spanned<String>>,
    /// The whole saga's deadline (e.g. `2h`): past it, a saga that has not passed its pivot
    /// compensates.
    #[serde(default)]
    pub deadline: Option<Spanned<String>>,
    /// The step after whose completion a saga can no longer be cancelled.
    #[serde(default)]
    pub cancellable_until: Option<Spanned<String>>,
    /// Business statuses of the saga's outcomes, in the customer's words.
    #[serde(default)]
    pub statuses: Option<Spanned<RawStatuses>>,
}

/// What the customer is told once the saga is past its steps.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStatuses {
    #[serde(default)]
    pub completed: Option<String>,
    #[serde(default)]
    pub compensating: Option<String>,
    /// Compensated after a step failed.
    #[serde(default)]
    pub compensated: Option<String>,
    /// Compensated after a cancellation.
    #[serde(default)]
    pub cancelled: Option<String>,
    #[serde(default)]
    pub failed: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawParticipant {
    pub endpoint: Spanned<String>,
    /// A binary `FileDescriptorSet` (path relative to the definition file); absent means the
    /// participant's gRPC server reflection.
    #[serde(default)]
    pub descriptor_set: Option<Spanned<String>>,
    #[serde(default)]
    pub timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub retry: Option<Spanned<RawRetry>>,
    #[serde(default)]
    pub compensation_retry: Option<Spanned<RawRetry>>,
    /// A circuit breaker on every call to this participant.
    #[serde(default)]
    pub circuit_breaker: Option<Spanned<RawBreaker>>,
    /// What a step does when the breaker rejects its call: `fail` (default) or `defer`.
    #[serde(default)]
    pub on_open: Option<Spanned<String>>,
    /// With `on_open: defer`, the longest a step waits for the breaker before it fails.
    #[serde(default)]
    pub max_defer: Option<Spanned<String>>,
}

/// Resilience4j's configuration model, in YAML.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    /// `{ count: 20 }` (the last 20 calls) or `{ time: 10s }` (the calls of the last 10 s).
    #[serde(default)]
    pub window: Option<Spanned<RawWindow>>,
    #[serde(default)]
    pub minimum_calls: Option<u32>,
    /// Percent of failed calls that opens the breaker.
    #[serde(default)]
    pub failure_rate: Option<f64>,
    /// Calls at least this long are slow.
    #[serde(default)]
    pub slow_call_duration: Option<Spanned<String>>,
    /// Percent of slow calls that opens the breaker.
    #[serde(default)]
    pub slow_call_rate: Option<f64>,
    /// How long the breaker stays open before probing.
    #[serde(default)]
    pub wait_in_open: Option<Spanned<String>>,
    /// Growth of the wait with each consecutive opening (1 = fixed).
    #[serde(default)]
    pub wait_multiplier: Option<f64>,
    #[serde(default)]
    pub max_wait_in_open: Option<Spanned<String>>,
    /// Probe calls let through when half-open.
    #[serde(default)]
    pub half_open_calls: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(default)]
    pub time: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub initial_backoff: Option<Spanned<String>>,
    #[serde(default)]
    pub max_backoff: Option<Spanned<String>>,
    #[serde(default)]
    pub multiplier: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    pub name: Spanned<String>,
    /// Call steps: the participant called. Await steps have none.
    #[serde(default)]
    pub participant: Option<Spanned<String>>,
    #[serde(default)]
    pub kind: Option<Spanned<String>>,
    /// Call steps: the action.
    #[serde(default)]
    pub action: Option<Spanned<RawCall>>,
    /// Await steps: the signal waited for.
    #[serde(default, rename = "await")]
    pub await_: Option<Spanned<RawAwait>>,
    /// A CEL expression over `input`, `steps` and `saga`: the step runs only if it is true.
    #[serde(default)]
    pub when: Option<Spanned<String>>,
    /// The business status while this step is the saga's current step.
    #[serde(default)]
    pub status: Option<Spanned<String>>,
    /// Consecutive steps naming the same group run concurrently.
    #[serde(default)]
    pub parallel: Option<Spanned<String>>,
    #[serde(default)]
    pub compensation: Option<Spanned<RawCall>>,
    #[serde(default)]
    pub timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub retry: Option<Spanned<RawRetry>>,
    #[serde(default)]
    pub compensation_retry: Option<Spanned<RawRetry>>,
    /// Overrides the participant's `on_open` for this step (`call` needs `fallback`).
    #[serde(default)]
    pub on_open: Option<Spanned<String>>,
    /// With `on_open: call`: the alternative participant, action and compensation.
    #[serde(default)]
    pub fallback: Option<Spanned<RawFallback>>,
    #[serde(default)]
    pub max_defer: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCall {
    pub method: Spanned<String>,
    #[serde(default)]
    pub request: BTreeMap<String, Spanned<serde_json::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFallback {
    pub participant: Spanned<String>,
    pub action: Spanned<RawCall>,
    #[serde(default)]
    pub compensation: Option<Spanned<RawCall>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAwait {
    /// The signal that completes the step, e.g. `store.accepted`.
    pub signal: Spanned<String>,
    /// Signals that fail the step (the saga compensates), e.g. `[store.rejected]`.
    #[serde(default)]
    pub fail_on: Vec<Spanned<String>>,
    /// How long to wait; absent waits without limit.
    #[serde(default)]
    pub timeout: Option<Spanned<String>>,
    /// `fail` (default: the step fails and the saga compensates) or `continue`.
    #[serde(default)]
    pub on_timeout: Option<Spanned<String>>,
    /// With `on_timeout: continue`: the later step to continue at (default: the next one);
    /// the steps in between are skipped.
    #[serde(default)]
    pub continue_at: Option<Spanned<String>>,
}
