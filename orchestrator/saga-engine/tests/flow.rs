//! The food-delivery flow through the pure state machine: await steps and signals, early
//! signals, timeouts, the cancellation point, business statuses, parallel groups,
//! conditions and the saga deadline. Time is simulated; crashes are replays of the log.

use std::collections::BTreeMap;

use prost_reflect::DescriptorPool;
use saga_engine::definition::{compile, parse};
use saga_engine::saga::CancelRefused;
use saga_engine::{
    CallError, Event, Next, Phase, Plan, Saga, SagaStatus, SignalOutcome, SignalRefused, StepStatus,
};
use serde_json::{Value, json};

fn pools() -> BTreeMap<String, DescriptorPool> {
    let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    ["payment", "store", "rider"]
        .into_iter()
        .map(|p| (p.to_owned(), pool.clone()))
        .collect()
}

fn compile_yaml(file: &str, yaml: &str) -> Plan {
    let raw = parse(file, yaml).expect("parses");
    compile(file, yaml, &raw, &pools()).unwrap_or_else(|e| panic!("{e}"))
}

fn food_delivery() -> Plan {
    compile_yaml(
        "food-delivery.yaml",
        include_str!("../../../sagas/food-delivery.yaml"),
    )
}

fn input() -> Value {
    json!({"order_id": "o-1", "customer_id": "c-1", "amount_cents": 2599, "card": "tok_visa",
           "store_id": "s-1", "items": ["bibimbap"], "zone": "gangnam"})
}

/// A simulated runtime: calls succeed unless `fail` names their step; time only moves when
/// the saga waits for a time.
struct Sim {
    plan: Plan,
    log: Vec<Event>,
    saga: Saga,
    now: u64,
    /// (step, phase) of every call made, in order.
    calls: Vec<(String, Phase)>,
    /// Business statuses seen, without repeats.
    statuses: Vec<String>,
    fail: Vec<&'static str>,
}

impl Sim {
    fn new(plan: Plan) -> Sim {
        let first = Saga::start_event(&plan, "saga-1", input(), "key-1", 1_000);
        let saga = Saga::from_events(&plan, [&first]).expect("starts");
        let mut sim = Sim {
            plan,
            log: vec![first],
            saga,
            now: 1_000,
            calls: Vec::new(),
            statuses: Vec::new(),
            fail: Vec::new(),
        };
        sim.note_status();
        sim
    }

    fn note_status(&mut self) {
        let status = self.saga.business_status(&self.plan);
        if self.statuses.last() != Some(&status) {
            self.statuses.push(status);
        }
    }

    fn record(&mut self, event: Event) {
        self.saga.apply(&self.plan, &event).expect("event applies");
        self.log.push(event);
        self.note_status();
    }

    /// Runs until the saga waits for a signal (or a time later than `until`), or ends.
    fn settle(&mut self, until: u64) -> Next {
        for _ in 0..1_000 {
            match self.saga.next(&self.plan, self.now) {
                Next::Record(event) => self.record(event),
                Next::Wait(wait) if !wait.calls.is_empty() => {
                    for call in wait.calls {
                        self.calls.push((call.step.clone(), call.phase));
                        let result = if self.fail.contains(&call.step.as_str())
                            && call.phase == Phase::Action
                        {
                            Err(CallError {
                                code: "FAILED_PRECONDITION".into(),
                                message: "no".into(),
                                retryable: false,
                                rejected: false,
                            })
                        } else {
                            Ok(json!({"authorization_id": "auth-1", "store_order_id": "so-1"}))
                        };
                        self.now += 1;
                        let event = self
                            .saga
                            .on_result(&self.plan, &call, result, self.now, 0.5)
                            .expect("in flight");
                        self.record(event);
                    }
                }
                Next::Wait(wait) => match wait.wake_at_ms {
                    Some(at) if at <= until => self.now = at,
                    _ => return Next::Wait(wait),
                },
                Next::Done => return Next::Done,
            }
        }
        panic!("saga did not settle");
    }

    fn signal(&mut self, signal: &str, payload: Value) -> Result<SignalOutcome, SignalRefused> {
        let outcome = self.saga.signal(&self.plan, signal, &payload, self.now)?;
        if let SignalOutcome::Record { event, .. } = &outcome {
            self.record(event.clone());
        }
        Ok(outcome)
    }

    fn waiting_for(&mut self) -> Vec<String> {
        match self.settle(self.now) {
            Next::Wait(wait) => wait.signals,
            other => panic!("not waiting: {other:?}"),
        }
    }

    fn compensations(&self) -> Vec<&str> {
        self.calls
            .iter()
            .filter(|(_, p)| *p == Phase::Compensation)
            .map(|(s, _)| s.as_str())
            .collect()
    }

    /// Runs the steps before the parallel group (each call succeeding) until both of the
    /// group's calls are in flight; returns them.
    fn until_group_calls(&mut self) -> Vec<saga_engine::saga::Call> {
        loop {
            match self.saga.next(&self.plan, self.now) {
                Next::Record(event) => self.record(event),
                Next::Wait(wait) if wait.calls.len() == 2 => return wait.calls,
                Next::Wait(wait) => {
                    let call = wait.calls[0].clone();
                    let event = self
                        .saga
                        .on_result(&self.plan, &call, Ok(json!({})), self.now, 0.5)
                        .expect("in flight");
                    self.record(event);
                }
                Next::Done => panic!("ended before the parallel group"),
            }
        }
    }

    fn replayed(&self) -> Saga {
        Saga::from_events(&self.plan, &self.log).expect("log replays")
    }
}

#[test]
fn the_accept_path_runs_to_delivered() {
    let mut sim = Sim::new(food_delivery());
    assert_eq!(sim.waiting_for(), ["store.accepted", "store.rejected"]);
    assert_eq!(sim.saga.status(), SagaStatus::Waiting);
    assert!(
        sim.saga
            .waiting_for(&sim.plan)
            .expect("waiting")
            .contains("signal `store.accepted` or `store.rejected`")
    );
    sim.signal("store.accepted", json!({"eta_minutes": 25}))
        .expect("taken");
    assert_eq!(sim.waiting_for(), ["cooking.started"]);
    sim.signal("cooking.started", json!({})).expect("taken");
    assert_eq!(sim.waiting_for(), ["cooking.finished"]);
    // The rider was requested as soon as cooking started.
    assert!(sim.calls.contains(&("request_rider".into(), Phase::Action)));
    for signal in ["cooking.finished", "rider.picked_up", "rider.delivered"] {
        sim.signal(signal, json!({})).expect("taken");
        sim.settle(sim.now);
    }
    assert_eq!(sim.saga.status(), SagaStatus::Completed);
    assert_eq!(
        sim.statuses,
        [
            "paying",
            "sending the order to the store",
            "waiting for the store",
            "accepted by the store, waiting for the kitchen",
            "cooking",
            "ready, waiting for the rider",
            "on the way",
            "delivered",
        ]
    );
    // The payload is the await step's output.
    let decision = sim.plan.step("store_decision").expect("step").0;
    assert_eq!(
        sim.saga.steps[decision].output,
        Some(
            json!({"signal": "store.accepted", "payload": {"eta_minutes": 25}, "timed_out": false})
        )
    );
    assert_eq!(sim.compensations(), Vec::<&str>::new());
    assert_eq!(sim.replayed(), sim.saga);
}

#[test]
fn a_store_rejection_compensates_in_reverse() {
    let mut sim = Sim::new(food_delivery());
    sim.waiting_for();
    sim.signal("store.rejected", json!({"why": "sold out"}))
        .expect("taken");
    assert_eq!(sim.settle(sim.now), Next::Done);
    assert_eq!(sim.saga.status(), SagaStatus::Compensated);
    assert_eq!(sim.compensations(), ["submit_order", "authorize_payment"]);
    let reason = sim.saga.reason.clone().expect("reason");
    assert!(
        reason.contains("signal `store.rejected` received"),
        "{reason}"
    );
    assert_eq!(
        sim.saga.business_status(&sim.plan),
        "order could not be placed, payment refunded"
    );
}

#[test]
fn the_store_timeout_fires_at_its_time_even_after_a_restart() {
    let mut sim = Sim::new(food_delivery());
    sim.waiting_for();
    let started = sim.now;
    // A restart two minutes in: the timer comes from the log, not from the restart.
    sim.now += 120_000;
    sim.saga = sim.replayed();
    match sim.saga.next(&sim.plan, sim.now) {
        Next::Wait(wait) => assert_eq!(wait.wake_at_ms, Some(started + 300_000)),
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.settle(started + 300_000), Next::Done);
    assert_eq!(sim.saga.status(), SagaStatus::Compensated);
    let error = sim.saga.steps[2].last_error.clone().expect("error");
    assert_eq!(error.code, "DEADLINE_EXCEEDED");
    assert_eq!(sim.compensations(), ["submit_order", "authorize_payment"]);
}

#[test]
fn cancel_is_allowed_until_cooking_starts() {
    let mut sim = Sim::new(food_delivery());
    sim.waiting_for();
    sim.signal("store.accepted", json!({})).expect("taken");
    sim.waiting_for();
    let event = sim
        .saga
        .cancel(&sim.plan, "changed my mind", sim.now)
        .expect("allowed")
        .expect("new");
    sim.record(event);
    assert_eq!(sim.settle(sim.now), Next::Done);
    assert_eq!(sim.saga.status(), SagaStatus::Compensated);
    assert_eq!(sim.compensations(), ["submit_order", "authorize_payment"]);
    assert_eq!(
        sim.saga.business_status(&sim.plan),
        "cancelled, payment refunded"
    );

    let mut sim = Sim::new(food_delivery());
    sim.waiting_for();
    sim.signal("store.accepted", json!({})).expect("taken");
    sim.waiting_for();
    sim.signal("cooking.started", json!({})).expect("taken");
    sim.waiting_for();
    let refused = sim
        .saga
        .cancel(&sim.plan, "too late", sim.now)
        .expect_err("refused");
    assert_eq!(refused, CancelRefused::PastPoint("cooking_started".into()));
    assert!(refused.to_string().contains("cooking_started"));
}

#[test]
fn early_signals_are_kept_and_taken_in_order() {
    let mut sim = Sim::new(food_delivery());
    // Before the saga even reached the store's decision.
    let outcome = sim
        .signal("store.accepted", json!({"eta_minutes": 10}))
        .expect("kept");
    assert!(
        matches!(outcome, SignalOutcome::Record { buffered: true, ref step, .. } if step == "store_decision")
    );
    // The same again is a duplicate; the other answer for the same step is refused.
    assert_eq!(
        sim.signal("store.accepted", json!({"eta_minutes": 10})),
        Ok(SignalOutcome::Duplicate {
            step: "store_decision".into()
        })
    );
    let refused = sim
        .signal("store.rejected", json!({}))
        .expect_err("one answer per step");
    assert!(
        refused
            .to_string()
            .contains("already has signal `store.accepted`"),
        "{refused}"
    );
    sim.signal("cooking.started", json!({})).expect("kept");
    assert_eq!(sim.saga.buffered.len(), 2);
    // Survives a restart: it is in the log.
    sim.saga = sim.replayed();
    assert_eq!(sim.waiting_for(), ["cooking.finished"]);
    assert!(sim.saga.buffered.is_empty());
    // Now late ones are refused, with the reason.
    let refused = sim
        .signal("store.rejected", json!({}))
        .expect_err("too late");
    assert!(
        refused
            .to_string()
            .contains("already received `store.accepted`"),
        "{refused}"
    );
    let unknown = sim
        .signal("store.exploded", json!({}))
        .expect_err("unknown");
    assert!(
        matches!(&unknown, SignalRefused::Unknown { known, .. } if known.contains("rider.delivered")),
        "{unknown}"
    );
}

#[test]
fn signals_after_the_end_are_refused_but_repeats_are_fine() {
    let mut sim = Sim::new(food_delivery());
    sim.waiting_for();
    sim.signal("store.rejected", json!({})).expect("taken");
    sim.settle(sim.now);
    assert_eq!(
        sim.signal("store.rejected", json!({})),
        Ok(SignalOutcome::Duplicate {
            step: "store_decision".into()
        })
    );
    assert_eq!(
        sim.signal("cooking.started", json!({})),
        Err(SignalRefused::Terminal(SagaStatus::Compensated))
    );
}

const PARALLEL: &str = r#"
name: parallel
version: 1
deadline: 10m
participants:
  payment: { endpoint: "http://127.0.0.1:1" }
  store: { endpoint: "http://127.0.0.1:2" }
  rider: { endpoint: "http://127.0.0.1:3" }
steps:
  - name: pay
    participant: payment
    action: { method: payment.v1.Payment/AuthorizeCharge, request: { order_id: "${input.order_id}" } }
    compensation: { method: payment.v1.Payment/VoidCharge, request: { order_id: "${input.order_id}" } }
  - name: notify_store
    parallel: prepare
    participant: store
    action: { method: store.v1.Store/SubmitOrder, request: { order_id: "${input.order_id}" } }
    compensation: { method: store.v1.Store/CancelOrder, request: { order_id: "${input.order_id}" } }
  - name: reserve_rider
    parallel: prepare
    participant: rider
    action: { method: rider.v1.Rider/RequestDelivery, request: { order_id: "${input.order_id}" } }
    compensation: { method: rider.v1.Rider/CancelDelivery, request: { order_id: "${input.order_id}" } }
  - name: big_order_check
    when: "input.amount_cents > 5000"
    await: { signal: manager.approved, timeout: 1m, on_timeout: continue }
  - name: capture
    kind: pivot
    participant: payment
    action: { method: payment.v1.Payment/CaptureCharge, request: { order_id: "${input.order_id}" } }
"#;

#[test]
fn a_parallel_group_runs_together_and_compensates_in_reverse_completion_order() {
    let plan = compile_yaml("parallel.yaml", PARALLEL);
    let mut sim = Sim::new(plan);
    // Run the first step, then both intents of the group are stored before any call.
    let group_calls = sim.until_group_calls();
    assert_eq!(group_calls[0].step, "notify_store");
    assert_eq!(group_calls[1].step, "reserve_rider");
    // reserve_rider finishes first, then notify_store fails: the saga waits for nothing
    // else and compensates reserve_rider (completed last... first) in reverse completion
    // order: the latest completion is undone first.
    let ok = sim
        .saga
        .on_result(&sim.plan, &group_calls[1], Ok(json!({})), sim.now, 0.5)
        .expect("in flight");
    sim.record(ok);
    // While one call is in flight the saga does not start compensating.
    let failed = sim
        .saga
        .on_result(
            &sim.plan,
            &group_calls[0],
            Err(CallError {
                code: "FAILED_PRECONDITION".into(),
                message: "closed".into(),
                retryable: false,
                rejected: false,
            }),
            sim.now,
            0.5,
        )
        .expect("in flight");
    sim.record(failed);
    assert_eq!(sim.settle(sim.now), Next::Done);
    assert_eq!(sim.saga.status(), SagaStatus::Compensated);
    assert_eq!(
        sim.compensations(),
        ["notify_store", "reserve_rider", "pay"]
    );
}

#[test]
fn compensation_waits_for_calls_still_in_flight() {
    let plan = compile_yaml("parallel.yaml", PARALLEL);
    let mut sim = Sim::new(plan);
    let group_calls = sim.until_group_calls();
    let failed = sim
        .saga
        .on_result(
            &sim.plan,
            &group_calls[0],
            Err(CallError {
                code: "FAILED_PRECONDITION".into(),
                message: "closed".into(),
                retryable: false,
                rejected: false,
            }),
            sim.now,
            0.5,
        )
        .expect("in flight");
    sim.record(failed);
    match sim.saga.next(&sim.plan, sim.now) {
        Next::Wait(wait) => {
            assert_eq!(wait.calls.len(), 1);
            assert_eq!(wait.calls[0].step, "reserve_rider");
        }
        other => panic!("compensation must wait for the call in flight: {other:?}"),
    }
}

#[test]
fn a_false_condition_skips_and_a_continue_timeout_goes_on() {
    let plan = compile_yaml("parallel.yaml", PARALLEL);
    // amount_cents 2599: the check is skipped.
    let mut sim = Sim::new(plan.clone());
    assert_eq!(sim.settle(u64::MAX), Next::Done);
    assert_eq!(sim.saga.status(), SagaStatus::Completed);
    assert_eq!(sim.saga.steps[3].status, StepStatus::Skipped);

    // A big order waits for the manager, whose silence continues after a minute.
    let first = Saga::start_event(
        &plan,
        "saga-2",
        json!({"order_id": "o-2", "amount_cents": 9000}),
        "key-2",
        1_000,
    );
    let mut sim = Sim {
        saga: Saga::from_events(&plan, [&first]).expect("starts"),
        log: vec![first],
        ..Sim::new(plan)
    };
    assert_eq!(sim.waiting_for(), ["manager.approved"]);
    let waited_from = sim.now;
    assert_eq!(sim.settle(u64::MAX), Next::Done);
    assert_eq!(sim.saga.status(), SagaStatus::Completed);
    assert_eq!(
        sim.saga.steps[3].output,
        Some(json!({"signal": null, "payload": null, "timed_out": true}))
    );
    assert!(sim.now >= waited_from + 60_000);
}

#[test]
fn the_saga_deadline_compensates_before_the_pivot() {
    let plan = compile_yaml("parallel.yaml", PARALLEL);
    let first = Saga::start_event(
        &plan,
        "saga-3",
        json!({"order_id": "o-3", "amount_cents": 9000}),
        "key-3",
        1_000,
    );
    let mut sim = Sim {
        saga: Saga::from_events(&plan, [&first]).expect("starts"),
        log: vec![first],
        ..Sim::new(plan.clone())
    };
    // The manager's await would continue after 1 minute; make the deadline come first
    // by moving time past it while waiting.
    sim.waiting_for();
    sim.now = 1_000 + 10 * 60_000;
    assert_eq!(sim.settle(sim.now), Next::Done);
    assert_eq!(sim.saga.status(), SagaStatus::Compensated);
    assert!(
        sim.saga
            .reason
            .clone()
            .expect("reason")
            .contains("deadline")
    );
}

fn errors_of(yaml: &str) -> Vec<String> {
    let raw = match parse("bad.yaml", yaml) {
        Ok(raw) => raw,
        Err(e) => return e.0.iter().map(ToString::to_string).collect(),
    };
    match compile("bad.yaml", yaml, &raw, &pools()) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn the_new_definition_rules_are_validated_with_lines() {
    let yaml = r#"
name: bad
cancellable_until: nowhere
participants:
  payment: { endpoint: "http://127.0.0.1:1" }
  store: { endpoint: "http://127.0.0.1:2" }
steps:
  - name: pay
    participant: payment
    action: { method: payment.v1.Payment/AuthorizeCharge }
    compensation: { method: payment.v1.Payment/VoidCharge }
    when: "order.total > 1"
  - name: wait_a
    participant: store
    await: { signal: store.accepted }
  - name: wait_b
    await: { signal: Store Accepted, fail_on: [store.accepted], on_timeout: continue, continue_at: pay }
  - name: g1
    parallel: grp
    participant: store
    action: { method: store.v1.Store/SubmitOrder }
    compensation: { method: store.v1.Store/CancelOrder }
  - name: between
    await: { signal: x.y }
  - name: g2
    parallel: grp
    participant: store
    action: { method: store.v1.Store/SubmitOrder }
    compensation: { method: store.v1.Store/CancelOrder }
  - name: pivot
    kind: pivot
    await: { signal: p.q }
  - name: after
    await: { signal: a.b, timeout: 1m }
"#;
    let errors = errors_of(yaml);
    let expected = [
        "bad.yaml:3: cancellable_until: no step is named `nowhere`",
        "bad.yaml:12: step `pay`: `when` uses unknown variable(s) `order`",
        "bad.yaml:15: step `wait_a`: a step either awaits a signal or calls a participant",
        "bad.yaml:17: step `wait_b`: signal `Store Accepted` must be",
        "bad.yaml:17: step `wait_b`: on_timeout: continue needs an await.timeout",
        "bad.yaml:17: step `wait_b`: continue_at: `pay` is not a later step",
        "bad.yaml:26: step `g2`: the steps of parallel group `grp` must be consecutive",
        "bad.yaml:34: step `after`: after the pivot a saga cannot compensate",
    ];
    for want in expected {
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "missing {want:?} in:\n{}",
            errors.join("\n")
        );
    }
    // `store.accepted` is used twice (once in wait_a, which did not compile, so the second
    // use is the first that counts): every signal belongs to one await step.
    let yaml = r#"
name: twice
steps:
  - name: a
    await: { signal: s.one }
  - name: b
    await: { signal: s.two, fail_on: [s.one] }
participants: {}
"#;
    let errors = errors_of(yaml);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("signal `s.one` is already awaited by step `a`")),
        "{errors:?}"
    );
}
