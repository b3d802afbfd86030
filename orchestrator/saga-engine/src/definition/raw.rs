//! The YAML shape of a definition, as written, with source positions kept for errors.
//!
//! The structs also derive the definition language's JSON Schema (see
//! [`super::json_schema()`]): doc comments become descriptions, and `Spanned` fields name the
//! plain type they hold.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::Spanned;

use super::json_schema as text;

/// A saga definition: its participants and its steps, in order. The orchestrator checks it
/// against the participants' gRPC methods when it loads it.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Saga definition")]
pub struct RawDefinition {
    /// What StartSaga names.
    #[schemars(with = "text::Name")]
    pub name: Spanned<String>,
    /// Absent: the orchestrator numbers versions itself (a changed text is a new version).
    #[serde(default)]
    #[schemars(with = "Option<u32>", range(min = 1))]
    pub version: Option<Spanned<u32>>,
    /// What the saga does, for people.
    #[serde(default)]
    pub description: Option<String>,
    /// Field name to type (`string`, `integer`, `number`, `boolean`, `list`, `object`,
    /// `any`; a trailing `?` marks the field optional).
    #[serde(default)]
    #[schemars(with = "Option<BTreeMap<String, text::InputType>>")]
    pub input: Option<BTreeMap<String, Spanned<String>>>,
    /// The gRPC services the steps call, by name.
    #[schemars(with = "BTreeMap<String, RawParticipant>")]
    #[schemars(extend("propertyNames" = { "$ref": "#/$defs/Name" }))]
    pub participants: BTreeMap<String, Spanned<RawParticipant>>,
    /// The steps, run in order; a failure compensates the steps before it, newest first.
    #[schemars(with = "Vec<RawStep>", length(min = 1))]
    pub steps: Vec<Spanned<RawStep>>,
    /// `reject_when_open`: StartSaga is refused while the first step's breaker is open.
    #[serde(default)]
    #[schemars(with = "Option<text::Admission>")]
    pub admission: Option<Spanned<String>>,
    /// The whole saga's deadline (e.g. `2h`): past it, a saga that has not passed its pivot
    /// compensates.
    #[serde(default)]
    #[schemars(with = "Option<text::Duration>")]
    pub deadline: Option<Spanned<String>>,
    /// The step after whose completion a saga can no longer be cancelled.
    #[serde(default)]
    #[schemars(with = "Option<text::Name>")]
    pub cancellable_until: Option<Spanned<String>>,
    /// Business statuses of the saga's outcomes, in the customer's words.
    #[serde(default)]
    #[schemars(with = "Option<RawStatuses>")]
    pub statuses: Option<Spanned<RawStatuses>>,
}

/// What the customer is told once the saga is past its steps.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Statuses")]
pub struct RawStatuses {
    /// Every step succeeded.
    #[serde(default)]
    pub completed: Option<String>,
    /// While the saga undoes its steps.
    #[serde(default)]
    pub compensating: Option<String>,
    /// Compensated after a step failed.
    #[serde(default)]
    pub compensated: Option<String>,
    /// Compensated after a cancellation.
    #[serde(default)]
    pub cancelled: Option<String>,
    /// A compensation kept failing: the saga needs a person.
    #[serde(default)]
    pub failed: Option<String>,
}

/// A gRPC service the steps call, and how calls to it are made.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Participant")]
pub struct RawParticipant {
    /// The participant's URL, e.g. `http://127.0.0.1:50061`; the runtime may override it.
    #[schemars(with = "String", regex(pattern = r"^\s*https?://\S"))]
    pub endpoint: Spanned<String>,
    /// A binary `FileDescriptorSet` (path relative to the definition file); absent means the
    /// participant's gRPC server reflection.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub descriptor_set: Option<Spanned<String>>,
    /// The deadline of each call attempt, for the steps that call this participant.
    #[serde(default)]
    #[schemars(with = "Option<text::Duration>")]
    pub timeout: Option<Spanned<String>>,
    /// How the steps' actions are retried.
    #[serde(default)]
    #[schemars(with = "Option<RawRetry>")]
    pub retry: Option<Spanned<RawRetry>>,
    /// How the steps' compensations are retried.
    #[serde(default)]
    #[schemars(with = "Option<RawRetry>")]
    pub compensation_retry: Option<Spanned<RawRetry>>,
    /// A circuit breaker on every call to this participant.
    #[serde(default)]
    #[schemars(with = "Option<RawBreaker>")]
    pub circuit_breaker: Option<Spanned<RawBreaker>>,
    /// What a step does when the breaker rejects its call: `fail` (default) or `defer`.
    #[serde(default)]
    #[schemars(with = "Option<text::ParticipantOnOpen>")]
    pub on_open: Option<Spanned<String>>,
    /// With `on_open: defer`, the longest a step waits for the breaker before it fails.
    #[serde(default)]
    #[schemars(with = "Option<text::Duration>")]
    pub max_defer: Option<Spanned<String>>,
}

/// Resilience4j's configuration model, in YAML.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "CircuitBreaker")]
pub struct RawBreaker {
    /// `{ count: 20 }` (the last 20 calls) or `{ time: 10s }` (the calls of the last 10 s).
    #[serde(default)]
    #[schemars(with = "Option<RawWindow>")]
    pub window: Option<Spanned<RawWindow>>,
    /// Calls in the window before the rates count.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub minimum_calls: Option<u32>,
    /// Percent of failed calls that opens the breaker.
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 0), range(max = 100))]
    pub failure_rate: Option<f64>,
    /// Calls at least this long are slow.
    #[serde(default)]
    #[schemars(with = "Option<text::Duration>")]
    pub slow_call_duration: Option<Spanned<String>>,
    /// Percent of slow calls that opens the breaker.
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 0), range(max = 100))]
    pub slow_call_rate: Option<f64>,
    /// How long the breaker stays open before probing.
    #[serde(default)]
    #[schemars(with = "Option<text::Duration>")]
    pub wait_in_open: Option<Spanned<String>>,
    /// Growth of the wait with each consecutive opening (1 = fixed).
    #[serde(default)]
    #[schemars(range(min = 1, max = 10))]
    pub wait_multiplier: Option<f64>,
    /// The longest the wait grows to.
    #[serde(default)]
    #[schemars(with = "Option<text::Duration>")]
    pub max_wait_in_open: Option<Spanned<String>>,
    /// Probe calls let through when half-open.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub half_open_calls: Option<u32>,
}

/// The calls the breaker's rates are measured over: give `count` or `time`, not both.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Window")]
pub struct RawWindow {
    /// The last N calls.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub count: Option<u32>,
    /// The calls of the last duration.
    #[serde(default)]
    #[schemars(with = "Option<text::Duration>")]
    pub time: Option<Spanned<String>>,
}

/// Exponential backoff with jitter, bounded by a number of attempts; absent fields keep
/// their defaults.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Retry")]
pub struct RawRetry {
    /// Attempts in all, the first included.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_attempts: Option<u32>,
    /// The wait after the first failed attempt.
    #[serde(default)]
    #[schemars(with = "Option<text::Duration>")]
    pub initial_backoff: Option<Spanned<String>>,
    /// The longest wait between attempts.
    #[serde(default)]
    #[schemars(with = "Option<text::Duration>")]
    pub max_backoff: Option<Spanned<String>>,
    /// Growth of the wait with each failed attempt.
    #[serde(default)]
    #[schemars(range(min = 1, max = 10))]
    pub multiplier: Option<f64>,
}

/// A call step (`participant` and `action`) or an await step (`await`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Step")]
pub struct RawStep {
    /// Unique in the definition; `${steps.NAME.output...}` refers to it.
    #[schemars(with = "text::Name")]
    pub name: Spanned<String>,
    /// Call steps: the participant called. Await steps have none.
    #[serde(default)]
    #[schemars(with = "Option<text::Name>")]
    pub participant: Option<Spanned<String>>,
    /// `compensatable` (default), `pivot` or `retriable`, in that order in a definition.
    #[serde(default)]
    #[schemars(with = "Option<text::StepKind>")]
    pub kind: Option<Spanned<String>>,
    /// Call steps: the action.
    #[serde(default)]
    #[schemars(with = "Option<RawCall>")]
    pub action: Option<Spanned<RawCall>>,
    /// Await steps: the signal waited for.
    #[serde(default, rename = "await")]
    #[schemars(with = "Option<RawAwait>")]
    pub await_: Option<Spanned<RawAwait>>,
    /// A CEL expression over `input`, `steps` and `saga`: the step runs only if it is true.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub when: Option<Spanned<String>>,
    /// The business status while this step is the saga's current step.
    #[serde(default)]
    #[schemars(with = "Option<String>", length(min = 1, max = 200))]
    pub status: Option<Spanned<String>>,
    /// Consecutive steps naming the same group run concurrently.
    #[serde(default)]
    #[schemars(with = "Option<text::Name>")]
    pub parallel: Option<Spanned<String>>,
    /// Call steps: the call that undoes the action; compensatable steps need one.
    #[serde(default)]
    #[schemars(with = "Option<RawCall>")]
    pub compensation: Option<Spanned<RawCall>>,
    /// Overrides the participant's `timeout` for this step.
    #[serde(default)]
    #[schemars(with = "Option<text::Duration>")]
    pub timeout: Option<Spanned<String>>,
    /// Overrides the participant's `retry` for this step, field by field.
    #[serde(default)]
    #[schemars(with = "Option<RawRetry>")]
    pub retry: Option<Spanned<RawRetry>>,
    /// Overrides the participant's `compensation_retry` for this step, field by field.
    #[serde(default)]
    #[schemars(with = "Option<RawRetry>")]
    pub compensation_retry: Option<Spanned<RawRetry>>,
    /// Overrides the participant's `on_open` for this step (`call` needs `fallback`).
    #[serde(default)]
    #[schemars(with = "Option<text::StepOnOpen>")]
    pub on_open: Option<Spanned<String>>,
    /// With `on_open: call`: the alternative participant, action and compensation.
    #[serde(default)]
    #[schemars(with = "Option<RawFallback>")]
    pub fallback: Option<Spanned<RawFallback>>,
    /// Overrides the participant's `max_defer` for this step.
    #[serde(default)]
    #[schemars(with = "Option<text::Duration>")]
    pub max_defer: Option<Spanned<String>>,
}

/// One unary gRPC call.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Call")]
pub struct RawCall {
    /// The method's full name, `package.Service/Method`.
    #[schemars(with = "String", regex(pattern = r"^[^/]*\.[^/]*/[^/]+$"))]
    pub method: Spanned<String>,
    /// The request message as JSON, field by field; strings may hold `${input.FIELD}`,
    /// `${steps.STEP.output.FIELD}` or `${saga.id}` references (`$$` is a literal `$`).
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, serde_json::Value>")]
    pub request: BTreeMap<String, Spanned<serde_json::Value>>,
}

/// What a step calls instead when its participant's breaker is open.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Fallback")]
pub struct RawFallback {
    /// The alternative participant, e.g. a backup payment provider.
    #[schemars(with = "text::Name")]
    pub participant: Spanned<String>,
    /// The call made instead of the step's action.
    #[schemars(with = "RawCall")]
    pub action: Spanned<RawCall>,
    /// The call that undoes the fallback's action.
    #[serde(default)]
    #[schemars(with = "Option<RawCall>")]
    pub compensation: Option<Spanned<RawCall>>,
}

/// A wait for a named signal, sent to the saga from outside.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Await")]
pub struct RawAwait {
    /// The signal that completes the step, e.g. `store.accepted`.
    #[schemars(with = "text::Signal")]
    pub signal: Spanned<String>,
    /// Signals that fail the step (the saga compensates), e.g. `[store.rejected]`.
    #[serde(default)]
    #[schemars(with = "Vec<text::Signal>")]
    pub fail_on: Vec<Spanned<String>>,
    /// How long to wait; absent waits without limit.
    #[serde(default)]
    #[schemars(with = "Option<text::Duration>")]
    pub timeout: Option<Spanned<String>>,
    /// `fail` (default: the step fails and the saga compensates) or `continue`.
    #[serde(default)]
    #[schemars(with = "Option<text::OnTimeout>")]
    pub on_timeout: Option<Spanned<String>>,
    /// With `on_timeout: continue`: the later step to continue at (default: the next one);
    /// the steps in between are skipped.
    #[serde(default)]
    #[schemars(with = "Option<text::Name>")]
    pub continue_at: Option<Spanned<String>>,
}
