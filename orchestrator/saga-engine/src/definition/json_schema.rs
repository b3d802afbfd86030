//! The definition language as a JSON Schema, for editors with a YAML language server.
//!
//! The schema is derived from the raw structs (see [`super::raw`]). Their fields keep source
//! positions and hold plain strings where the language has a fixed vocabulary or a syntax
//! (durations, names, step kinds), so the types below exist only to describe those strings:
//! the raw structs name them in `#[schemars(with = "...")]` and no value of them is ever made.
//! The compiler stays the authority; the schema mirrors its simple rules so that an editor
//! can complete and flag them while typing.

use std::borrow::Cow;

use schemars::generate::SchemaSettings;
use schemars::transform::RecursiveTransform;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::Value;

use super::raw::RawDefinition;

/// The JSON Schema (draft 2020-12) of a definition file, as kept in `sagas/schema.json`.
pub fn json_schema() -> Value {
    SchemaSettings::draft2020_12()
        .with_transform(RecursiveTransform(tidy))
        .into_generator()
        .into_root_schema_for::<RawDefinition>()
        .to_value()
}

/// Drops `"default": null` (an editor would offer to write `null`) and joins the lines of
/// descriptions that come from wrapped doc comments.
fn tidy(schema: &mut Schema) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    if object.get("default").is_some_and(Value::is_null) {
        object.remove("default");
    }
    if let Some(Value::String(text)) = object.get_mut("description") {
        *text = text
            .split("\n\n")
            .map(|paragraph| paragraph.replace('\n', " "))
            .collect::<Vec<_>>()
            .join("\n\n");
    }
}

/// A duration, as [`crate::duration::parse_duration`] reads it.
pub(super) struct Duration;

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A number and a unit, `ms`, `s`, `m` or `h`: e.g. `500ms`, `2s`, \
                `1.5s`, `5m`, `1h`; at most a week.",
            "pattern": r"^\s*(\d+(\.\d*)?|\.\d+)\s*(ms|s|m|h)\s*$",
            "examples": ["500ms", "2s", "5m", "1h"],
        })
    }
}

/// The name of a definition, participant, step or parallel group.
pub(super) struct Name;

impl JsonSchema for Name {
    fn schema_name() -> Cow<'static, str> {
        "Name".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "1 to 64 characters of a-z, 0-9, `_` or `-`.",
            "pattern": "^[a-z0-9_-]{1,64}$",
        })
    }
}

/// The name of a signal an await step waits for.
pub(super) struct Signal;

impl JsonSchema for Signal {
    fn schema_name() -> Cow<'static, str> {
        "Signal".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "1 to 64 characters of a-z, 0-9, `.`, `_` or `-`, \
                e.g. `store.accepted`.",
            "pattern": r"^[a-z0-9._-]{1,64}$",
        })
    }
}

/// The type of an input field, as [`super::FieldType`] reads it, optionally with `?`.
pub(super) struct InputType;

impl JsonSchema for InputType {
    fn schema_name() -> Cow<'static, str> {
        "InputType".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let types = [
            "string", "integer", "number", "boolean", "list", "object", "any",
        ];
        let values: Vec<String> = types
            .iter()
            .flat_map(|t| [(*t).to_owned(), format!("{t}?")])
            .collect();
        json_schema!({
            "type": "string",
            "description": "A field type; a trailing `?` marks the field optional.",
            "enum": values,
        })
    }
}

/// `kind` of a step.
#[derive(JsonSchema)]
#[schemars(rename_all = "snake_case")]
#[expect(dead_code, reason = "only its schema is used")]
pub(super) enum StepKind {
    /// The default: has a compensation and runs before the pivot.
    Compensatable,
    /// The go/no-go step: once it succeeds the saga can only go forward. Never compensated.
    Pivot,
    /// After the pivot: retried until it succeeds and never compensated.
    Retriable,
}

/// `on_open` of a participant.
#[derive(JsonSchema)]
#[schemars(rename_all = "snake_case")]
#[expect(dead_code, reason = "only its schema is used")]
pub(super) enum ParticipantOnOpen {
    /// The default: the step fails at once and the saga compensates.
    Fail,
    /// The saga waits until the breaker lets a probe through, up to `max_defer`, without
    /// using a retry attempt.
    Defer,
}

/// `on_open` of a step.
#[derive(JsonSchema)]
#[schemars(rename_all = "snake_case")]
#[expect(dead_code, reason = "only its schema is used")]
pub(super) enum StepOnOpen {
    /// The step fails at once and the saga compensates.
    Fail,
    /// The saga waits until the breaker lets a probe through, up to `max_defer`, without
    /// using a retry attempt.
    Defer,
    /// The step calls its `fallback` instead, if the primary has not received any call of
    /// this step.
    Call,
}

/// `admission` of a definition.
#[derive(JsonSchema)]
#[schemars(rename_all = "snake_case")]
#[expect(dead_code, reason = "only its schema is used")]
pub(super) enum Admission {
    /// The default: StartSaga always starts a saga.
    Always,
    /// StartSaga is refused while the first step's breaker is open.
    RejectWhenOpen,
}

/// `on_timeout` of an await step.
#[derive(JsonSchema)]
#[schemars(rename_all = "snake_case")]
#[expect(dead_code, reason = "only its schema is used")]
pub(super) enum OnTimeout {
    /// The default: the step fails and the saga compensates.
    Fail,
    /// The step ends without a signal and the saga continues at `continue_at`.
    Continue,
}
