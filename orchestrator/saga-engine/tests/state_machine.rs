//! The saga state machine driven by a simulated runtime: scripted call outcomes, simulated
//! time, and crashes (the state rebuilt from the log) at arbitrary points.

use std::collections::BTreeMap;

use proptest::prelude::*;
use prost_reflect::DescriptorPool;
use saga_engine::definition::{compile, parse};
use saga_engine::saga::{CancelRefused, EngineError};
use saga_engine::{CallError, Event, EventKind, Next, Phase, Plan, Saga, SagaStatus};
use serde_json::{Value, json};

fn plan() -> Plan {
    let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let pools: BTreeMap<String, DescriptorPool> = ["payment", "store", "rider"]
        .into_iter()
        .map(|p| (p.to_owned(), pool.clone()))
        .collect();
    let yaml = include_str!("../../../sagas/order-placement.yaml");
    let raw = parse("order-placement.yaml", yaml).expect("parses");
    compile("order-placement.yaml", yaml, &raw, &pools).expect("compiles")
}

fn input() -> Value {
    json!({"order_id": "o-1", "customer_id": "c-1", "amount_cents": 2599, "card": "tok_visa",
           "store_id": "s-1", "items": ["bibimbap"], "zone": "gangnam"})
}

fn transient() -> CallError {
    CallError {
        code: "UNAVAILABLE".into(),
        message: "try later".into(),
        retryable: true,
        rejected: false,
    }
}

fn rejected() -> CallError {
    CallError {
        code: "FAILED_PRECONDITION".into(),
        message: "no".into(),
        retryable: false,
        rejected: false,
    }
}

/// A call made by the simulated runtime: (step, phase, attempt, idempotency key).
type Made = (String, Phase, u32, String);

struct Sim {
    plan: Plan,
    log: Vec<Event>,
    saga: Saga,
    now: u64,
    calls: Vec<Made>,
    /// How long the simulated breaker stays open after a rejection.
    breaker_wait: u64,
}

impl Sim {
    fn new() -> Sim {
        let plan = plan();
        let first = Saga::start_event(&plan, "saga-1", input(), "key-1", 1_000);
        let saga = Saga::from_events(&plan, [&first]).expect("starts");
        Sim {
            plan,
            log: vec![first],
            saga,
            now: 1_000,
            calls: Vec::new(),
            breaker_wait: 1_000,
        }
    }

    fn record(&mut self, event: Event) {
        self.saga.apply(&self.plan, &event).expect("event applies");
        self.log.push(event);
    }

    /// Rebuilds the state from the log, as a restarted runtime would.
    fn crash(&mut self) {
        self.saga = Saga::from_events(&self.plan, &self.log).expect("log replays");
    }

    /// Runs until terminal; `outcome` decides each call's result.
    fn run(
        &mut self,
        mut outcome: impl FnMut(&str, Phase, u32) -> Result<Value, CallError>,
    ) -> SagaStatus {
        for _ in 0..10_000 {
            match self.saga.next(&self.plan, self.now) {
                Next::Done => return self.saga.status(),
                Next::Record(event) => self.record(event),
                Next::Wait(wait) if !wait.calls.is_empty() => {
                    let call = wait.calls[0].clone();
                    self.calls.push((
                        call.step.clone(),
                        call.phase,
                        call.attempt,
                        call.idempotency_key.clone(),
                    ));
                    let result = outcome(&call.step, call.phase, call.attempt);
                    self.now += 5;
                    let event = self
                        .saga
                        .on_result(&self.plan, &call, result, self.now, 0.5)
                        .expect("in flight");
                    self.record(event);
                }
                Next::Wait(wait) if !wait.breakers.is_empty() => {
                    let expected = if self.saga.compensating {
                        SagaStatus::Compensating
                    } else {
                        SagaStatus::Waiting
                    };
                    assert_eq!(self.saga.status(), expected);
                    let step_index = wait.breakers[0].0;
                    // The breaker lets a probe through after `breaker_wait`, unless the
                    // deferral's deadline comes first.
                    let ready_at = self.now + self.breaker_wait;
                    match wait.wake_at_ms {
                        Some(deadline) if deadline <= ready_at => self.now = deadline,
                        _ => {
                            self.now = ready_at;
                            let event = self
                                .saga
                                .resume(&self.plan, step_index, self.now)
                                .expect("deferred");
                            self.record(event);
                        }
                    }
                }
                Next::Wait(wait) => {
                    assert_eq!(
                        self.saga.status() == SagaStatus::Waiting,
                        !self.saga.compensating
                    );
                    self.now = wait.wake_at_ms.expect("a wait with nothing to wait for");
                }
            }
        }
        panic!("saga did not finish");
    }

    fn compensations(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter(|c| c.1 == Phase::Compensation)
            .map(|c| c.0.clone())
            .collect()
    }
}

#[test]
fn happy_path_completes_with_outputs_chained() {
    let mut sim = Sim::new();
    let status = sim.run(|step, _, _| Ok(json!({"authorization_id": format!("auth-{step}")})));
    assert_eq!(status, SagaStatus::Completed);
    let steps: Vec<_> = sim
        .calls
        .iter()
        .map(|c| (c.0.as_str(), c.1, c.3.as_str()))
        .collect();
    assert_eq!(
        steps,
        [
            (
                "authorize_payment",
                Phase::Action,
                "saga-1/authorize_payment/action"
            ),
            ("submit_order", Phase::Action, "saga-1/submit_order/action"),
            (
                "request_rider",
                Phase::Action,
                "saga-1/request_rider/action"
            ),
        ]
    );
    let kinds: Vec<_> = sim.log.iter().map(|e| e.kind.name()).collect();
    assert_eq!(kinds.first(), Some(&"saga_started"));
    assert_eq!(kinds.last(), Some(&"saga_completed"));
    // Every call was preceded by its stored intent.
    assert_eq!(kinds.iter().filter(|k| **k == "step_started").count(), 3);
}

#[test]
fn rider_failure_compensates_store_then_payment() {
    let mut sim = Sim::new();
    let status = sim.run(|step, phase, _| match (step, phase) {
        ("request_rider", Phase::Action) => Err(rejected()),
        _ => Ok(json!({})),
    });
    assert_eq!(status, SagaStatus::Compensated);
    // The pivot has no compensation; the others are undone in reverse order.
    assert_eq!(sim.compensations(), ["submit_order", "authorize_payment"]);
    assert!(
        sim.saga
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("request_rider")
    );
}

#[test]
fn store_failure_compensates_attempted_steps_and_never_calls_rider() {
    let mut sim = Sim::new();
    let status = sim.run(|step, phase, _| match (step, phase) {
        ("submit_order", Phase::Action) => Err(rejected()),
        _ => Ok(json!({})),
    });
    assert_eq!(status, SagaStatus::Compensated);
    assert_eq!(sim.compensations(), ["submit_order", "authorize_payment"]);
    assert!(sim.calls.iter().all(|c| c.0 != "request_rider"));
}

#[test]
fn transient_failures_retry_with_backoff_then_succeed() {
    let mut sim = Sim::new();
    let status = sim.run(|step, _, attempt| {
        if step == "authorize_payment" && attempt < 3 {
            Err(transient())
        } else {
            Ok(json!({}))
        }
    });
    assert_eq!(status, SagaStatus::Completed);
    let attempts: Vec<_> = sim
        .calls
        .iter()
        .filter(|c| c.0 == "authorize_payment")
        .map(|c| (c.2, c.3.clone()))
        .collect();
    // Same idempotency key on every attempt.
    assert_eq!(attempts.len(), 3);
    assert!(
        attempts
            .iter()
            .all(|(_, key)| key == "saga-1/authorize_payment/action")
    );
    // The retry times grow: 100ms then 200ms (half jitter: 75ms then 150ms).
    let retry_at: Vec<u64> = sim
        .log
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::StepFailed {
                retry_at_ms: Some(at),
                ..
            } => Some(*at - e.at_ms),
            _ => None,
        })
        .collect();
    assert_eq!(retry_at, [75, 150]);
}

#[test]
fn exhausted_retries_compensate() {
    let mut sim = Sim::new();
    let status = sim.run(|step, phase, _| match (step, phase) {
        ("submit_order", Phase::Action) => Err(transient()),
        _ => Ok(json!({})),
    });
    assert_eq!(status, SagaStatus::Compensated);
    let store_attempts = sim
        .calls
        .iter()
        .filter(|c| c.0 == "submit_order" && c.1 == Phase::Action)
        .count();
    assert_eq!(
        store_attempts,
        sim.plan.steps[1]
            .call()
            .expect("call step")
            .retry
            .max_attempts as usize
    );
    assert_eq!(sim.compensations(), ["submit_order", "authorize_payment"]);
}

#[test]
fn a_compensation_that_cannot_succeed_fails_the_saga_loudly() {
    let mut sim = Sim::new();
    let status = sim.run(|step, phase, _| match (step, phase) {
        ("request_rider", Phase::Action) => Err(rejected()),
        ("authorize_payment", Phase::Compensation) => Err(transient()),
        _ => Ok(json!({})),
    });
    assert_eq!(status, SagaStatus::Failed);
    let reason = sim.saga.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("compensation of step `authorize_payment` failed after 30 attempt(s)"),
        "{reason}"
    );
}

#[test]
fn cancel_before_the_pivot_compensates_and_after_it_is_refused() {
    let mut sim = Sim::new();
    // Run the first step only.
    while sim.saga.steps[0].status != saga_engine::StepStatus::Succeeded {
        match sim.saga.next(&sim.plan, sim.now) {
            Next::Record(e) => sim.record(e),
            Next::Wait(wait) if !wait.calls.is_empty() => {
                let call = wait.calls[0].clone();
                let e = sim
                    .saga
                    .on_result(&sim.plan, &call, Ok(json!({})), sim.now, 0.0)
                    .expect("in flight");
                sim.record(e);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let event = sim
        .saga
        .cancel(&sim.plan, "customer changed their mind", sim.now)
        .expect("allowed")
        .expect("new");
    sim.record(event);
    assert_eq!(
        sim.saga.cancel(&sim.plan, "again", sim.now),
        Ok(None),
        "cancel is idempotent"
    );
    let status = sim.run(|_, _, _| Ok(json!({})));
    assert_eq!(status, SagaStatus::Compensated);
    assert_eq!(sim.compensations(), ["authorize_payment"]);
    assert_eq!(
        sim.saga.cancel(&sim.plan, "late", sim.now),
        Err(CancelRefused::Terminal(SagaStatus::Compensated))
    );

    let mut done = Sim::new();
    done.run(|_, _, _| Ok(json!({})));
    let mut past_pivot = done.saga.clone();
    past_pivot.terminal = None;
    assert_eq!(
        past_pivot.cancel(&done.plan, "late", done.now),
        Err(CancelRefused::PastPivot("request_rider".into()))
    );
}

#[test]
fn the_log_rejects_events_that_break_its_rules() {
    let mut sim = Sim::new();
    sim.run(|_, _, _| Ok(json!({})));
    let late = Event {
        seq: sim.saga.last_seq + 1,
        at_ms: 0,
        kind: EventKind::SagaCompensated,
    };
    assert_eq!(
        sim.saga.apply(&sim.plan, &late),
        Err(EngineError::Terminal(SagaStatus::Completed))
    );

    let mut fresh = Sim::new();
    let skipped = Event {
        seq: 5,
        at_ms: 0,
        kind: EventKind::SagaCompleted,
    };
    assert_eq!(
        fresh.saga.apply(&fresh.plan, &skipped),
        Err(EngineError::OutOfOrder {
            expected: 2,
            got: 5
        })
    );
    let stray = Event {
        seq: 2,
        at_ms: 0,
        kind: EventKind::StepSucceeded {
            step: "submit_order".into(),
            phase: Phase::Action,
            attempt: 1,
            output: json!({}),
        },
    };
    assert!(matches!(
        fresh.saga.apply(&fresh.plan, &stray),
        Err(EngineError::NotInFlight { .. })
    ));
    let unknown = Event {
        seq: 2,
        at_ms: 0,
        kind: EventKind::StepStarted {
            step: "teleport".into(),
            phase: Phase::Action,
            attempt: 1,
        },
    };
    assert_eq!(
        fresh.saga.apply(&fresh.plan, &unknown),
        Err(EngineError::UnknownStep("teleport".into()))
    );
    fresh.crash();
    assert_eq!(fresh.saga.last_seq, 1);
}

#[test]
fn events_round_trip_through_json() {
    let mut sim = Sim::new();
    sim.run(|step, _, attempt| {
        if step == "submit_order" && attempt == 1 {
            Err(transient())
        } else {
            Ok(json!({"x": 1}))
        }
    });
    for event in &sim.log {
        let text = serde_json::to_string(event).expect("serializes");
        let back: Event = serde_json::from_str(&text).expect("deserializes");
        assert_eq!(&back, event);
    }
}

/// How one call of the property test ends.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Ok,
    Transient,
    Rejected,
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![4 => Just(Outcome::Ok), 2 => Just(Outcome::Transient), 1 => Just(Outcome::Rejected)]
}

proptest! {
    /// Whatever the outcomes and wherever the runtime crashes, the saga reaches one
    /// terminal status; compensations cover exactly the attempted compensatable steps, in
    /// reverse order; each (step, phase) always uses one idempotency key; and a crash only
    /// ever repeats the call whose intent was stored.
    #[test]
    fn invariants_hold_under_any_outcomes_and_crashes(
        outcomes in proptest::collection::vec(outcome(), 1..60),
        crashes in proptest::collection::vec(0usize..40, 0..6),
    ) {
        let mut sim = Sim::new();
        let mut next_outcome = outcomes.into_iter().cycle();
        let mut steps_taken = 0usize;
        let status = loop {
            if crashes.contains(&steps_taken) {
                sim.crash();
            }
            steps_taken += 1;
            match sim.saga.next(&sim.plan, sim.now) {
                Next::Done => break sim.saga.status(),
                Next::Record(event) => sim.record(event),
                Next::Wait(wait) if wait.calls.is_empty() => {
                    prop_assert!(wait.breakers.is_empty(), "no breaker rejections here");
                    sim.now = wait.wake_at_ms.expect("something to wait for");
                }
                Next::Wait(wait) => {
                    let call = wait.calls[0].clone();
                    sim.calls.push((call.step.clone(), call.phase, call.attempt, call.idempotency_key.clone()));
                    // Compensations never fail for good here, so the saga never ends FAILED
                    // unless they keep failing transiently past their cap.
                    let result = match (call.phase, next_outcome.next().unwrap_or(Outcome::Ok)) {
                        (_, Outcome::Ok) => Ok(json!({})),
                        (_, Outcome::Transient) => Err(transient()),
                        (Phase::Action, Outcome::Rejected) => Err(rejected()),
                        (Phase::Compensation, Outcome::Rejected) => Err(transient()),
                    };
                    sim.now += 5;
                    let event = sim.saga.on_result(&sim.plan, &call, result, sim.now, 0.3).expect("in flight");
                    sim.record(event);
                }
            }
            prop_assert!(steps_taken < 20_000, "saga did not finish");
        };
        prop_assert!(status.is_terminal());
        // Replaying the whole log gives the same state.
        prop_assert_eq!(&Saga::from_events(&sim.plan, &sim.log).expect("replays"), &sim.saga);

        let attempted: Vec<usize> = (0..3).filter(|i| sim.saga.steps[*i].attempts > 0).collect();
        let mut compensated: Vec<String> = Vec::new();
        for c in sim.calls.iter().filter(|c| c.1 == Phase::Compensation) {
            if compensated.last() != Some(&c.0) {
                compensated.push(c.0.clone());
            }
            prop_assert_eq!(&c.3, &format!("saga-1/{}/compensation", c.0));
        }
        for c in sim.calls.iter().filter(|c| c.1 == Phase::Action) {
            prop_assert_eq!(&c.3, &format!("saga-1/{}/action", c.0));
        }
        match status {
            SagaStatus::Completed => prop_assert!(compensated.is_empty()),
            SagaStatus::Compensated => {
                let expected: Vec<String> = attempted
                    .iter()
                    .rev()
                    .filter(|i| sim.plan.steps[**i].has_compensation())
                    .map(|i| sim.plan.steps[*i].name.clone())
                    .collect();
                prop_assert_eq!(compensated, expected);
            }
            SagaStatus::Failed => prop_assert!(sim.saga.reason.is_some()),
            other => prop_assert!(false, "not terminal: {:?}", other),
        }
    }
}

fn open_breaker() -> CallError {
    CallError {
        code: "UNAVAILABLE".into(),
        message: "circuit open".into(),
        retryable: false,
        rejected: true,
    }
}

#[test]
fn a_rejected_payment_defers_without_using_an_attempt_then_completes() {
    let mut sim = Sim::new();
    let mut rejections = 2;
    let status = sim.run(|step, _, _| {
        if step == "authorize_payment" && rejections > 0 {
            rejections -= 1;
            Err(open_breaker())
        } else {
            Ok(json!({}))
        }
    });
    assert_eq!(status, SagaStatus::Completed);
    let payment_calls: Vec<u32> = sim
        .calls
        .iter()
        .filter(|c| c.0 == "authorize_payment")
        .map(|c| c.2)
        .collect();
    assert_eq!(
        payment_calls,
        [1, 1, 1],
        "a rejected call is retried as the same attempt"
    );
    assert_eq!(sim.saga.steps[0].attempts, 1);
    let deferred = sim
        .log
        .iter()
        .filter(|e| e.kind.name() == "step_deferred")
        .count();
    assert_eq!(deferred, 2);
}

#[test]
fn a_deferral_past_its_maximum_fails_the_step_and_compensates() {
    let mut sim = Sim::new();
    sim.breaker_wait = 60_000; // the breaker stays open a minute each time
    let status = sim.run(|step, phase, _| {
        if step == "authorize_payment" && phase == Phase::Action {
            Err(open_breaker())
        } else {
            Ok(json!({}))
        }
    });
    assert_eq!(status, SagaStatus::Compensated);
    let error = sim.saga.steps[0].last_error.clone().expect("error");
    assert_eq!(error.code, "CIRCUIT_OPEN");
    assert!(error.message.contains("stayed open"), "{}", error.message);
    // max_defer is 5 minutes in order-placement.
    let started = sim.log[1].at_ms;
    assert!(
        sim.now - started >= 300_000,
        "deferred {} ms",
        sim.now - started
    );
    // The payment call was never made, yet it is compensated as attempted (a no-op for the
    // participant).
    assert_eq!(sim.compensations(), ["authorize_payment"]);
}

#[test]
fn on_open_fail_compensates_at_once_and_compensations_always_wait() {
    let mut sim = Sim::new();
    if let saga_engine::definition::StepBody::Call(call) = &mut sim.plan.steps[1].body {
        call.on_open = saga_engine::definition::OnOpen::Fail;
    }
    let mut comp_rejections = 3;
    let status = sim.run(|step, phase, _| match (step, phase) {
        ("submit_order", Phase::Action) => Err(open_breaker()),
        ("authorize_payment", Phase::Compensation) if comp_rejections > 0 => {
            comp_rejections -= 1;
            Err(open_breaker())
        }
        _ => Ok(json!({})),
    });
    assert_eq!(status, SagaStatus::Compensated);
    assert_eq!(
        sim.saga.steps[1]
            .last_error
            .as_ref()
            .map(|e| e.code.as_str()),
        Some("CIRCUIT_OPEN")
    );
    // The compensation was refused three times and waited each time; it never failed.
    assert_eq!(sim.saga.steps[0].compensation_attempts, 1);
    assert_eq!(
        sim.calls
            .iter()
            .filter(|c| c.0 == "authorize_payment" && c.1 == Phase::Compensation)
            .count(),
        4
    );
}

const REROUTE: &str = "name: reroute
version: 1
participants:
  payment:
    endpoint: http://127.0.0.1:1
    circuit_breaker: { minimum_calls: 2 }
  backup: { endpoint: http://127.0.0.1:2 }
  rider: { endpoint: http://127.0.0.1:3 }
steps:
  - name: pay
    participant: payment
    on_open: call
    fallback:
      participant: backup
      action: { method: payment.v1.Payment/AuthorizeCharge }
      compensation: { method: payment.v1.Payment/VoidCharge }
    action: { method: payment.v1.Payment/AuthorizeCharge }
    compensation: { method: payment.v1.Payment/VoidCharge }
  - name: ride
    participant: rider
    kind: pivot
    action: { method: rider.v1.Rider/RequestDelivery }
";

fn reroute_sim() -> Sim {
    let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let pools: BTreeMap<String, DescriptorPool> = ["payment", "backup", "rider"]
        .into_iter()
        .map(|p| (p.to_owned(), pool.clone()))
        .collect();
    let raw = parse("reroute.yaml", REROUTE).expect("parses");
    let plan = compile("reroute.yaml", REROUTE, &raw, &pools).expect("compiles");
    let first = Saga::start_event(&plan, "saga-1", json!({}), "key-1", 1_000);
    let saga = Saga::from_events(&plan, [&first]).expect("starts");
    Sim {
        plan,
        log: vec![first],
        saga,
        now: 1_000,
        calls: Vec::new(),
        breaker_wait: 1_000,
    }
}

#[test]
fn a_rejected_step_is_rerouted_to_its_fallback_with_its_own_keys() {
    let mut sim = reroute_sim();
    let status = sim.run(|step, _, attempt| {
        if step == "pay" && attempt == 1 {
            Err(open_breaker())
        } else {
            Ok(json!({}))
        }
    });
    assert_eq!(status, SagaStatus::Completed);
    let keys: Vec<&str> = sim.calls.iter().map(|c| c.3.as_str()).collect();
    assert_eq!(
        keys,
        [
            "saga-1/pay/action",
            "saga-1/pay/fallback/action",
            "saga-1/ride/action"
        ]
    );
    assert!(sim.log.iter().any(|e| e.kind.name() == "step_rerouted"));
    assert_eq!(
        Saga::from_events(&sim.plan, &sim.log).expect("replays"),
        sim.saga
    );
}

#[test]
fn a_rerouted_step_is_compensated_through_its_fallback() {
    let mut sim = reroute_sim();
    let status = sim.run(|step, phase, attempt| match (step, phase) {
        ("pay", Phase::Action) if attempt == 1 => Err(open_breaker()),
        ("ride", Phase::Action) => Err(rejected()),
        _ => Ok(json!({})),
    });
    assert_eq!(status, SagaStatus::Compensated);
    let compensation_keys: Vec<&str> = sim
        .calls
        .iter()
        .filter(|c| c.1 == Phase::Compensation)
        .map(|c| c.3.as_str())
        .collect();
    assert_eq!(compensation_keys, ["saga-1/pay/fallback/compensation"]);
}

#[test]
fn a_step_that_reached_its_primary_is_not_rerouted() {
    let mut sim = reroute_sim();
    // The first attempt reaches payment (a transient failure: its outcome is unknown); the
    // retry is refused by the breaker. Rerouting would leave a possible effect at payment
    // without an undo, so the step fails and payment is compensated as attempted.
    let status = sim.run(|step, phase, attempt| match (step, phase, attempt) {
        ("pay", Phase::Action, 1) => Err(transient()),
        ("pay", Phase::Action, _) => Err(open_breaker()),
        _ => Ok(json!({})),
    });
    assert_eq!(status, SagaStatus::Compensated);
    assert_eq!(
        sim.saga.steps[0]
            .last_error
            .as_ref()
            .map(|e| e.code.as_str()),
        Some("CIRCUIT_OPEN")
    );
    assert!(!sim.log.iter().any(|e| e.kind.name() == "step_rerouted"));
    let compensation_keys: Vec<&str> = sim
        .calls
        .iter()
        .filter(|c| c.1 == Phase::Compensation)
        .map(|c| c.3.as_str())
        .collect();
    assert_eq!(compensation_keys, ["saga-1/pay/compensation"]);
}
