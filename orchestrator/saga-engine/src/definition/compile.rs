//! From YAML text to a validated [`Plan`], collecting every error.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::Value;
use serde_saphyr::Spanned;

use super::raw::{RawAwait, RawBreaker, RawCall, RawDefinition, RawRetry, RawStep};
// (RawFallback is read through RawStep::fallback.)
use super::schema::{FieldType, InputField, InputSchema};
use super::{
    AwaitPlan, BreakerSpec, CallPlan, CallStep, Condition, DEFAULT_TIMEOUT, DefinitionError,
    DefinitionErrors, DescriptorLookup, FallbackPlan, OnOpen, OnTimeout, Participant, Plan,
    RetryPolicy, Statuses, StepBody, StepKind, StepPlan, WindowSpec,
};
use crate::duration::parse_duration;
use crate::template::{self, Reference};

/// Largest definition accepted, in bytes.
pub const MAX_DEFINITION_BYTES: usize = 256 * 1024;

/// Parses the YAML of a definition into its raw form. `file` names the source in errors.
pub fn parse(file: &str, yaml: &str) -> Result<RawDefinition, DefinitionErrors> {
    let error = |line, message| {
        DefinitionErrors(vec![DefinitionError {
            file: file.to_owned(),
            line,
            step: None,
            message,
        }])
    };
    if yaml.len() > MAX_DEFINITION_BYTES {
        return Err(error(
            None,
            format!(
                "definition is {} bytes; the limit is {MAX_DEFINITION_BYTES}",
                yaml.len()
            ),
        ));
    }
    if yaml.trim().is_empty() {
        return Err(error(None, "definition is empty".to_owned()));
    }
    serde_saphyr::from_str::<RawDefinition>(yaml).map_err(|e| {
        let line = e.location().map(|l| l.line() as u32).filter(|l| *l > 0);
        error(line, first_line(&e.to_string()))
    })
}

/// serde-saphyr's messages may carry a rendered snippet after the first line; the first
/// line is the sentence, and the location is reported separately.
fn first_line(message: &str) -> String {
    let mut text = message.lines().next().unwrap_or(message).trim();
    text = text.strip_prefix("error:").unwrap_or(text).trim_start();
    // "line 6 column 5: ..." repeats what the location already says.
    if let Some(rest) = text.strip_prefix("line ")
        && let Some((position, sentence)) = rest.split_once(": ")
        && position
            .split(" column ")
            .all(|n| n.trim().parse::<u32>().is_ok())
    {
        text = sentence;
    }
    text.to_owned()
}

struct Errors<'a> {
    file: &'a str,
    list: Vec<DefinitionError>,
}

impl Errors<'_> {
    fn at(&mut self, line: u32, step: Option<&str>, message: impl Into<String>) {
        self.list.push(DefinitionError {
            file: self.file.to_owned(),
            line: (line > 0).then_some(line),
            step: step.map(str::to_owned),
            message: message.into(),
        });
    }
}

fn line<T>(spanned: &Spanned<T>) -> u32 {
    spanned.referenced.line() as u32
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Compiles a parsed definition against the participants' descriptors.
///
/// `yaml` is the text `raw` was parsed from; it is kept in the plan.
pub fn compile(
    file: &str,
    yaml: &str,
    raw: &RawDefinition,
    descriptors: &dyn DescriptorLookup,
) -> Result<Plan, DefinitionErrors> {
    let mut errors = Errors {
        file,
        list: Vec::new(),
    };

    if !valid_name(&raw.name.value) {
        errors.at(
            line(&raw.name),
            None,
            format!(
                "name `{}` must be 1 to 64 characters of a-z, 0-9, `_` or `-`",
                raw.name.value
            ),
        );
    }
    if let Some(version) = &raw.version
        && version.value == 0
    {
        errors.at(line(version), None, "version must be 1 or more");
    }

    let input = compile_input(raw, &mut errors);
    let (participants, pools) = compile_participants(raw, descriptors, &mut errors);

    if raw.steps.is_empty() {
        errors.at(0, None, "a definition needs at least one step");
    }

    let mut seen = BTreeMap::new();
    let mut steps = Vec::new();
    let mut earlier_names = BTreeSet::new();
    // Steps of the parallel group being compiled: they run concurrently, so they cannot
    // read each other's outputs. They become visible once the group ends.
    let mut group_steps: Vec<StepPlan> = Vec::new();
    let mut group_names: Vec<String> = Vec::new();
    let mut current_group: Option<String> = None;
    let indexes: BTreeMap<&str, usize> = raw
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.value.name.value.as_str(), i))
        .collect();
    let pivot_index = raw
        .steps
        .iter()
        .position(|s| s.value.kind.as_ref().map(|k| k.value.as_str()) == Some("pivot"));
    let mut signals: BTreeMap<String, (String, u32)> = BTreeMap::new();
    let mut finished_groups = BTreeSet::new();
    for (index, step) in raw.steps.iter().enumerate() {
        let group = step.value.parallel.as_ref().map(|g| g.value.clone());
        if group != current_group || group.is_none() {
            steps.append(&mut group_steps);
            earlier_names.extend(group_names.drain(..));
            if let Some(done) = current_group.take() {
                finished_groups.insert(done);
            }
            current_group = group.clone();
        }
        if let (Some(g), Some(spanned)) = (&group, &step.value.parallel) {
            if finished_groups.contains(g) {
                errors.at(
                    line(spanned),
                    Some(&step.value.name.value),
                    format!("the steps of parallel group `{g}` must be consecutive"),
                );
            }
            if !valid_name(g) {
                errors.at(
                    line(spanned),
                    Some(&step.value.name.value),
                    format!(
                        "parallel group `{g}` must be 1 to 64 characters of a-z, 0-9, `_` or `-`"
                    ),
                );
            }
        }
        let name = step.value.name.value.clone();
        if !valid_name(&name) {
            errors.at(
                line(&step.value.name),
                Some(&name),
                "step name must be 1 to 64 characters of a-z, 0-9, `_` or `-`",
            );
        }
        if let Some(first) = seen.insert(name.clone(), line(&step.value.name)) {
            errors.at(
                line(&step.value.name),
                Some(&name),
                format!("duplicate step name (first defined on line {first})"),
            );
        }
        let context = Earlier {
            plans: &steps,
            names: &earlier_names,
        };
        let position = Position {
            index,
            indexes: &indexes,
            after_pivot: pivot_index.is_some_and(|p| index > p),
        };
        if let Some(plan) = compile_step(
            raw,
            step,
            &context,
            &position,
            &input,
            &pools,
            &mut signals,
            &mut errors,
        ) {
            if group.is_some() {
                group_steps.push(plan);
            } else {
                steps.push(plan);
            }
        }
        if group.is_some() {
            group_names.push(name);
        } else {
            earlier_names.insert(name);
        }
    }
    steps.append(&mut group_steps);
    check_kinds(raw, &mut errors);
    let deadline = raw
        .deadline
        .as_ref()
        .and_then(|d| duration(d, "deadline", None, &mut errors));
    let cancellable_until = raw.cancellable_until.as_ref().and_then(|c| {
        let Some(index) = indexes.get(c.value.as_str()).copied() else {
            errors.at(
                line(c),
                None,
                format!("cancellable_until: no step is named `{}`", c.value),
            );
            return None;
        };
        if let Some(pivot) = pivot_index
            && index > pivot
        {
            errors.at(line(c), None, format!("cancellable_until: `{}` comes after the pivot `{}`, and a saga past its pivot can never be cancelled", c.value, raw.steps[pivot].value.name.value));
        }
        Some(index)
    });
    let statuses = raw.statuses.as_ref().map_or_else(Statuses::default, |s| {
        let s = &s.value;
        Statuses {
            completed: s.completed.clone(),
            compensating: s.compensating.clone(),
            compensated: s.compensated.clone(),
            cancelled: s.cancelled.clone(),
            failed: s.failed.clone(),
        }
    });
    let reject_when_open = match raw.admission.as_ref().map(|a| (a, a.value.trim())) {
        None | Some((_, "always")) => false,
        Some((a, "reject_when_open")) => {
            let first = raw
                .steps
                .first()
                .and_then(|s| s.value.participant.as_ref())
                .map(|p| p.value.clone());
            let has_breaker = first
                .as_ref()
                .and_then(|p| raw.participants.get(p))
                .is_some_and(|p| p.value.circuit_breaker.is_some());
            if !has_breaker {
                errors.at(line(a), None, "admission: reject_when_open needs a circuit_breaker on the first step's participant");
            }
            true
        }
        Some((a, other)) => {
            errors.at(
                line(a),
                None,
                format!("unknown admission `{other}` (use always or reject_when_open)"),
            );
            false
        }
    };

    if !errors.list.is_empty() {
        errors.list.sort_by_key(|e| e.line.unwrap_or(0));
        return Err(DefinitionErrors(errors.list));
    }
    Ok(Plan {
        name: raw.name.value.clone(),
        // 0: numbered by whoever stores it (see `Plan::version`).
        version: raw.version.as_ref().map_or(0, |v| v.value),
        file: file.to_owned(),
        yaml: yaml.to_owned(),
        description: raw.description.clone(),
        input,
        participants,
        steps,
        reject_when_open,
        deadline,
        cancellable_until,
        statuses,
    })
}

fn compile_input(raw: &RawDefinition, errors: &mut Errors<'_>) -> Option<InputSchema> {
    let fields = raw.input.as_ref()?;
    let mut schema = InputSchema { fields: Vec::new() };
    for (name, ty) in fields {
        let (text, required) = match ty.value.strip_suffix('?') {
            Some(text) => (text, false),
            None => (ty.value.as_str(), true),
        };
        match FieldType::parse(text.trim()) {
            Some(ty) => schema.fields.push(InputField { name: name.clone(), ty, required }),
            None => errors.at(
                line(ty),
                None,
                format!(
                    "input field `{name}` has unknown type `{}` (use string, integer, number, boolean, list, object or any; add `?` for optional)",
                    ty.value
                ),
            ),
        }
    }
    Some(schema)
}

fn compile_participants(
    raw: &RawDefinition,
    descriptors: &dyn DescriptorLookup,
    errors: &mut Errors<'_>,
) -> (
    BTreeMap<String, Participant>,
    BTreeMap<String, DescriptorPool>,
) {
    let mut participants = BTreeMap::new();
    let mut pools = BTreeMap::new();
    for (name, participant) in &raw.participants {
        let p = &participant.value;
        if !valid_name(name) {
            errors.at(
                line(participant),
                None,
                format!("participant name `{name}` must be of a-z, 0-9, `_` or `-`"),
            );
        }
        let endpoint = p.endpoint.value.trim();
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
            || endpoint.len() <= "http://".len()
        {
            errors.at(
                line(&p.endpoint),
                None,
                format!(
                    "participant `{name}`: endpoint `{endpoint}` must be an http:// or https:// URL"
                ),
            );
        }
        for (what, retry) in [
            ("retry", &p.retry),
            ("compensation_retry", &p.compensation_retry),
        ] {
            if let Some(retry) = retry {
                retry_policy(RetryPolicy::ACTION_DEFAULT, retry, what, None, errors);
            }
        }
        if let Some(timeout) = &p.timeout {
            duration(timeout, "timeout", None, errors);
        }
        match descriptors.pool(name) {
            Ok(pool) => {
                pools.insert(name.clone(), pool);
            }
            Err(reason) => errors.at(
                line(participant),
                None,
                format!("participant `{name}`: {reason}"),
            ),
        }
        let breaker = p
            .circuit_breaker
            .as_ref()
            .map(|b| breaker_spec(name, b, errors));
        if breaker.is_none() && (p.on_open.is_some() || p.max_defer.is_some()) {
            let at = p.on_open.as_ref().or(p.max_defer.as_ref()).map_or(0, line);
            errors.at(
                at,
                None,
                format!("participant `{name}`: `on_open` needs a `circuit_breaker`"),
            );
        }
        if let Some(text) = &p.on_open {
            on_open(Some(text), p.max_defer.as_ref(), OnOpen::Fail, None, errors);
        }
        participants.insert(
            name.clone(),
            Participant {
                name: name.clone(),
                endpoint: endpoint.to_owned(),
                descriptor_set: p.descriptor_set.as_ref().map(|d| d.value.clone()),
                breaker,
            },
        );
    }
    (participants, pools)
}

/// The longest `max_defer` when none is given.
pub const DEFAULT_MAX_DEFER: Duration = Duration::from_secs(60);

fn percent(value: Option<f64>, default: f64, what: &str, at: u32, errors: &mut Errors<'_>) -> f64 {
    match value {
        Some(v) if v > 0.0 && v <= 100.0 => v,
        Some(v) => {
            errors.at(
                at,
                None,
                format!("{what} must be a percentage in (0, 100], got {v}"),
            );
            default
        }
        None => default,
    }
}

fn breaker_spec(
    participant: &str,
    raw: &Spanned<RawBreaker>,
    errors: &mut Errors<'_>,
) -> BreakerSpec {
    let at = line(raw);
    let b = &raw.value;
    let mut spec = BreakerSpec::default();
    let what = |field: &str| format!("participant `{participant}`: circuit_breaker.{field}");
    if let Some(window) = &b.window {
        spec.window = match (&window.value.count, &window.value.time) {
            (Some(n), None) if *n > 0 => WindowSpec::Count(*n),
            (None, Some(t)) => duration(t, &what("window.time"), None, errors)
                .map_or(spec.window, WindowSpec::Time),
            _ => {
                errors.at(
                    line(window),
                    None,
                    format!(
                        "{}: give `count: N` (N > 0) or `time: DURATION`, not both",
                        what("window")
                    ),
                );
                spec.window
            }
        };
    }
    if let Some(n) = b.minimum_calls {
        if n == 0 {
            errors.at(
                at,
                None,
                format!("{} must be 1 or more", what("minimum_calls")),
            );
        } else {
            spec.minimum_calls = n;
        }
    }
    spec.failure_rate = percent(
        b.failure_rate,
        spec.failure_rate,
        &what("failure_rate"),
        at,
        errors,
    );
    spec.slow_call_rate = percent(
        b.slow_call_rate,
        spec.slow_call_rate,
        &what("slow_call_rate"),
        at,
        errors,
    );
    if let Some(d) = b
        .slow_call_duration
        .as_ref()
        .and_then(|d| duration(d, &what("slow_call_duration"), None, errors))
    {
        spec.slow_call_duration = d;
    }
    if let Some(d) = b
        .wait_in_open
        .as_ref()
        .and_then(|d| duration(d, &what("wait_in_open"), None, errors))
    {
        spec.wait_in_open = d;
        spec.max_wait_in_open = spec.max_wait_in_open.max(d);
    }
    if let Some(d) = b
        .max_wait_in_open
        .as_ref()
        .and_then(|d| duration(d, &what("max_wait_in_open"), None, errors))
    {
        if d < spec.wait_in_open {
            errors.at(
                at,
                None,
                format!("{} is shorter than wait_in_open", what("max_wait_in_open")),
            );
        }
        spec.max_wait_in_open = d;
    }
    if let Some(m) = b.wait_multiplier {
        if (1.0..=10.0).contains(&m) {
            spec.wait_multiplier = m;
        } else {
            errors.at(
                at,
                None,
                format!(
                    "{} must be between 1 and 10, got {m}",
                    what("wait_multiplier")
                ),
            );
        }
    }
    if let Some(n) = b.half_open_calls {
        if n == 0 {
            errors.at(
                at,
                None,
                format!("{} must be 1 or more", what("half_open_calls")),
            );
        } else {
            spec.half_open_calls = n;
        }
    }
    spec
}

/// Reads `on_open` / `max_defer`; `base` applies when `on_open` is absent.
fn on_open(
    text: Option<&Spanned<String>>,
    max_defer: Option<&Spanned<String>>,
    base: OnOpen,
    step: Option<&str>,
    errors: &mut Errors<'_>,
) -> OnOpen {
    let max_wait = max_defer.and_then(|d| duration(d, "max_defer", step, errors));
    let chosen = match text.map(|t| (t, t.value.trim())) {
        None => base,
        Some((_, "fail")) => OnOpen::Fail,
        Some((_, "call")) if step.is_some() => OnOpen::Call,
        Some((t, "call")) => {
            errors.at(
                line(t),
                step,
                "on_open: call is set per step, together with the step's `fallback`",
            );
            base
        }
        Some((_, "defer")) => OnOpen::Defer {
            max_wait: DEFAULT_MAX_DEFER,
        },
        Some((t, other)) => {
            errors.at(
                line(t),
                step,
                format!("unknown on_open `{other}` (use defer or fail)"),
            );
            base
        }
    };
    match (chosen, max_wait) {
        (OnOpen::Defer { .. }, Some(max_wait)) => OnOpen::Defer { max_wait },
        (OnOpen::Fail, Some(_)) => {
            errors.at(
                max_defer.map_or(0, line),
                step,
                "max_defer only applies with on_open: defer",
            );
            chosen
        }
        _ => chosen,
    }
}

fn duration(
    text: &Spanned<String>,
    what: &str,
    step: Option<&str>,
    errors: &mut Errors<'_>,
) -> Option<Duration> {
    match parse_duration(&text.value) {
        Ok(d) if d.is_zero() => {
            errors.at(line(text), step, format!("{what}: must be more than zero"));
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            errors.at(line(text), step, format!("{what}: {e}"));
            None
        }
    }
}

fn retry_policy(
    base: RetryPolicy,
    raw: &Spanned<RawRetry>,
    what: &str,
    step: Option<&str>,
    errors: &mut Errors<'_>,
) -> RetryPolicy {
    let mut policy = base;
    let r = &raw.value;
    if let Some(max) = r.max_attempts {
        if max == 0 {
            errors.at(
                line(raw),
                step,
                format!("{what}.max_attempts must be 1 or more"),
            );
        }
        policy.max_attempts = max.max(1);
    }
    if let Some(d) = r
        .initial_backoff
        .as_ref()
        .and_then(|d| duration(d, &format!("{what}.initial_backoff"), step, errors))
    {
        policy.initial_backoff = d;
    }
    if let Some(d) = r
        .max_backoff
        .as_ref()
        .and_then(|d| duration(d, &format!("{what}.max_backoff"), step, errors))
    {
        policy.max_backoff = d;
    }
    if let Some(m) = r.multiplier {
        if !(1.0..=10.0).contains(&m) {
            errors.at(
                line(raw),
                step,
                format!("{what}.multiplier must be between 1 and 10, got {m}"),
            );
        } else {
            policy.multiplier = m;
        }
    }
    if policy.max_backoff < policy.initial_backoff {
        errors.at(
            line(raw),
            step,
            format!("{what}.max_backoff is shorter than initial_backoff"),
        );
    }
    policy
}

/// The steps before the one being compiled: their plans (for those that compiled) and
/// all their names.
struct Earlier<'a> {
    plans: &'a [StepPlan],
    names: &'a BTreeSet<String>,
}

/// Where the step being compiled sits in the definition.
struct Position<'a> {
    index: usize,
    /// Every step's index by name.
    indexes: &'a BTreeMap<&'a str, usize>,
    after_pivot: bool,
}

/// Signal names: like step names, with `.` allowed (`store.accepted`).
fn valid_signal(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'))
}

#[allow(clippy::too_many_arguments)]
fn compile_step(
    raw: &RawDefinition,
    step: &Spanned<RawStep>,
    earlier: &Earlier<'_>,
    position: &Position<'_>,
    input: &Option<InputSchema>,
    pools: &BTreeMap<String, DescriptorPool>,
    signals: &mut BTreeMap<String, (String, u32)>,
    errors: &mut Errors<'_>,
) -> Option<StepPlan> {
    let s = &step.value;
    let name = s.name.value.as_str();
    let start = errors.list.len();

    let declared = match s.kind.as_ref().map(|k| k.value.as_str()) {
        None => None,
        Some("compensatable") => Some(StepKind::Compensatable),
        Some("pivot") => Some(StepKind::Pivot),
        Some("retriable") => Some(StepKind::Retriable),
        Some(other) => {
            errors.at(
                s.kind.as_ref().map_or(0, line),
                Some(name),
                format!("unknown kind `{other}` (use compensatable, pivot or retriable)"),
            );
            Some(StepKind::Compensatable)
        }
    };
    let when = s
        .when
        .as_ref()
        .and_then(|w| match Condition::compile(&w.value) {
            Ok(condition) => Some(condition),
            Err(message) => {
                errors.at(line(w), Some(name), message);
                None
            }
        });
    let status = s.status.as_ref().map(|t| t.value.trim().to_owned());
    if let Some(t) = &s.status
        && (t.value.trim().is_empty() || t.value.len() > 200)
    {
        errors.at(
            line(t),
            Some(name),
            "status: give 1 to 200 characters of text",
        );
    }
    let group = s.parallel.as_ref().map(|g| g.value.clone());
    if let Some(g) = &s.parallel
        && declared == Some(StepKind::Pivot)
    {
        errors.at(
            line(g),
            Some(name),
            "the pivot cannot run in a parallel group (it must succeed or fail on its own)",
        );
    }

    let body = match (&s.await_, &s.participant, &s.action) {
        (Some(wait), None, None) => {
            match declared {
                None | Some(StepKind::Pivot) => {}
                Some(other) => errors.at(
                    s.kind.as_ref().map_or(0, line),
                    Some(name),
                    format!("an await step cannot be {} (it has nothing to undo; only `kind: pivot` may be given)", other.as_str()),
                ),
            }
            if let Some(c) = &s.compensation {
                errors.at(
                    line(c),
                    Some(name),
                    "an await step has nothing to undo; remove its `compensation`",
                );
            }
            for (field, present) in [
                ("timeout", s.timeout.as_ref().map(line)),
                ("retry", s.retry.as_ref().map(line)),
                (
                    "compensation_retry",
                    s.compensation_retry.as_ref().map(line),
                ),
                ("on_open", s.on_open.as_ref().map(line)),
                ("fallback", s.fallback.as_ref().map(line)),
                ("max_defer", s.max_defer.as_ref().map(line)),
            ] {
                if let Some(at) = present {
                    errors.at(at, Some(name), format!("`{field}` applies to call steps; an await step's timeout goes under `await:`"));
                }
            }
            compile_await(wait, name, declared, position, signals, errors).map(StepBody::Await)
        }
        (None, Some(participant), Some(action)) => compile_call_step(
            raw,
            s,
            participant,
            action,
            declared.unwrap_or(StepKind::Compensatable),
            earlier,
            input,
            pools,
            errors,
        )
        .map(|call| StepBody::Call(Box::new(call))),
        (Some(wait), _, _) => {
            errors.at(line(wait), Some(name), "a step either awaits a signal or calls a participant: remove `participant` and `action`, or `await`");
            None
        }
        (None, _, _) => {
            errors.at(
                line(step),
                Some(name),
                "a step needs `participant` and `action` (a call step), or `await` (an await step)",
            );
            None
        }
    };
    let kind = match (&body, declared) {
        (Some(StepBody::Await(_)), Some(StepKind::Pivot)) => StepKind::Pivot,
        (Some(StepBody::Await(_)), _) if position.after_pivot => StepKind::Retriable,
        (Some(StepBody::Await(_)), _) => StepKind::Compensatable,
        (_, declared) => declared.unwrap_or(StepKind::Compensatable),
    };
    if errors.list.len() > start {
        return None;
    }
    Some(StepPlan {
        name: name.to_owned(),
        kind,
        when,
        status,
        group,
        body: body?,
    })
}

fn compile_await(
    wait: &Spanned<RawAwait>,
    name: &str,
    declared: Option<StepKind>,
    position: &Position<'_>,
    signals: &mut BTreeMap<String, (String, u32)>,
    errors: &mut Errors<'_>,
) -> Option<AwaitPlan> {
    let w = &wait.value;
    let mut ok = true;
    for signal in std::iter::once(&w.signal).chain(&w.fail_on) {
        if !valid_signal(&signal.value) {
            errors.at(
                line(signal),
                Some(name),
                format!(
                    "signal `{}` must be 1 to 64 characters of a-z, 0-9, `.`, `_` or `-`",
                    signal.value
                ),
            );
            ok = false;
        } else if let Some((step, at)) =
            signals.insert(signal.value.clone(), (name.to_owned(), line(signal)))
        {
            errors.at(line(signal), Some(name), format!("signal `{}` is already awaited by step `{step}` (line {at}); each signal belongs to one await step", signal.value));
            ok = false;
        }
    }
    let timeout = w
        .timeout
        .as_ref()
        .and_then(|t| duration(t, "await.timeout", Some(name), errors));
    let on_timeout = match w.on_timeout.as_ref().map(|o| (o, o.value.trim())) {
        None | Some((_, "fail")) => {
            if let Some(c) = &w.continue_at {
                errors.at(
                    line(c),
                    Some(name),
                    "continue_at only applies with on_timeout: continue",
                );
                ok = false;
            }
            if position.after_pivot && declared != Some(StepKind::Pivot) && timeout.is_some() {
                errors.at(wait.referenced.line() as u32, Some(name), "after the pivot a saga cannot compensate, so an await step's timeout cannot fail it: use on_timeout: continue, or no timeout");
                ok = false;
            }
            OnTimeout::Fail
        }
        Some((o, "continue")) => {
            if timeout.is_none() {
                errors.at(
                    line(o),
                    Some(name),
                    "on_timeout: continue needs an await.timeout",
                );
                ok = false;
            }
            let at = match &w.continue_at {
                None => position.index + 1,
                Some(c) => match position.indexes.get(c.value.as_str()) {
                    Some(&at) if at > position.index => at,
                    Some(_) => {
                        errors.at(
                            line(c),
                            Some(name),
                            format!("continue_at: `{}` is not a later step", c.value),
                        );
                        ok = false;
                        position.index + 1
                    }
                    None => {
                        errors.at(
                            line(c),
                            Some(name),
                            format!("continue_at: no step is named `{}`", c.value),
                        );
                        ok = false;
                        position.index + 1
                    }
                },
            };
            OnTimeout::Continue { at }
        }
        Some((o, other)) => {
            errors.at(
                line(o),
                Some(name),
                format!("unknown on_timeout `{other}` (use fail or continue)"),
            );
            ok = false;
            OnTimeout::Fail
        }
    };
    ok.then(|| AwaitPlan {
        signal: w.signal.value.clone(),
        fail_on: w.fail_on.iter().map(|s| s.value.clone()).collect(),
        timeout,
        on_timeout,
    })
}

#[allow(clippy::too_many_arguments)]
fn compile_call_step(
    raw: &RawDefinition,
    s: &RawStep,
    participant_name: &Spanned<String>,
    raw_action: &Spanned<RawCall>,
    kind: StepKind,
    earlier: &Earlier<'_>,
    input: &Option<InputSchema>,
    pools: &BTreeMap<String, DescriptorPool>,
    errors: &mut Errors<'_>,
) -> Option<CallStep> {
    let name = s.name.value.as_str();
    let start = errors.list.len();
    let participant = raw.participants.get(&participant_name.value);
    if participant.is_none() {
        let known: Vec<&str> = raw.participants.keys().map(String::as_str).collect();
        errors.at(
            line(participant_name),
            Some(name),
            format!(
                "unknown participant `{}` (declared: {})",
                participant_name.value,
                known.join(", ")
            ),
        );
    }
    let pool = pools.get(&participant_name.value);

    match (kind, &s.compensation) {
        (StepKind::Compensatable, None) => errors.at(
            line(&s.name),
            Some(name),
            "a compensatable step needs a `compensation` (or mark the step `kind: pivot` or `kind: retriable` if it is never undone)",
        ),
        (StepKind::Pivot | StepKind::Retriable, Some(c)) => errors.at(
            line(c),
            Some(name),
            format!("a {} step is never compensated; remove its `compensation`", kind.as_str()),
        ),
        _ => {}
    }

    let action = compile_call(raw_action, name, false, earlier, input, pool, errors);
    let compensation = s
        .compensation
        .as_ref()
        .and_then(|c| compile_call(c, name, true, earlier, input, pool, errors));

    let defaults = participant.map(|p| &p.value);
    let mut timeout = DEFAULT_TIMEOUT;
    if let Some(d) = defaults
        .and_then(|p| p.timeout.as_ref())
        .and_then(|t| parse_duration(&t.value).ok())
    {
        timeout = d;
    }
    if let Some(d) = s
        .timeout
        .as_ref()
        .and_then(|t| duration(t, "timeout", Some(name), errors))
    {
        timeout = d;
    }
    let mut retry = RetryPolicy::ACTION_DEFAULT;
    let mut compensation_retry = RetryPolicy::COMPENSATION_DEFAULT;
    let mut ignore = Errors {
        file: errors.file,
        list: Vec::new(),
    };
    if let Some(r) = defaults.and_then(|p| p.retry.as_ref()) {
        retry = retry_policy(retry, r, "retry", None, &mut ignore);
    }
    if let Some(r) = defaults.and_then(|p| p.compensation_retry.as_ref()) {
        compensation_retry = retry_policy(
            compensation_retry,
            r,
            "compensation_retry",
            None,
            &mut ignore,
        );
    }
    if let Some(r) = &s.retry {
        retry = retry_policy(retry, r, "retry", Some(name), errors);
    }
    // A pivot has no undo, and a transient failure may hide an applied effect (a reset
    // stream, a lost reply): unless the definition caps its attempts, it is retried until it
    // gives a definite answer.
    let capped = s
        .retry
        .as_ref()
        .and_then(|r| r.value.max_attempts)
        .or_else(|| {
            defaults
                .and_then(|p| p.retry.as_ref())
                .and_then(|r| r.value.max_attempts)
        })
        .is_some();
    if kind == StepKind::Pivot && !capped {
        retry.max_attempts = u32::MAX;
    }
    if let Some(r) = &s.compensation_retry {
        compensation_retry = retry_policy(
            compensation_retry,
            r,
            "compensation_retry",
            Some(name),
            errors,
        );
    }

    let participant_on_open = defaults.map_or(OnOpen::Fail, |p| {
        on_open(
            p.on_open.as_ref(),
            p.max_defer.as_ref(),
            OnOpen::Fail,
            None,
            &mut ignore,
        )
    });
    let has_breaker = defaults.is_some_and(|p| p.circuit_breaker.is_some());
    if (s.on_open.is_some() || s.max_defer.is_some()) && !has_breaker && defaults.is_some() {
        let at = s.on_open.as_ref().or(s.max_defer.as_ref()).map_or(0, line);
        errors.at(
            at,
            Some(name),
            format!(
                "`on_open` needs a `circuit_breaker` on participant `{}`",
                participant_name.value
            ),
        );
    }
    let step_on_open = on_open(
        s.on_open.as_ref(),
        s.max_defer.as_ref(),
        participant_on_open,
        Some(name),
        errors,
    );

    let fallback = compile_fallback(
        raw,
        s,
        kind,
        step_on_open,
        action.as_ref(),
        earlier,
        input,
        pools,
        errors,
    );

    if errors.list.len() > start {
        return None;
    }
    Some(CallStep {
        participant: participant_name.value.clone(),
        action: action?,
        compensation,
        timeout,
        retry,
        compensation_retry,
        on_open: step_on_open,
        fallback,
    })
}

/// The `fallback` of a step with `on_open: call`.
#[allow(clippy::too_many_arguments)]
fn compile_fallback(
    raw: &RawDefinition,
    s: &RawStep,
    kind: StepKind,
    on_open: OnOpen,
    primary: Option<&CallPlan>,
    earlier: &Earlier<'_>,
    input: &Option<InputSchema>,
    pools: &BTreeMap<String, DescriptorPool>,
    errors: &mut Errors<'_>,
) -> Option<FallbackPlan> {
    let name = s.name.value.as_str();
    let Some(fallback) = &s.fallback else {
        if on_open == OnOpen::Call {
            errors.at(
                s.on_open.as_ref().map_or(0, line),
                Some(name),
                "on_open: call needs a `fallback` (participant, action and compensation)",
            );
        }
        return None;
    };
    if on_open != OnOpen::Call {
        errors.at(
            line(fallback),
            Some(name),
            "`fallback` is only used with on_open: call",
        );
        return None;
    }
    let f = &fallback.value;
    if !raw.participants.contains_key(&f.participant.value) {
        let known: Vec<&str> = raw.participants.keys().map(String::as_str).collect();
        errors.at(
            line(&f.participant),
            Some(name),
            format!(
                "fallback: unknown participant `{}` (declared: {})",
                f.participant.value,
                known.join(", ")
            ),
        );
        return None;
    }
    if s.participant
        .as_ref()
        .is_some_and(|p| p.value == f.participant.value)
    {
        errors.at(line(&f.participant), Some(name), "fallback: the fallback must be another participant (its breaker is the one that is open)");
    }
    match (kind, &f.compensation) {
        (StepKind::Compensatable, None) => {
            errors.at(
                line(fallback),
                Some(name),
                "fallback: a compensatable step's fallback needs its own `compensation`",
            );
        }
        (StepKind::Pivot | StepKind::Retriable, Some(c)) => {
            errors.at(
                line(c),
                Some(name),
                format!(
                    "fallback: a {} step is never compensated; remove its `compensation`",
                    kind.as_str()
                ),
            );
        }
        _ => {}
    }
    let pool = pools.get(&f.participant.value);
    let action = compile_call(&f.action, name, false, earlier, input, pool, errors)?;
    let compensation = f
        .compensation
        .as_ref()
        .and_then(|c| compile_call(c, name, true, earlier, input, pool, errors));
    if let Some(primary) = primary
        && primary.output.full_name() != action.output.full_name()
    {
        errors.at(
                line(&f.action),
                Some(name),
                format!(
                    "fallback: its action returns `{}` but the step's action returns `{}`; later steps read the output, so they must match",
                    action.output.full_name(),
                    primary.output.full_name()
                ),
            );
    }
    Some(FallbackPlan {
        participant: f.participant.value.clone(),
        action,
        compensation,
    })
}

fn compile_call(
    call: &Spanned<RawCall>,
    step: &str,
    is_compensation: bool,
    earlier: &Earlier<'_>,
    input: &Option<InputSchema>,
    pool: Option<&DescriptorPool>,
    errors: &mut Errors<'_>,
) -> Option<CallPlan> {
    let what = if is_compensation {
        "compensation"
    } else {
        "action"
    };
    // References are checked even when the method or the descriptors are unusable.
    let mut request = serde_json::Map::new();
    for (field, value) in &call.value.request {
        match template::references(&value.value) {
            Ok(refs) => {
                for reference in refs {
                    check_reference(
                        &reference,
                        step,
                        is_compensation,
                        earlier,
                        input,
                        line(value),
                        errors,
                    );
                }
            }
            Err(e) => errors.at(
                line(value),
                Some(step),
                format!("{what} request field `{field}`: {e}"),
            ),
        }
        request.insert(field.clone(), value.value.clone());
    }
    let method_text = call.value.method.value.trim();
    let method_line = line(&call.value.method);
    let Some((service_name, method_name)) = method_text
        .split_once('/')
        .filter(|(s, m)| s.contains('.') && !m.is_empty() && !m.contains('/'))
    else {
        errors.at(
            method_line,
            Some(step),
            format!("{what} method `{method_text}` must be written `package.Service/Method`"),
        );
        return None;
    };

    let pool = pool?;
    let Some(service) = pool.get_service_by_name(service_name) else {
        let known: Vec<String> = pool.services().map(|s| s.full_name().to_owned()).collect();
        errors.at(
            method_line,
            Some(step),
            format!(
                "{what}: the participant has no service `{service_name}` (it has: {})",
                known.join(", ")
            ),
        );
        return None;
    };
    let Some(method) = service.methods().find(|m| m.name() == method_name) else {
        let known: Vec<String> = service.methods().map(|m| m.name().to_owned()).collect();
        errors.at(
            method_line,
            Some(step),
            format!(
                "{what}: service `{service_name}` has no method `{method_name}` (it has: {})",
                known.join(", ")
            ),
        );
        return None;
    };
    if method.is_client_streaming() || method.is_server_streaming() {
        errors.at(
            method_line,
            Some(step),
            format!(
                "{what}: `{method_text}` is a streaming method; only unary methods can be steps"
            ),
        );
        return None;
    }

    let message = method.input();
    let before = errors.list.len();
    for (field, value) in &call.value.request {
        check_field(
            &message,
            field,
            &value.value,
            &format!("{what} request"),
            step,
            line(value),
            errors,
        );
    }
    if errors.list.len() > before {
        return None;
    }
    Some(CallPlan {
        method: format!("{service_name}/{method_name}"),
        request: Value::Object(request),
        input: message,
        output: method.output(),
    })
}

fn find_field(message: &MessageDescriptor, name: &str) -> Option<FieldDescriptor> {
    message
        .get_field_by_name(name)
        .or_else(|| message.get_field_by_json_name(name))
}

fn field_names(message: &MessageDescriptor) -> String {
    message
        .fields()
        .map(|f| f.name().to_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_template(value: &Value) -> bool {
    matches!(value, Value::String(s) if s.contains("${"))
}

/// Checks that `name` is a field of `message` and that `value` has a compatible shape.
fn check_field(
    message: &MessageDescriptor,
    name: &str,
    value: &Value,
    path: &str,
    step: &str,
    at: u32,
    errors: &mut Errors<'_>,
) {
    let full = format!("{path}.{name}");
    let Some(field) = find_field(message, name) else {
        errors.at(
            at,
            Some(step),
            format!(
                "`{full}`: message `{}` has no field `{name}` (fields: {})",
                message.full_name(),
                field_names(message)
            ),
        );
        return;
    };
    if is_template(value) || value.is_null() {
        return;
    }
    if field.is_list() {
        match value {
            Value::Array(items) => {
                for item in items {
                    check_scalar(&field, item, &full, step, at, errors);
                }
            }
            _ => errors.at(
                at,
                Some(step),
                format!("`{full}`: field is a list; give a list or a reference"),
            ),
        }
        return;
    }
    if field.is_map() {
        if !value.is_object() {
            errors.at(
                at,
                Some(step),
                format!("`{full}`: field is a map; give a mapping or a reference"),
            );
        }
        return;
    }
    check_scalar(&field, value, &full, step, at, errors);
}

fn check_scalar(
    field: &FieldDescriptor,
    value: &Value,
    full: &str,
    step: &str,
    at: u32,
    errors: &mut Errors<'_>,
) {
    if is_template(value) {
        return;
    }
    let ok = match field.kind() {
        Kind::Message(nested) => {
            if nested.full_name().starts_with("google.protobuf.") {
                true
            } else if let Value::Object(map) = value {
                for (name, inner) in map {
                    check_field(&nested, name, inner, full, step, at, errors);
                }
                true
            } else {
                false
            }
        }
        Kind::String | Kind::Bytes => value.is_string(),
        Kind::Bool => value.is_boolean(),
        Kind::Enum(_) => value.is_string() || value.is_i64(),
        // The JSON mapping accepts numbers and numeric strings for every numeric kind.
        _ => value.is_number() || value.as_str().is_some_and(|s| s.parse::<f64>().is_ok()),
    };
    if !ok {
        errors.at(
            at,
            Some(step),
            format!(
                "`{full}`: {value} does not fit a field of type {:?}",
                field.kind()
            ),
        );
    }
}

fn check_reference(
    reference: &Reference,
    step: &str,
    is_compensation: bool,
    earlier: &Earlier<'_>,
    input: &Option<InputSchema>,
    at: u32,
    errors: &mut Errors<'_>,
) {
    let path = reference.path();
    let segments = &reference.segments;
    match segments[0].as_str() {
        "input" => {
            if let (Some(schema), Some(field)) = (input, segments.get(1))
                && schema.field(field).is_none()
            {
                errors.at(
                    at,
                    Some(step),
                    format!("`${{{path}}}`: the definition's input has no field `{field}`"),
                );
            }
        }
        "saga" => {
            let ok = segments.len() == 2
                && matches!(segments[1].as_str(), "id" | "definition" | "version");
            if !ok {
                errors.at(
                    at,
                    Some(step),
                    format!("`${{{path}}}`: use saga.id, saga.definition or saga.version"),
                );
            }
        }
        "steps" => {
            let Some(target) = segments.get(1) else {
                errors.at(
                    at,
                    Some(step),
                    format!("`${{{path}}}`: name a step, as in steps.<name>.output.<field>"),
                );
                return;
            };
            if segments.get(2).map(String::as_str) != Some("output") {
                errors.at(at, Some(step), format!("`${{{path}}}`: only a step's output can be referenced (steps.{target}.output...)"));
                return;
            }
            let found = earlier.plans.iter().find(|s| &s.name == target);
            if found.is_none() && earlier.names.contains(target) {
                // The step exists but did not compile; its own errors are reported.
                return;
            }
            let Some(found) = found else {
                let allowed = if is_compensation {
                    "this step or an earlier one"
                } else {
                    "an earlier step"
                };
                if !(is_compensation && target == step) {
                    errors.at(
                        at,
                        Some(step),
                        format!("`${{{path}}}`: `{target}` is not {allowed}"),
                    );
                }
                return;
            };
            let Some(call) = found.call() else {
                // An await step's output: {signal, payload, timed_out}; the payload is free.
                let ok = match segments.get(3).map(String::as_str) {
                    None | Some("payload") => true,
                    Some("signal" | "timed_out") => segments.len() == 4,
                    Some(_) => false,
                };
                if !ok {
                    errors.at(at, Some(step), format!("`${{{path}}}`: `{target}` awaits a signal; its output has `signal`, `payload` (the signal's payload) and `timed_out`"));
                }
                return;
            };
            let mut message = call.action.output.clone();
            for segment in &segments[3..] {
                let Some(field) = find_field(&message, segment) else {
                    errors.at(
                        at,
                        Some(step),
                        format!(
                            "`${{{path}}}`: the output of `{target}` (`{}`) has no field `{segment}` (fields: {})",
                            message.full_name(),
                            field_names(&message)
                        ),
                    );
                    return;
                };
                match field.kind() {
                    Kind::Message(nested) if !field.is_list() && !field.is_map() => {
                        message = nested
                    }
                    _ => return,
                }
            }
        }
        other => errors.at(
            at,
            Some(step),
            format!("`${{{path}}}`: unknown root `{other}` (use input, steps or saga)"),
        ),
    }
}

/// Kinds must run compensatable steps, then at most one pivot, then retriable steps.
fn check_kinds(raw: &RawDefinition, errors: &mut Errors<'_>) {
    let mut pivot: Option<String> = None;
    let mut retriable: Option<String> = None;
    let mut names = BTreeSet::new();
    for step in &raw.steps {
        let s = &step.value;
        let name = s.name.value.as_str();
        names.insert(name);
        let kind = s
            .kind
            .as_ref()
            .map(|k| k.value.as_str())
            .unwrap_or("compensatable");
        // An await step undoes nothing: it fits before or after the pivot.
        if s.await_.is_some() && kind != "pivot" {
            continue;
        }
        match kind {
            "pivot" => {
                if let Some(first) = &pivot {
                    errors.at(
                        line(step),
                        Some(name),
                        format!("a saga has at most one pivot; `{first}` is already the pivot"),
                    );
                } else if let Some(r) = &retriable {
                    errors.at(
                        line(step),
                        Some(name),
                        format!("the pivot must come before retriable step `{r}`"),
                    );
                }
                pivot.get_or_insert_with(|| name.to_owned());
            }
            "retriable" => {
                retriable.get_or_insert_with(|| name.to_owned());
            }
            "compensatable" => {
                if let Some(p) = &pivot {
                    errors.at(line(step), Some(name), format!("steps after the pivot `{p}` must be retriable (they are never compensated)"));
                } else if let Some(r) = &retriable {
                    errors.at(
                        line(step),
                        Some(name),
                        format!("a compensatable step cannot follow retriable step `{r}`"),
                    );
                }
            }
            _ => {}
        }
    }
}
