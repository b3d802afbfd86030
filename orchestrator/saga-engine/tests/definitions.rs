//! Definition validation, data-driven: each case is YAML and the errors it must produce.

use std::collections::BTreeMap;

use prost_reflect::DescriptorPool;
use saga_engine::definition::{compile, parse};
use saga_engine::{DefinitionErrors, Plan, StepKind};

fn pools() -> BTreeMap<String, DescriptorPool> {
    let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).expect("descriptor set decodes");
    ["payment", "store", "rider"]
        .into_iter()
        .map(|p| (p.to_owned(), pool.clone()))
        .collect()
}

fn build(yaml: &str) -> Result<Plan, DefinitionErrors> {
    let raw = parse("test.yaml", yaml)?;
    compile("test.yaml", yaml, &raw, &pools())
}

/// Compiles `yaml` and checks the rendered errors, one per line, in order.
fn check(yaml: &str, expected: &[&str]) {
    let errors = build(yaml).expect_err("definition should be rejected");
    let rendered: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    assert_eq!(rendered, expected, "full report:\n{errors}");
}

const HEADER: &str = "name: t
version: 1
participants:
  payment: { endpoint: http://127.0.0.1:1 }
  store: { endpoint: http://127.0.0.1:2 }
steps:
";

#[test]
fn every_file_in_sagas_compiles() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../sagas");
    let mut count = 0;
    for entry in std::fs::read_dir(dir).expect("sagas/ exists") {
        let path = entry.expect("readable entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let yaml = std::fs::read_to_string(&path).expect("readable file");
        let file = path.display().to_string();
        let raw = parse(&file, &yaml).unwrap_or_else(|e| panic!("{e}"));
        let plan = compile(&file, &yaml, &raw, &pools()).unwrap_or_else(|e| panic!("{e}"));
        assert!(!plan.steps.is_empty());
        count += 1;
    }
    assert!(count >= 1, "no definitions found in sagas/");
}

#[test]
fn order_placement_has_the_expected_shape() {
    let yaml = include_str!("../../../sagas/order-placement.yaml");
    let plan = build(yaml).expect("order-placement compiles");
    assert_eq!(plan.name, "order-placement");
    let kinds: Vec<_> = plan
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.kind, s.has_compensation()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("authorize_payment", StepKind::Compensatable, true),
            ("submit_order", StepKind::Compensatable, true),
            ("request_rider", StepKind::Pivot, false),
        ]
    );
    assert_eq!(
        plan.steps[0].call().expect("call step").action.method,
        "payment.v1.Payment/AuthorizeCharge"
    );
    let first = plan.steps[0].call().expect("call step");
    assert_eq!(first.retry.max_attempts, 5);
    assert_eq!(first.timeout.as_secs(), 2);
}

#[test]
fn syntax_errors_name_their_line() {
    check(
        "name: t\nversion: 1\nparticipants: {}\nsteps:\n  - name: a\n    colour: red\n",
        &[
            "test.yaml:6: unknown field `colour`, expected one of name, participant, kind, action, await, when, status, parallel, compensation, timeout, retry, compensation_retry, on_open, fallback, max_defer",
        ],
    );
}

#[test]
fn collects_every_semantic_error_with_line_and_step() {
    let yaml = format!(
        "{HEADER}  - name: pay
    participant: payment
    action:
      method: payment.v1.Payment/AuthorizeCharge
      request:
        order_id: ${{input.order_id}}
        colour: red
    compensation:
      method: payment.v1.Payment/Vanish
  - name: pay
    participant: stroe
    action:
      method: store.v1.Store/SubmitOrder
  - name: submit
    participant: store
    action:
      method: store.v1.Store/SubmitOrder
      request:
        items: ${{steps.later.output.x}}
        store_id: ${{steps.pay.output.nope}}
"
    );
    check(
        &yaml,
        &[
            "test.yaml:13: step `pay`: `action request.colour`: message `payment.v1.AuthorizeChargeRequest` has no field `colour` (fields: order_id, customer_id, amount_cents, card)",
            "test.yaml:15: step `pay`: compensation: service `payment.v1.Payment` has no method `Vanish` (it has: AuthorizeCharge, VoidCharge, CaptureCharge, RefundCharge, ListLedger)",
            "test.yaml:16: step `pay`: duplicate step name (first defined on line 7)",
            "test.yaml:16: step `pay`: a compensatable step needs a `compensation` (or mark the step `kind: pivot` or `kind: retriable` if it is never undone)",
            "test.yaml:17: step `pay`: unknown participant `stroe` (declared: payment, store)",
            "test.yaml:20: step `submit`: a compensatable step needs a `compensation` (or mark the step `kind: pivot` or `kind: retriable` if it is never undone)",
            "test.yaml:25: step `submit`: `${steps.later.output.x}`: `later` is not an earlier step",
        ],
    );
}

#[test]
fn step_kinds_follow_the_saga_rules() {
    let yaml = format!(
        "{HEADER}  - name: a
    participant: store
    kind: pivot
    action: {{ method: store.v1.Store/SubmitOrder }}
  - name: b
    participant: store
    action: {{ method: store.v1.Store/SubmitOrder }}
    compensation: {{ method: store.v1.Store/CancelOrder }}
  - name: c
    participant: store
    kind: pivot
    action: {{ method: store.v1.Store/SubmitOrder }}
  - name: d
    participant: store
    kind: sometimes
    action: {{ method: store.v1.Store/SubmitOrder }}
    compensation: {{ method: store.v1.Store/CancelOrder }}
"
    );
    check(
        &yaml,
        &[
            "test.yaml:11: step `b`: steps after the pivot `a` must be retriable (they are never compensated)",
            "test.yaml:15: step `c`: a saga has at most one pivot; `a` is already the pivot",
            "test.yaml:21: step `d`: unknown kind `sometimes` (use compensatable, pivot or retriable)",
        ],
    );
}

#[test]
fn input_schema_and_policies_are_checked() {
    let yaml = "name: Bad Name
version: 0
input:
  order_id: strng
participants:
  payment: { endpoint: 127.0.0.1:1 }
steps:
  - name: pay
    participant: payment
    kind: pivot
    timeout: 10 parsecs
    retry: { max_attempts: 0, multiplier: 99 }
    action:
      method: payment.v1.Payment
      request:
        order_id: ${input.order}
";
    check(
        yaml,
        &[
            "test.yaml:1: name `Bad Name` must be 1 to 64 characters of a-z, 0-9, `_` or `-`",
            "test.yaml:2: version must be 1 or more",
            "test.yaml:4: input field `order_id` has unknown type `strng` (use string, integer, number, boolean, list, object or any; add `?` for optional)",
            "test.yaml:6: participant `payment`: endpoint `127.0.0.1:1` must be an http:// or https:// URL",
            "test.yaml:11: step `pay`: timeout: duration `10 parsecs` has unknown unit `parsecs` (use ms, s, m or h)",
            "test.yaml:12: step `pay`: retry.max_attempts must be 1 or more",
            "test.yaml:12: step `pay`: retry.multiplier must be between 1 and 10, got 99",
            "test.yaml:14: step `pay`: action method `payment.v1.Payment` must be written `package.Service/Method`",
            "test.yaml:16: step `pay`: `${input.order}`: the definition's input has no field `order`",
        ],
    );
}

#[test]
fn missing_descriptors_are_reported_per_participant() {
    let yaml = "name: t
version: 1
participants:
  ghost: { endpoint: http://127.0.0.1:1 }
steps:
  - name: a
    participant: ghost
    kind: pivot
    action: { method: ghost.v1.Ghost/Boo }
";
    check(
        yaml,
        &["test.yaml:4: participant `ghost`: no descriptors for participant `ghost`"],
    );
}

#[test]
fn empty_and_oversized_definitions_are_rejected() {
    check("", &["test.yaml: definition is empty"]);
    let big = format!("# {}\n", "x".repeat(300 * 1024));
    let errors = build(&big).unwrap_err();
    assert!(
        errors.to_string().contains("the limit is 262144"),
        "{errors}"
    );
}

#[test]
fn output_references_are_checked_against_the_response_type() {
    let yaml = format!(
        "{HEADER}  - name: pay
    participant: payment
    action: {{ method: payment.v1.Payment/AuthorizeCharge }}
    compensation:
      method: payment.v1.Payment/VoidCharge
      request:
        authorization_id: ${{steps.pay.output.authorization_id}}
  - name: submit
    participant: store
    action:
      method: store.v1.Store/SubmitOrder
      request:
        store_id: ${{steps.pay.output.nope}}
        order_id: ${{saga.idd}}
        items: [1, 2]
    compensation:
      method: store.v1.Store/CancelOrder
      request:
        order_id: ${{steps.submit.output.store_order_id}}
        reason: {{ deep: true }}
"
    );
    check(
        &yaml,
        &[
            "test.yaml:19: step `submit`: `${steps.pay.output.nope}`: the output of `pay` (`payment.v1.AuthorizeChargeResponse`) has no field `nope` (fields: authorization_id, amount_cents)",
            "test.yaml:20: step `submit`: `${saga.idd}`: use saga.id, saga.definition or saga.version",
            "test.yaml:21: step `submit`: `action request.items`: 1 does not fit a field of type string",
            "test.yaml:21: step `submit`: `action request.items`: 2 does not fit a field of type string",
            "test.yaml:26: step `submit`: `compensation request.reason`: {\"deep\":true} does not fit a field of type string",
        ],
    );
}

#[test]
fn breaker_settings_and_fallbacks_are_checked() {
    let yaml = "name: t
version: 1
participants:
  payment:
    endpoint: http://127.0.0.1:1
    circuit_breaker:
      window: { count: 5, time: 10s }
      failure_rate: 0
      slow_call_rate: 150
      half_open_calls: 0
      wait_in_open: 30s
      max_wait_in_open: 10s
    on_open: later
  store:
    endpoint: http://127.0.0.1:2
    on_open: defer
steps:
  - name: pay
    participant: payment
    kind: pivot
    on_open: fail
    max_defer: 1m
    action: { method: payment.v1.Payment/AuthorizeCharge }
";
    check(
        yaml,
        &[
            "test.yaml:7: participant `payment`: circuit_breaker.window: give `count: N` (N > 0) or `time: DURATION`, not both",
            "test.yaml:7: participant `payment`: circuit_breaker.failure_rate must be a percentage in (0, 100], got 0",
            "test.yaml:7: participant `payment`: circuit_breaker.slow_call_rate must be a percentage in (0, 100], got 150",
            "test.yaml:7: participant `payment`: circuit_breaker.max_wait_in_open is shorter than wait_in_open",
            "test.yaml:7: participant `payment`: circuit_breaker.half_open_calls must be 1 or more",
            "test.yaml:13: unknown on_open `later` (use defer or fail)",
            "test.yaml:16: participant `store`: `on_open` needs a `circuit_breaker`",
            "test.yaml:22: step `pay`: max_defer only applies with on_open: defer",
        ],
    );
}

#[test]
fn order_placement_defers_payment_when_its_breaker_is_open() {
    let yaml = include_str!("../../../sagas/order-placement.yaml");
    let plan = build(yaml).expect("compiles");
    let breaker = plan.participants["payment"]
        .breaker
        .clone()
        .expect("payment has a breaker");
    assert_eq!(breaker.minimum_calls, 10);
    assert_eq!(breaker.failure_rate, 50.0);
    assert_eq!(
        plan.steps[0].call().expect("call step").on_open,
        saga_engine::definition::OnOpen::Defer {
            max_wait: std::time::Duration::from_secs(300)
        }
    );
    assert_eq!(
        plan.steps[1].call().expect("call step").on_open,
        saga_engine::definition::OnOpen::Fail
    );
}

#[test]
fn fallbacks_are_checked() {
    let yaml = "name: t
version: 1
participants:
  payment: { endpoint: http://127.0.0.1:1, circuit_breaker: {}, on_open: call }
  store: { endpoint: http://127.0.0.1:2 }
steps:
  - name: pay
    participant: payment
    on_open: call
    fallback:
      participant: store
      action: { method: store.v1.Store/SubmitOrder }
    action: { method: payment.v1.Payment/AuthorizeCharge }
    compensation: { method: payment.v1.Payment/VoidCharge }
  - name: pay2
    participant: payment
    on_open: call
    action: { method: payment.v1.Payment/AuthorizeCharge }
    compensation: { method: payment.v1.Payment/VoidCharge }
  - name: pay3
    participant: payment
    on_open: defer
    fallback:
      participant: bank
      action: { method: payment.v1.Payment/AuthorizeCharge }
    action: { method: payment.v1.Payment/AuthorizeCharge }
    compensation: { method: payment.v1.Payment/VoidCharge }
";
    check(
        yaml,
        &[
            "test.yaml:4: on_open: call is set per step, together with the step's `fallback`",
            "test.yaml:11: step `pay`: fallback: a compensatable step's fallback needs its own `compensation`",
            "test.yaml:12: step `pay`: fallback: its action returns `store.v1.SubmitOrderResponse` but the step's action returns `payment.v1.AuthorizeChargeResponse`; later steps read the output, so they must match",
            "test.yaml:17: step `pay2`: on_open: call needs a `fallback` (participant, action and compensation)",
            "test.yaml:24: step `pay3`: `fallback` is only used with on_open: call",
        ],
    );
}

#[test]
fn admission_is_checked() {
    let yaml = "name: t
version: 1
admission: reject_when_open
participants:
  store: { endpoint: http://127.0.0.1:2 }
steps:
  - name: submit
    participant: store
    kind: pivot
    action: { method: store.v1.Store/SubmitOrder }
";
    check(
        yaml,
        &[
            "test.yaml:3: admission: reject_when_open needs a circuit_breaker on the first step's participant",
        ],
    );
    let other = yaml.replace("reject_when_open", "sometimes");
    check(
        &other,
        &["test.yaml:3: unknown admission `sometimes` (use always or reject_when_open)"],
    );
}
