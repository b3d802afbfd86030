//! The optional input schema of a definition, checked when a saga starts.

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    String,
    Integer,
    Number,
    Boolean,
    List,
    Object,
    Any,
}

impl FieldType {
    pub fn parse(text: &str) -> Option<FieldType> {
        Some(match text {
            "string" => FieldType::String,
            "integer" => FieldType::Integer,
            "number" => FieldType::Number,
            "boolean" => FieldType::Boolean,
            "list" => FieldType::List,
            "object" => FieldType::Object,
            "any" => FieldType::Any,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Integer => "integer",
            FieldType::Number => "number",
            FieldType::Boolean => "boolean",
            FieldType::List => "list",
            FieldType::Object => "object",
            FieldType::Any => "any",
        }
    }

    fn accepts(self, value: &Value) -> bool {
        match self {
            FieldType::String => value.is_string(),
            FieldType::Integer => {
                value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            FieldType::Number => value.is_number(),
            FieldType::Boolean => value.is_boolean(),
            FieldType::List => value.is_array(),
            FieldType::Object => value.is_object(),
            FieldType::Any => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputField {
    pub name: String,
    pub ty: FieldType,
    pub required: bool,
}

/// The fields a saga's input must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSchema {
    pub fields: Vec<InputField>,
}

fn describe(value: &Value) -> String {
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    };
    let mut text = value.to_string();
    if text.len() > 40 {
        text.truncate(37);
        text.push_str("...");
    }
    format!("{kind} {text}")
}

impl InputSchema {
    pub fn field(&self, name: &str) -> Option<&InputField> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Checks an input against the schema; each error names the field, like
    /// `input.amount_cents: expected integer, got string "12"`.
    pub fn check(&self, input: &Value) -> Result<(), Vec<String>> {
        let Value::Object(map) = input else {
            return Err(vec![format!(
                "input: expected an object, got {}",
                describe(input)
            )]);
        };
        let mut errors = Vec::new();
        for field in &self.fields {
            match map.get(&field.name) {
                None | Some(Value::Null) if field.required => {
                    errors.push(format!(
                        "input.{}: required {} field is missing",
                        field.name,
                        field.ty.as_str()
                    ));
                }
                None | Some(Value::Null) => {}
                Some(value) if !field.ty.accepts(value) => errors.push(format!(
                    "input.{}: expected {}, got {}",
                    field.name,
                    field.ty.as_str(),
                    describe(value)
                )),
                Some(_) => {}
            }
        }
        for name in map.keys() {
            if self.field(name).is_none() {
                let known: Vec<&str> = self.fields.iter().map(|f| f.name.as_str()).collect();
                errors.push(format!(
                    "input.{name}: unknown field (expected one of: {})",
                    known.join(", ")
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> InputSchema {
        InputSchema {
            fields: vec![
                InputField {
                    name: "order_id".into(),
                    ty: FieldType::String,
                    required: true,
                },
                InputField {
                    name: "amount_cents".into(),
                    ty: FieldType::Integer,
                    required: true,
                },
                InputField {
                    name: "note".into(),
                    ty: FieldType::String,
                    required: false,
                },
            ],
        }
    }

    #[test]
    fn accepts_valid_input() {
        assert_eq!(
            schema().check(&json!({"order_id": "o", "amount_cents": 10})),
            Ok(())
        );
        assert_eq!(
            schema().check(&json!({"order_id": "o", "amount_cents": 10.0, "note": "x"})),
            Ok(())
        );
    }

    #[test]
    fn names_every_bad_field() {
        let errors = schema()
            .check(&json!({"amount_cents": "12", "colour": "red"}))
            .unwrap_err();
        assert_eq!(
            errors,
            [
                "input.order_id: required string field is missing",
                "input.amount_cents: expected integer, got string \"12\"",
                "input.colour: unknown field (expected one of: order_id, amount_cents, note)",
            ]
        );
        assert!(schema().check(&json!([1])).unwrap_err()[0].contains("expected an object"));
    }
}
