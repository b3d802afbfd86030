//! The definition language's JSON Schema: `sagas/schema.json` is current, the shipped
//! definitions satisfy it, and it rejects what it should.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost_reflect::DescriptorPool;
use saga_engine::definition::{compile, json_schema, parse};
use saga_engine::duration::parse_duration;
use serde_json::{Value, json};

fn sagas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sagas")
}

/// The schema's complaints about `yaml`, each as `PATH: MESSAGE`; empty if it conforms.
///
/// The complaints come from the detailed evaluation, so a wrong value inside an optional
/// block is reported where it is, not as the block matching none of `anyOf` (value or null).
fn problems(yaml: &str) -> Vec<String> {
    let instance: Value = serde_saphyr::from_str(yaml).expect("YAML parses");
    let validator = jsonschema::validator_for(&json_schema()).expect("the schema is valid");
    if validator.is_valid(&instance) {
        return Vec::new();
    }
    let problems: Vec<String> = validator
        .evaluate(&instance)
        .iter_errors()
        .map(|e| format!("{}: {}", e.instance_location.as_str(), e.error))
        .collect();
    assert!(!problems.is_empty(), "an invalid instance has problems");
    problems
}

/// Whether the engine itself accepts `yaml` (parse and compile).
fn compiles(yaml: &str) -> bool {
    let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).expect("descriptor set decodes");
    let pools: BTreeMap<String, DescriptorPool> = ["payment", "store", "rider"]
        .into_iter()
        .map(|p| (p.to_owned(), pool.clone()))
        .collect();
    parse("test.yaml", yaml).is_ok_and(|raw| compile("test.yaml", yaml, &raw, &pools).is_ok())
}

#[test]
fn schema_file_is_current() {
    let path = sagas_dir().join("schema.json");
    let schema = json_schema();
    let on_disk: Option<Value> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    if on_disk.as_ref() == Some(&schema) {
        return;
    }
    if std::env::var_os("UPDATE_SCHEMA").is_some_and(|v| v == "1") {
        let text = serde_json::to_string_pretty(&schema).expect("schema serializes") + "\n";
        std::fs::write(&path, text).expect("sagas/schema.json is writable");
        return;
    }
    panic!(
        "{} is missing or out of date with the definition structs \
         (orchestrator/saga-engine/src/definition/raw.rs); regenerate it with\n  \
         UPDATE_SCHEMA=1 cargo test -p saga-engine --test schema",
        path.display()
    );
}

#[test]
fn every_shipped_definition_satisfies_the_schema() {
    let mut count = 0;
    for entry in std::fs::read_dir(sagas_dir()).expect("sagas/ exists") {
        let path = entry.expect("readable entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let yaml = std::fs::read_to_string(&path).expect("readable file");
        let problems = problems(&yaml);
        assert!(
            problems.is_empty(),
            "{} does not satisfy the schema:\n  {}",
            path.display(),
            problems.join("\n  ")
        );
        count += 1;
    }
    assert!(
        count >= 2,
        "expected the definitions in sagas/, found {count}"
    );
}

const VALID: &str = "name: t
participants:
  payment:
    endpoint: http://127.0.0.1:1
    circuit_breaker: { window: { time: 10s }, failure_rate: 50 }
steps:
  - name: pay
    participant: payment
    kind: pivot
    timeout: 1.5s
    on_open: defer
    action: { method: payment.v1.Payment/AuthorizeCharge, request: { amount_cents: 100 } }
  - name: wait
    await: { signal: store.accepted, timeout: 5m, on_timeout: continue }
";

#[test]
fn a_valid_definition_conforms() {
    assert!(compiles(VALID), "the engine accepts the example");
    assert_eq!(problems(VALID), Vec::<String>::new());
}

/// Each case changes `VALID` into a definition the engine refuses; the schema must refuse it
/// too, at `path`.
#[test]
fn schema_rejects_unknown_fields_and_wrong_values() {
    let cases = [
        (
            "    kind: pivot\n",
            "    kind: pivot\n    colour: red\n",
            "/steps/0",
        ),
        ("kind: pivot", "kind: pivotal", "/steps/0/kind"),
        ("timeout: 1.5s", "timeout: 3 days", "/steps/0/timeout"),
        ("timeout: 1.5s", "timeout: 10", "/steps/0/timeout"),
        ("on_open: defer", "on_open: later", "/steps/0/on_open"),
        (
            "on_timeout: continue",
            "on_timeout: wait",
            "/steps/1/await/on_timeout",
        ),
        (
            "signal: store.accepted",
            "signal: Store Accepted",
            "/steps/1/await/signal",
        ),
        ("name: pay", "name: Pay", "/steps/0/name"),
        (
            "failure_rate: 50",
            "failure_rate: 150",
            "/participants/payment/circuit_breaker/failure_rate",
        ),
        (
            "endpoint: http://127.0.0.1:1",
            "endpoint: 127.0.0.1:1",
            "/participants/payment/endpoint",
        ),
        (
            "payment.v1.Payment/",
            "payment.v1.Payment.",
            "/steps/0/action/method",
        ),
        ("name: t\n", "name: t\nadmission: sometimes\n", "/admission"),
        (
            "name: t\n",
            "name: t\ninput: { order_id: text }\n",
            "/input/order_id",
        ),
        ("name: t\n", "", ""),
    ];
    for (from, to, path) in cases {
        assert!(
            VALID.contains(from),
            "case `{to}`: `{from}` is not in the example"
        );
        let yaml = VALID.replacen(from, to, 1);
        assert!(
            !compiles(&yaml),
            "case `{to}`: the engine accepts it, so the schema must too"
        );
        let problems = problems(&yaml);
        assert!(
            problems.iter().any(|p| p.starts_with(&format!("{path}: "))),
            "case `{to}`: expected a problem at `{path}`, got {problems:?}"
        );
    }
}

#[test]
fn duration_pattern_agrees_with_the_parser() {
    let schema = json_schema();
    let duration = &schema["$defs"]["Duration"];
    let validator = jsonschema::validator_for(duration).expect("the duration schema is valid");
    let samples = [
        "250ms", "2s", "1.5s", "5m", "1h", " 1h ", "2 s", ".5s", "1.s", "10", "ms", "s2", "3 days",
        "1.2.3s", "2S", "-1s", "1e3ms", "",
    ];
    for text in samples {
        assert_eq!(
            validator.is_valid(&json!(text)),
            parse_duration(text).is_ok(),
            "`{text}`: the pattern and parse_duration disagree"
        );
    }
}
