//! Request mappings: JSON values whose strings may hold `${path}` references.
//!
//! A string that is exactly one reference (`"${input.amount_cents}"`) takes the referenced
//! value with its JSON type; references inside a longer string are interpolated as text.
//! `$$` writes a literal `$`. Paths start at `input`, `steps.<name>.output` or `saga`
//! (`saga.id`, `saga.definition`, `saga.version`); numeric segments index lists. A path that
//! resolves to nothing gives `null` (the field is left at its default).

use serde_json::Value;

/// One `${...}` reference found in a mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The dotted segments, e.g. `["steps", "authorize_payment", "output", "authorization_id"]`.
    pub segments: Vec<String>,
}

impl Reference {
    /// The reference as written, without `${}`.
    pub fn path(&self) -> String {
        self.segments.join(".")
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Ref(Reference),
}

fn parse_pieces(text: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        literal.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            literal.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in `{text}`"))?;
            let path = body[..end].trim();
            if path.is_empty() {
                return Err(format!("empty reference `${{}}` in `{text}`"));
            }
            let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
            if segments.iter().any(|s| {
                s.is_empty()
                    || !s
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            }) {
                return Err(format!("malformed reference `${{{path}}}`"));
            }
            if !literal.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut literal)));
            }
            pieces.push(Piece::Ref(Reference { segments }));
            rest = &body[end + 1..];
        } else {
            literal.push('$');
            rest = after;
        }
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        pieces.push(Piece::Text(literal));
    }
    Ok(pieces)
}

/// Every reference in a mapping, in document order, or the first syntax error.
pub fn references(mapping: &Value) -> Result<Vec<Reference>, String> {
    let mut found = Vec::new();
    collect(mapping, &mut found)?;
    Ok(found)
}

fn collect(value: &Value, found: &mut Vec<Reference>) -> Result<(), String> {
    match value {
        Value::String(text) => {
            for piece in parse_pieces(text)? {
                if let Piece::Ref(reference) = piece {
                    found.push(reference);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                collect(item, found)?;
            }
        }
        Value::Object(map) => {
            for item in map.values() {
                collect(item, found)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Looks a dotted path up in a JSON context.
pub fn lookup<'a>(context: &'a Value, segments: &[String]) -> Option<&'a Value> {
    let mut current = context;
    for segment in segments {
        current = match current {
            Value::Object(map) => map.get(segment)?,
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

/// Resolves every reference in `mapping` against `context`. Syntax was checked when the
/// definition was compiled; a string that still fails to parse is passed through unchanged.
/// Object fields that resolve to `null` are dropped, so the message field keeps its default.
pub fn render(mapping: &Value, context: &Value) -> Value {
    match mapping {
        Value::String(text) => {
            let Ok(pieces) = parse_pieces(text) else {
                return mapping.clone();
            };
            match pieces.as_slice() {
                [Piece::Ref(reference)] => lookup(context, &reference.segments)
                    .cloned()
                    .unwrap_or(Value::Null),
                _ => {
                    let mut out = String::new();
                    for piece in pieces {
                        match piece {
                            Piece::Text(text) => out.push_str(&text),
                            Piece::Ref(reference) => match lookup(context, &reference.segments) {
                                Some(Value::String(s)) => out.push_str(s),
                                Some(Value::Null) | None => {}
                                Some(other) => out.push_str(&other.to_string()),
                            },
                        }
                    }
                    Value::String(out)
                }
            }
        }
        Value::Array(items) => Value::Array(items.iter().map(|i| render(i, context)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), render(v, context)))
                .filter(|(_, v)| !v.is_null())
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn context() -> Value {
        json!({
            "input": {"amount_cents": 2599, "order_id": "o-1", "items": ["bibimbap", "mandu"]},
            "steps": {"pay": {"output": {"authorization_id": "auth-9"}}},
            "saga": {"id": "s-1"}
        })
    }

    #[test]
    fn whole_reference_keeps_its_type() {
        let out = render(
            &json!({"amount": "${input.amount_cents}", "items": "${input.items}"}),
            &context(),
        );
        assert_eq!(out, json!({"amount": 2599, "items": ["bibimbap", "mandu"]}));
    }

    #[test]
    fn embedded_references_interpolate() {
        let out = render(
            &json!(
                "order ${input.order_id} / ${steps.pay.output.authorization_id} costs $$${input.amount_cents}"
            ),
            &context(),
        );
        assert_eq!(out, json!("order o-1 / auth-9 costs $2599"));
    }

    #[test]
    fn list_index_and_missing_values() {
        let out = render(
            &json!({"first": "${input.items.0}", "gone": "${steps.x.output.y}", "lit": 3}),
            &context(),
        );
        assert_eq!(out, json!({"first": "bibimbap", "lit": 3}));
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(
            references(&json!("${input.a"))
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(references(&json!("${}")).unwrap_err().contains("empty"));
        assert!(
            references(&json!("${input..a}"))
                .unwrap_err()
                .contains("malformed")
        );
        let refs = references(&json!({"a": ["${input.x}", "p ${saga.id}"]})).unwrap();
        assert_eq!(
            refs.iter().map(Reference::path).collect::<Vec<_>>(),
            ["input.x", "saga.id"]
        );
    }
}
