//! `when:` conditions: CEL expressions (the `cel` crate) over the saga's input, the outputs of
//! earlier steps and the saga's identity.
//!
//! The variables are the same roots as request mappings: `input`, `steps` (as in
//! `steps.authorize_payment.output.amount_cents`) and `saga` (`id`, `definition`,
//! `version`). JSON integers become CEL `int`s, so `input.amount_cents > 5000` compares as
//! written. Evaluation is pure: the same context always gives the same answer.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

/// The variables a condition may use.
pub const ROOTS: [&str; 3] = ["input", "steps", "saga"];

/// A compiled `when:` condition.
#[derive(Clone)]
pub struct Condition {
    source: String,
    program: Arc<cel::Program>,
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Condition").field(&self.source).finish()
    }
}

/// Why a condition could not be evaluated to true or false.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("condition `{expression}`: {message}")]
pub struct ConditionError {
    pub expression: String,
    pub message: String,
}

impl Condition {
    /// Compiles `source`, checking that it uses only the known roots.
    pub fn compile(source: &str) -> Result<Condition, String> {
        let program = cel::Program::compile(source).map_err(|e| {
            let text = e.to_string();
            format!(
                "`when` is not a valid CEL expression: {}",
                text.lines().next().unwrap_or(&text).trim()
            )
        })?;
        let references = program.references();
        let unknown: Vec<&str> = references
            .variables()
            .into_iter()
            .filter(|v| !ROOTS.contains(v))
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "`when` uses unknown variable(s) {} (use input, steps or saga)",
                unknown
                    .iter()
                    .map(|v| format!("`{v}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(Condition {
            source: source.to_owned(),
            program: Arc::new(program),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the condition against the mapping context (`{input, steps, saga}`).
    pub fn eval(&self, context: &Value) -> Result<bool, ConditionError> {
        let error = |message: String| ConditionError {
            expression: self.source.clone(),
            message,
        };
        let mut cel_context = cel::Context::default();
        for root in ROOTS {
            let value = context.get(root).cloned().unwrap_or(Value::Null);
            cel_context.add_variable_from_value(root, to_cel(&value));
        }
        match self.program.execute(&cel_context) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(error(format!("gave {other:?}, not true or false"))),
            Err(e) => Err(error(e.to_string())),
        }
    }
}

/// JSON to CEL, with integers as `int` where they fit (so they compare with CEL literals).
fn to_cel(value: &Value) -> cel::Value {
    match value {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                cel::Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                cel::Value::UInt(u)
            } else {
                cel::Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(items) => cel::Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => {
            let map: HashMap<cel::objects::Key, cel::Value> = map
                .iter()
                .map(|(k, v)| (cel::objects::Key::String(Arc::new(k.clone())), to_cel(v)))
                .collect();
            cel::Value::Map(cel::objects::Map { map: Arc::new(map) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn context() -> Value {
        json!({
            "input": {"amount_cents": 6000, "zone": "gangnam", "items": ["a", "b"]},
            "steps": {"store_decision": {"output": {"signal": "store.accepted", "payload": {"eta": 20}}}},
            "saga": {"id": "s-1", "definition": "d", "version": 1},
        })
    }

    #[test]
    fn evaluates_over_input_and_outputs() {
        let cases = [
            ("input.amount_cents > 5000", true),
            ("input.amount_cents > 6000", false),
            ("input.zone == 'gangnam' && size(input.items) == 2", true),
            ("steps.store_decision.output.payload.eta <= 30", true),
            ("has(input.vip) && input.vip", false),
            ("saga.version == 1", true),
        ];
        for (source, expected) in cases {
            let condition = Condition::compile(source).expect(source);
            assert_eq!(condition.eval(&context()), Ok(expected), "{source}");
        }
    }

    #[test]
    fn refuses_bad_expressions_and_unknown_roots() {
        let error = Condition::compile("input.amount >").expect_err("syntax");
        assert!(error.contains("not a valid CEL expression"), "{error}");
        let error = Condition::compile("order.amount > 1").expect_err("root");
        assert!(error.contains("`order`"), "{error}");
    }

    #[test]
    fn evaluation_errors_name_the_condition() {
        let condition = Condition::compile("input.missing > 1").expect("compiles");
        let error = condition.eval(&context()).expect_err("no such key");
        assert!(error.to_string().contains("input.missing > 1"), "{error}");
        let condition = Condition::compile("input.zone").expect("compiles");
        let error = condition.eval(&context()).expect_err("not a bool");
        assert!(error.message.contains("not true or false"), "{error}");
    }
}
