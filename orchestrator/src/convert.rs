//! Conversions between JSON (the engine's data) and protobuf types of the API.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Timestamp};
use saga_engine::definition::StepKind;
use saga_engine::saga::StepState;
use saga_engine::{CallError, Event, EventKind, Plan, Saga, SagaStatus, StepStatus};
use serde_json::Value;

use proto::saga::v1 as pb;

pub fn struct_to_json(s: &Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

pub fn value_to_json(v: &prost_types::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            // Struct numbers are doubles; whole numbers become JSON integers again.
            if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
                Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

pub fn json_to_value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        Value::Object(_) => Kind::StructValue(json_to_struct(v)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn json_to_struct(v: &Value) -> Struct {
    match v {
        Value::Object(map) => Struct {
            fields: map
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        },
        _ => Struct::default(),
    }
}

pub fn timestamp(ms: u64) -> Timestamp {
    Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

pub fn saga_status(status: SagaStatus) -> pb::SagaStatus {
    match status {
        SagaStatus::Running => pb::SagaStatus::Running,
        SagaStatus::Waiting => pb::SagaStatus::Waiting,
        SagaStatus::Compensating => pb::SagaStatus::Compensating,
        SagaStatus::Completed => pb::SagaStatus::Completed,
        SagaStatus::Compensated => pb::SagaStatus::Compensated,
        SagaStatus::Failed => pb::SagaStatus::Failed,
    }
}

pub fn saga_status_from_pb(status: pb::SagaStatus) -> Option<SagaStatus> {
    Some(match status {
        pb::SagaStatus::Unspecified => return None,
        pb::SagaStatus::Running => SagaStatus::Running,
        pb::SagaStatus::Waiting => SagaStatus::Waiting,
        pb::SagaStatus::Compensating => SagaStatus::Compensating,
        pb::SagaStatus::Completed => SagaStatus::Completed,
        pb::SagaStatus::Compensated => SagaStatus::Compensated,
        pb::SagaStatus::Failed => SagaStatus::Failed,
    })
}

fn step_status(status: StepStatus) -> pb::StepStatus {
    match status {
        StepStatus::Pending => pb::StepStatus::Pending,
        StepStatus::Running => pb::StepStatus::Running,
        StepStatus::Retrying => pb::StepStatus::Retrying,
        StepStatus::Succeeded => pb::StepStatus::Succeeded,
        StepStatus::Failed => pb::StepStatus::Failed,
        StepStatus::Compensating => pb::StepStatus::Compensating,
        StepStatus::Compensated => pb::StepStatus::Compensated,
        StepStatus::CompensationFailed => pb::StepStatus::CompensationFailed,
        StepStatus::Waiting => pb::StepStatus::Waiting,
        StepStatus::Skipped => pb::StepStatus::Skipped,
    }
}

fn step_kind(kind: StepKind) -> pb::StepKind {
    match kind {
        StepKind::Compensatable => pb::StepKind::Compensatable,
        StepKind::Pivot => pb::StepKind::Pivot,
        StepKind::Retriable => pb::StepKind::Retriable,
    }
}

pub fn call_error(e: &CallError) -> pb::StepError {
    pb::StepError {
        code: e.code.clone(),
        message: e.message.clone(),
        retryable: e.retryable,
    }
}

fn step(plan_step: &saga_engine::definition::StepPlan, s: &StepState) -> pb::Step {
    pb::Step {
        name: plan_step.name.clone(),
        participant: plan_step.participant().to_owned(),
        kind: step_kind(plan_step.kind) as i32,
        status: if s.deferral.is_some() {
            pb::StepStatus::Deferred
        } else {
            step_status(s.status)
        } as i32,
        attempts: s.attempts,
        compensation_attempts: s.compensation_attempts,
        last_error: s.last_error.as_ref().map(call_error),
        output: s.output.as_ref().map(json_to_value),
        started_at: s.started_at_ms.map(timestamp),
        finished_at: s.finished_at_ms.map(timestamp),
        compensated_at: s.compensated_at_ms.map(timestamp),
        method: plan_step
            .call()
            .map(|c| c.action.method.clone())
            .unwrap_or_default(),
        compensation_method: plan_step
            .call()
            .and_then(|c| c.compensation.as_ref())
            .map(|c| c.method.clone())
            .unwrap_or_default(),
        signal: plan_step
            .awaits()
            .map(|a| a.signal.clone())
            .unwrap_or_default(),
        fail_signals: plan_step
            .awaits()
            .map(|a| a.fail_on.clone())
            .unwrap_or_default(),
        group: plan_step.group.clone().unwrap_or_default(),
    }
}

/// A saga as GetSaga shows it; `now_ms` decides when its current wait ends.
pub fn saga(plan: &Plan, saga: &Saga, now_ms: u64) -> pb::Saga {
    let wake_at = match saga.next(plan, now_ms) {
        saga_engine::Next::Wait(wait) => wait.wake_at_ms.map(timestamp),
        _ => None,
    };
    pb::Saga {
        saga_id: saga.id.clone(),
        definition: saga.definition.clone(),
        version: saga.version,
        status: saga_status(saga.status()) as i32,
        input: Some(json_to_struct(&saga.input)),
        steps: plan
            .steps
            .iter()
            .zip(&saga.steps)
            .enumerate()
            .map(|(i, (p, s))| {
                let mut message = step(p, s);
                // A rerouted step shows where its calls actually went.
                if let Some((participant, action, compensation, _)) = saga.route(plan, i) {
                    message.participant = participant.to_owned();
                    message.method = action.method.clone();
                    message.compensation_method =
                        compensation.map(|c| c.method.clone()).unwrap_or_default();
                }
                message
            })
            .collect(),
        created_at: Some(timestamp(saga.created_at_ms)),
        updated_at: Some(timestamp(saga.updated_at_ms)),
        idempotency_key: saga.idempotency_key.clone(),
        reason: saga.reason.clone().unwrap_or_default(),
        waiting_for: saga.waiting_for(plan).unwrap_or_default(),
        business_status: saga.business_status(plan),
        awaiting_signals: saga.awaiting_signals(plan),
        wake_at,
        deadline: saga.deadline_ms.map(timestamp),
        buffered_signals: saga.buffered.iter().map(|b| b.signal.clone()).collect(),
        trace_id: saga
            .trace
            .as_ref()
            .map(|t| t.trace_id.clone())
            .unwrap_or_default(),
    }
}

pub fn summary(s: &saga_store::Summary) -> pb::SagaSummary {
    pb::SagaSummary {
        saga_id: s.saga_id.clone(),
        definition: s.definition.clone(),
        version: s.version,
        status: saga_status(s.status) as i32,
        created_at: Some(timestamp(s.created_at_ms)),
        updated_at: Some(timestamp(s.updated_at_ms)),
        business_status: s.business_status.clone(),
    }
}

/// A change of the feed as WatchSagas sends it.
pub fn change(c: &saga_store::Change) -> pb::SagaChange {
    pb::SagaChange {
        cursor: c.cursor,
        saga_id: c.saga_id.clone(),
        definition: c.definition.clone(),
        version: c.version,
        status: saga_status(c.status) as i32,
        business_status: c.business_status.clone(),
        at: Some(timestamp(c.at_ms)),
        seq: c.seq,
    }
}

/// An event as the API shows it; `status` is the saga's status after the event.
pub fn event(saga_id: &str, e: &Event, status: SagaStatus) -> pb::SagaEvent {
    let mut out = pb::SagaEvent {
        saga_id: saga_id.to_owned(),
        seq: e.seq,
        at: Some(timestamp(e.at_ms)),
        kind: e.kind.name().to_owned(),
        status: saga_status(status) as i32,
        ..Default::default()
    };
    match &e.kind {
        EventKind::SagaStarted {
            definition,
            version,
            ..
        } => out.detail = format!("{definition} v{version}"),
        EventKind::StepStarted {
            step,
            phase,
            attempt,
        } => {
            out.step = step.clone();
            out.phase = phase.as_str().to_owned();
            out.attempt = *attempt;
        }
        EventKind::StepSucceeded {
            step,
            phase,
            attempt,
            output,
        } => {
            out.step = step.clone();
            out.phase = phase.as_str().to_owned();
            out.attempt = *attempt;
            out.output = Some(json_to_value(output));
        }
        EventKind::StepFailed {
            step,
            phase,
            attempt,
            error,
            retry_at_ms,
        } => {
            out.step = step.clone();
            out.phase = phase.as_str().to_owned();
            out.attempt = *attempt;
            out.error = Some(call_error(error));
            out.detail = match retry_at_ms {
                Some(at) => format!("retry in {} ms", at.saturating_sub(e.at_ms)),
                None => "no more attempts".to_owned(),
            };
        }
        EventKind::StepDeferred {
            step,
            phase,
            attempt,
            reason,
            ..
        } => {
            out.step = step.clone();
            out.phase = phase.as_str().to_owned();
            out.attempt = *attempt;
            out.detail = reason.clone();
        }
        EventKind::StepRerouted {
            step,
            attempt,
            reason,
        } => {
            out.step = step.clone();
            out.phase = "action".to_owned();
            out.attempt = *attempt;
            out.detail = reason.clone();
        }
        EventKind::SignalReceived {
            step,
            signal,
            payload,
        } => {
            out.step = step.clone();
            out.phase = "action".to_owned();
            out.detail = signal.clone();
            out.output = Some(json_to_value(payload));
        }
        EventKind::SignalBuffered { signal, payload } => {
            out.detail = signal.clone();
            out.output = Some(json_to_value(payload));
        }
        EventKind::StepTimedOut { step } => {
            out.step = step.clone();
            out.phase = "action".to_owned();
            out.detail = "no signal before the timeout".to_owned();
        }
        EventKind::StepSkipped { step, reason }
        | EventKind::ConditionFailed {
            step,
            error: reason,
        } => {
            out.step = step.clone();
            out.phase = "action".to_owned();
            out.detail = reason.clone();
        }
        EventKind::CancelRequested { reason }
        | EventKind::CompensationStarted { reason }
        | EventKind::SagaFailed { reason } => out.detail = reason.clone(),
        EventKind::SagaCompleted | EventKind::SagaCompensated => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_survives_a_round_trip_through_struct() {
        let input = json!({"order_id": "o-1", "amount_cents": 2599, "ratio": 0.5, "items": ["a", {"b": true}], "none": null});
        assert_eq!(struct_to_json(&json_to_struct(&input)), input);
    }
}
