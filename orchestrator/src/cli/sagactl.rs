//! `sagactl`: the command-line client of the orchestrator's gRPC API.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tonic::transport::Channel;

use proto::saga::v1 as pb;
use proto::saga::v1::saga_orchestrator_client::SagaOrchestratorClient;

use crate::convert;

#[derive(Debug, Parser)]
#[command(
    name = "sagactl",
    version,
    about = "Start, inspect, watch, signal and cancel sagas; validate definitions",
    after_help = "Exit status: 0 on success; 1 on an error; with --wait, 3 when the saga ended COMPENSATED or FAILED; validate: 2 when a definition has problems."
)]
pub struct Cli {
    /// The orchestrator's gRPC endpoint.
    #[arg(
        long,
        global = true,
        env = "SAGA_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    pub endpoint: String,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a saga.
    Start {
        /// Definition name, e.g. order-placement.
        definition: String,
        /// The input as JSON, or @FILE to read it from a file.
        #[arg(long, default_value = "{}")]
        input: String,
        /// Definition version (default: the latest).
        #[arg(long)]
        version: Option<u32>,
        /// The same key always gives the same saga (default: a new saga each time).
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait until the saga is terminal and print it.
        #[arg(long)]
        wait: bool,
    },
    /// Show a saga and its steps.
    Get { saga_id: String },
    /// List sagas, newest first.
    List {
        /// RUNNING, WAITING, COMPENSATING, COMPLETED, COMPENSATED or FAILED.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        definition: Option<String>,
        #[arg(long, default_value_t = 50)]
        page_size: u32,
        /// From a previous page's "next page" token.
        #[arg(long)]
        page_token: Option<String>,
        /// Only sagas created at or after this time: milliseconds since the epoch, or a
        /// duration ago such as 15m or 2h.
        #[arg(long)]
        created_after: Option<String>,
        /// Only sagas created before this time (same forms as --created-after).
        #[arg(long)]
        created_before: Option<String>,
    },
    /// Deliver a signal to a saga, e.g. `sagactl signal ID store.accepted '{"eta_minutes":20}'`.
    Signal {
        saga_id: String,
        /// The signal's name, as the definition's await step names it.
        signal: String,
        /// The payload as a JSON object, or @FILE.
        #[arg(default_value = "{}")]
        payload: String,
    },
    /// Stream every status change of every saga (the feed notifiers consume).
    Changes {
        /// Only changes to this status.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        definition: Option<String>,
        /// Start after this cursor (0: from the beginning).
        #[arg(long, default_value_t = 0)]
        after_cursor: u64,
        /// Stop after this many changes (default: follow until interrupted).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Check definition files and print every problem with file:line (no orchestrator needed).
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Check methods against the reference participants' protos built into sagactl
        /// (payment, store, rider) instead of asking each participant by reflection.
        #[arg(long)]
        builtin_descriptors: bool,
        /// Give up on a participant's reflection after this long.
        #[arg(long, default_value = "3s")]
        reflection_timeout: String,
    },
    /// Stream a saga's events until it is terminal.
    Watch { saga_id: String },
    /// Ask a saga to stop and compensate.
    Cancel {
        saga_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Manage definitions.
    #[command(subcommand)]
    Definitions(DefinitionsCommand),
    /// List the participants' circuit breakers.
    Breakers,
    /// Change a participant's circuit breaker.
    #[command(subcommand)]
    Breaker(BreakerCommand),
}

#[derive(Debug, Subcommand)]
pub enum BreakerCommand {
    /// Reject every call to the participant (sagas follow their `on_open` fallback).
    ForceOpen { participant: String },
    /// Let every call through and record nothing.
    Disable { participant: String },
    /// Back to normal: closed, with an empty window.
    Reset { participant: String },
}

#[derive(Debug, Subcommand)]
pub enum DefinitionsCommand {
    /// List definitions and their versions.
    List,
    /// Print a definition's YAML.
    Get {
        name: String,
        #[arg(long)]
        version: Option<u32>,
    },
    /// Validate and store a definition from a YAML file.
    Put { file: PathBuf },
}

/// What the command printed and the exit status it asks for.
#[derive(Debug)]
pub struct Outcome {
    pub text: String,
    pub exit_code: u8,
}

/// The status name of a `SagaStatus` number, e.g. `COMPENSATED`.
pub fn status_name(status: i32) -> &'static str {
    match pb::SagaStatus::try_from(status).unwrap_or(pb::SagaStatus::Unspecified) {
        pb::SagaStatus::Unspecified => "UNSPECIFIED",
        pb::SagaStatus::Running => "RUNNING",
        pb::SagaStatus::Waiting => "WAITING",
        pb::SagaStatus::Compensating => "COMPENSATING",
        pb::SagaStatus::Completed => "COMPLETED",
        pb::SagaStatus::Compensated => "COMPENSATED",
        pb::SagaStatus::Failed => "FAILED",
    }
}

fn step_status_name(status: i32) -> String {
    pb::StepStatus::try_from(status)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("STEP_STATUS_")
                .to_owned()
        })
        .unwrap_or_else(|_| status.to_string())
}

fn time(ts: &Option<prost_types::Timestamp>) -> Value {
    ts.as_ref().map_or(Value::Null, |t| {
        let ms = t.seconds.saturating_mul(1000) + i64::from(t.nanos / 1_000_000);
        Value::from(ms)
    })
}

fn error_json(e: &Option<pb::StepError>) -> Value {
    e.as_ref().map_or(
        Value::Null,
        |e| json!({"code": e.code, "message": e.message, "retryable": e.retryable}),
    )
}

pub fn saga_json(s: &pb::Saga) -> Value {
    json!({
        "saga_id": s.saga_id,
        "definition": s.definition,
        "version": s.version,
        "status": status_name(s.status),
        "reason": s.reason,
        "waiting_for": s.waiting_for,
        "business_status": s.business_status,
        "awaiting_signals": s.awaiting_signals,
        "buffered_signals": s.buffered_signals,
        "wake_at_ms": time(&s.wake_at),
        "deadline_ms": time(&s.deadline),
        "trace_id": s.trace_id,
        "idempotency_key": s.idempotency_key,
        "input": s.input.as_ref().map_or(Value::Null, convert::struct_to_json),
        "created_at_ms": time(&s.created_at),
        "updated_at_ms": time(&s.updated_at),
        "steps": s.steps.iter().map(|st| json!({
            "name": st.name,
            "participant": st.participant,
            "kind": pb::StepKind::try_from(st.kind).map(|k| k.as_str_name().trim_start_matches("STEP_KIND_").to_owned()).unwrap_or_default(),
            "status": step_status_name(st.status),
            "attempts": st.attempts,
            "compensation_attempts": st.compensation_attempts,
            "last_error": error_json(&st.last_error),
            "output": st.output.as_ref().map_or(Value::Null, convert::value_to_json),
            "method": st.method,
            "compensation_method": st.compensation_method,
            "started_at_ms": time(&st.started_at),
            "finished_at_ms": time(&st.finished_at),
            "compensated_at_ms": time(&st.compensated_at),
        })).collect::<Vec<_>>(),
    })
}

pub fn event_json(e: &pb::SagaEvent) -> Value {
    json!({
        "saga_id": e.saga_id,
        "seq": e.seq,
        "at_ms": time(&e.at),
        "kind": e.kind,
        "step": e.step,
        "phase": e.phase,
        "attempt": e.attempt,
        "status": status_name(e.status),
        "error": error_json(&e.error),
        "output": e.output.as_ref().map_or(Value::Null, convert::value_to_json),
        "detail": e.detail,
    })
}

fn saga_table(s: &pb::Saga) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "saga        {}", s.saga_id);
    let _ = writeln!(out, "definition  {} v{}", s.definition, s.version);
    let _ = writeln!(out, "status      {}", status_name(s.status));
    if !s.business_status.is_empty() {
        let _ = writeln!(out, "order       {}", s.business_status);
    }
    if !s.trace_id.is_empty() {
        let _ = writeln!(out, "trace       {}", s.trace_id);
    }
    if !s.buffered_signals.is_empty() {
        let _ = writeln!(out, "kept        {}", s.buffered_signals.join(", "));
    }
    if !s.reason.is_empty() {
        let _ = writeln!(out, "reason      {}", s.reason);
    }
    if !s.waiting_for.is_empty() {
        let _ = writeln!(out, "waiting for {}", s.waiting_for);
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<20} {:<12} {:<20} {:>8} {:>6}  LAST ERROR",
        "STEP", "PARTICIPANT", "STATUS", "ATTEMPTS", "COMP"
    );
    for st in &s.steps {
        let error = st
            .last_error
            .as_ref()
            .map(|e| format!("{}: {}", e.code, e.message))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<20} {:<12} {:<20} {:>8} {:>6}  {}",
            st.name,
            st.participant,
            step_status_name(st.status),
            st.attempts,
            st.compensation_attempts,
            error
        );
    }
    out
}

fn event_line(e: &pb::SagaEvent) -> String {
    let mut line = format!("{:>3} {:<22} {:<13}", e.seq, e.kind, status_name(e.status));
    if !e.step.is_empty() {
        let _ = write!(line, " {} {} #{}", e.step, e.phase, e.attempt);
    }
    if let Some(error) = &e.error {
        let _ = write!(line, " {}: {}", error.code, error.message);
    }
    if !e.detail.is_empty() {
        let _ = write!(line, " ({})", e.detail);
    }
    line
}

fn breaker_json(b: &pb::CircuitBreaker) -> Value {
    json!({
        "participant": b.participant,
        "state": b.state,
        "failure_rate": b.failure_rate,
        "slow_call_rate": b.slow_call_rate,
        "calls": b.calls,
        "failed_calls": b.failed_calls,
        "slow_calls": b.slow_calls,
        "next_probe_at_ms": time(&b.next_probe_at),
        "openings": b.openings,
    })
}

fn breakers_table(breakers: &[pb::CircuitBreaker]) -> String {
    let rate = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}%"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:<12} {:>9} {:>9} {:>6} {:>7}  NEXT PROBE",
        "PARTICIPANT", "STATE", "FAILURES", "SLOW", "CALLS", "OPENED"
    );
    for b in breakers {
        let probe = match (&b.next_probe_at, time(&b.next_probe_at)) {
            (Some(_), Value::Number(ms)) => format!("{ms} ms"),
            _ => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<14} {:<12} {:>9} {:>9} {:>6} {:>7}  {probe}",
            b.participant,
            b.state,
            rate(b.failure_rate),
            rate(b.slow_call_rate),
            b.calls,
            b.openings
        );
    }
    out
}

fn read_input(input: &str) -> anyhow::Result<prost_types::Struct> {
    read_object(input, "--input")
}

/// A JSON object given inline or as @FILE; `what` names the argument in errors.
fn read_object(input: &str, what: &str) -> anyhow::Result<prost_types::Struct> {
    let text = match input.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {what} file {path}"))?,
        None => input.to_owned(),
    };
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{what} is not valid JSON"))?;
    if !value.is_object() {
        bail!("{what} must be a JSON object, like '{{\"order_id\":\"o-1\"}}'");
    }
    Ok(convert::json_to_struct(&value))
}

/// `--created-after` / `--created-before`: milliseconds since the epoch, or a duration ago.
fn time_arg(text: &str, what: &str) -> anyhow::Result<prost_types::Timestamp> {
    let ms = match text.trim().parse::<u64>() {
        Ok(ms) => ms,
        Err(_) => {
            let ago = saga_engine::duration::parse_duration(text.trim()).map_err(|e| {
                anyhow::anyhow!("{what} `{text}`: not milliseconds since the epoch nor a duration ago (like 15m): {e}")
            })?;
            crate::runtime::now_ms().saturating_sub(ago.as_millis() as u64)
        }
    };
    Ok(convert::timestamp(ms))
}

fn status_arg(status: Option<String>) -> anyhow::Result<pb::SagaStatus> {
    Ok(match status {
        None => pb::SagaStatus::Unspecified,
        Some(s) => match saga_engine::SagaStatus::parse(&s) {
            Some(s) => convert::saga_status(s),
            None => bail!(
                "--status `{s}` is not one of RUNNING, WAITING, COMPENSATING, COMPLETED, COMPENSATED, FAILED"
            ),
        },
    })
}

/// `sagactl validate`: every problem of every file, each with file:line.
async fn validate(
    files: &[PathBuf],
    builtin: bool,
    reflection_timeout: &str,
) -> anyhow::Result<Outcome> {
    let wait = saga_engine::duration::parse_duration(reflection_timeout)
        .map_err(|e| anyhow::anyhow!("--reflection-timeout `{reflection_timeout}`: {e}"))?;
    let builtin_pool = if builtin {
        Some(
            prost_reflect::DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET)
                .context("built-in descriptors do not decode")?,
        )
    } else {
        None
    };
    let mut text = String::new();
    let mut problems = 0usize;
    for file in files {
        let source = file.display().to_string();
        let yaml = match std::fs::read_to_string(file) {
            Ok(yaml) => yaml,
            Err(e) => {
                let _ = writeln!(text, "{source}: cannot read: {e}");
                problems += 1;
                continue;
            }
        };
        let raw = match saga_engine::definition::parse(&source, &yaml) {
            Ok(raw) => raw,
            Err(errors) => {
                for error in &errors.0 {
                    let _ = writeln!(text, "{error}");
                }
                problems += errors.0.len();
                continue;
            }
        };
        let mut pools = crate::descriptors::Fetched::default();
        for (name, participant) in &raw.participants {
            let p = &participant.value;
            let pool = if let Some(set) = &p.descriptor_set {
                let path = file
                    .parent()
                    .map_or_else(|| PathBuf::from(&set.value), |dir| dir.join(&set.value));
                crate::descriptors::from_file(&path)
            } else if let Some(pool) = &builtin_pool {
                Ok(pool.clone())
            } else {
                crate::descriptors::from_reflection(p.endpoint.value.trim(), wait)
                    .await
                    .map_err(|e| format!("{e} (start the participant, name a descriptor_set, or use --builtin-descriptors)"))
            };
            pools.0.insert(name.clone(), pool);
        }
        match saga_engine::definition::compile(&source, &yaml, &raw, &pools) {
            Ok(plan) => {
                let _ = writeln!(
                    text,
                    "{source}: ok ({}, {} steps{})",
                    plan.name,
                    plan.steps.len(),
                    if plan.signals().is_empty() {
                        String::new()
                    } else {
                        format!(", signals {}", plan.signals().join(", "))
                    }
                );
            }
            Err(errors) => {
                for error in &errors.0 {
                    let _ = writeln!(text, "{error}");
                }
                problems += errors.0.len();
            }
        }
    }
    if problems > 0 {
        let _ = write!(
            text,
            "{problems} problem{} found",
            if problems == 1 { "" } else { "s" }
        );
    }
    Ok(Outcome {
        text: text.trim_end().to_owned(),
        exit_code: if problems > 0 { 2 } else { 0 },
    })
}

fn grpc(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: {}",
        crate::invoker::code_name(status.code()),
        status.message()
    )
}

/// Streams a saga's events; calls `each` per event; returns the last status.
async fn watch(
    client: &mut SagaOrchestratorClient<Channel>,
    saga_id: &str,
    mut each: impl FnMut(&pb::SagaEvent),
) -> anyhow::Result<i32> {
    let mut stream = client
        .watch_saga(pb::WatchSagaRequest {
            saga_id: saga_id.to_owned(),
        })
        .await
        .map_err(grpc)?
        .into_inner();
    let mut last = pb::SagaStatus::Unspecified as i32;
    while let Some(event) = stream.message().await.map_err(grpc)? {
        last = event.status;
        each(&event);
    }
    Ok(last)
}

/// Runs one command against the orchestrator.
pub async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    if let Command::Validate {
        files,
        builtin_descriptors,
        reflection_timeout,
    } = &cli.command
    {
        return validate(files, *builtin_descriptors, reflection_timeout).await;
    }
    let channel = tonic::transport::Endpoint::from_shared(cli.endpoint.clone())
        .with_context(|| format!("bad --endpoint `{}`", cli.endpoint))?
        .connect()
        .await
        .with_context(|| format!("cannot reach the orchestrator at {}", cli.endpoint))?;
    let mut client = SagaOrchestratorClient::new(channel);
    let json_out = cli.output == Output::Json;
    let mut text = String::new();
    let mut exit_code = 0;
    match cli.command {
        Command::Start {
            definition,
            input,
            version,
            idempotency_key,
            wait,
        } => {
            let input = read_input(&input)?;
            let started = client
                .start_saga(pb::StartSagaRequest {
                    definition: definition.clone(),
                    version,
                    input: Some(input),
                    idempotency_key: idempotency_key.unwrap_or_default(),
                })
                .await
                .map_err(grpc)?
                .into_inner();
            if !wait {
                if json_out {
                    text = json!({"saga_id": started.saga_id, "created": started.created, "version": started.version}).to_string();
                } else {
                    let what = if started.created {
                        "started"
                    } else {
                        "already exists"
                    };
                    text = format!(
                        "saga {} {what} ({definition} v{})",
                        started.saga_id, started.version
                    );
                }
            } else {
                if !json_out {
                    eprintln!(
                        "saga {} ({definition} v{}): waiting for it to finish",
                        started.saga_id, started.version
                    );
                }
                watch(&mut client, &started.saga_id, |e| {
                    if !json_out {
                        eprintln!("{}", event_line(e));
                    }
                })
                .await?;
                let saga = client
                    .get_saga(pb::GetSagaRequest {
                        saga_id: started.saga_id.clone(),
                    })
                    .await
                    .map_err(grpc)?
                    .into_inner();
                if saga.status != pb::SagaStatus::Completed as i32 {
                    exit_code = 3;
                }
                text = if json_out {
                    saga_json(&saga).to_string()
                } else {
                    saga_table(&saga)
                };
            }
        }
        Command::Get { saga_id } => {
            let saga = client
                .get_saga(pb::GetSagaRequest { saga_id })
                .await
                .map_err(grpc)?
                .into_inner();
            text = if json_out {
                saga_json(&saga).to_string()
            } else {
                saga_table(&saga)
            };
        }
        Command::List {
            status,
            definition,
            page_size,
            page_token,
            created_after,
            created_before,
        } => {
            let status = status_arg(status)?;
            let page = client
                .list_sagas(pb::ListSagasRequest {
                    status: status as i32,
                    definition: definition.unwrap_or_default(),
                    page_size,
                    page_token: page_token.unwrap_or_default(),
                    created_after: created_after
                        .map(|t| time_arg(&t, "--created-after"))
                        .transpose()?,
                    created_before: created_before
                        .map(|t| time_arg(&t, "--created-before"))
                        .transpose()?,
                })
                .await
                .map_err(grpc)?
                .into_inner();
            if json_out {
                let sagas: Vec<Value> = page
                    .sagas
                    .iter()
                    .map(|s| json!({"saga_id": s.saga_id, "definition": s.definition, "version": s.version,
                        "status": status_name(s.status), "business_status": s.business_status,
                        "created_at_ms": time(&s.created_at), "updated_at_ms": time(&s.updated_at)}))
                    .collect();
                text = json!({"sagas": sagas, "next_page_token": page.next_page_token}).to_string();
            } else {
                let _ = writeln!(
                    text,
                    "{:<38} {:<22} {:>3} {:<13} ORDER STATUS",
                    "SAGA", "DEFINITION", "V", "STATUS"
                );
                for s in &page.sagas {
                    let _ = writeln!(
                        text,
                        "{:<38} {:<22} {:>3} {:<13} {}",
                        s.saga_id,
                        s.definition,
                        s.version,
                        status_name(s.status),
                        s.business_status
                    );
                }
                if !page.next_page_token.is_empty() {
                    let _ = writeln!(text, "next page: --page-token {}", page.next_page_token);
                }
            }
        }
        Command::Watch { saga_id } => {
            watch(&mut client, &saga_id, |e| {
                if json_out {
                    println!("{}", event_json(e));
                } else {
                    println!("{}", event_line(e));
                }
            })
            .await?;
        }
        Command::Signal {
            saga_id,
            signal,
            payload,
        } => {
            let payload = read_object(&payload, "payload")?;
            let reply = client
                .signal_saga(pb::SignalSagaRequest {
                    saga_id: saga_id.clone(),
                    signal: signal.clone(),
                    payload: Some(payload),
                })
                .await
                .map_err(grpc)?
                .into_inner();
            text = if json_out {
                json!({"saga_id": saga_id, "signal": signal, "step": reply.step, "status": status_name(reply.status),
                       "buffered": reply.buffered, "duplicate": reply.duplicate})
                .to_string()
            } else if reply.duplicate {
                format!(
                    "signal {signal} was already delivered to saga {saga_id} (step {}); nothing changed",
                    reply.step
                )
            } else if reply.buffered {
                format!(
                    "signal {signal} kept for step {} of saga {saga_id}, which has not started yet; status {}",
                    reply.step,
                    status_name(reply.status)
                )
            } else {
                format!(
                    "signal {signal} taken by step {} of saga {saga_id}; status {}",
                    reply.step,
                    status_name(reply.status)
                )
            };
        }
        Command::Changes {
            status,
            definition,
            after_cursor,
            limit,
        } => {
            let status = status_arg(status)?;
            let mut stream = client
                .watch_sagas(pb::WatchSagasRequest {
                    status: status as i32,
                    definition: definition.unwrap_or_default(),
                    after_cursor,
                })
                .await
                .map_err(grpc)?
                .into_inner();
            let mut seen = 0u64;
            while limit.is_none_or(|l| seen < l) {
                let Some(change) = stream.message().await.map_err(grpc)? else {
                    break;
                };
                seen += 1;
                if json_out {
                    println!(
                        "{}",
                        json!({"cursor": change.cursor, "saga_id": change.saga_id, "definition": change.definition,
                               "version": change.version, "status": status_name(change.status),
                               "business_status": change.business_status, "at_ms": time(&change.at), "seq": change.seq})
                    );
                } else {
                    println!(
                        "{:>8} {:<38} {:<13} {}",
                        change.cursor,
                        change.saga_id,
                        status_name(change.status),
                        change.business_status
                    );
                }
            }
        }
        Command::Validate {
            files,
            builtin_descriptors,
            reflection_timeout,
        } => return validate(&files, builtin_descriptors, &reflection_timeout).await,
        Command::Cancel { saga_id, reason } => {
            let reply = client
                .cancel_saga(pb::CancelSagaRequest {
                    saga_id: saga_id.clone(),
                    reason,
                })
                .await
                .map_err(grpc)?
                .into_inner();
            text = if json_out {
                json!({"saga_id": saga_id, "status": status_name(reply.status)}).to_string()
            } else {
                format!(
                    "cancellation of saga {saga_id} recorded; status {}",
                    status_name(reply.status)
                )
            };
        }
        Command::Breakers => {
            let list = client
                .list_circuit_breakers(pb::ListCircuitBreakersRequest {})
                .await
                .map_err(grpc)?
                .into_inner();
            text = if json_out {
                Value::Array(list.breakers.iter().map(breaker_json).collect()).to_string()
            } else {
                breakers_table(&list.breakers)
            };
        }
        Command::Breaker(command) => {
            let (participant, mode) = match command {
                BreakerCommand::ForceOpen { participant } => {
                    (participant, pb::BreakerMode::ForcedOpen)
                }
                BreakerCommand::Disable { participant } => (participant, pb::BreakerMode::Disabled),
                BreakerCommand::Reset { participant } => (participant, pb::BreakerMode::Normal),
            };
            let breaker = client
                .set_circuit_breaker(pb::SetCircuitBreakerRequest {
                    participant,
                    mode: mode as i32,
                })
                .await
                .map_err(grpc)?
                .into_inner();
            text = if json_out {
                breaker_json(&breaker).to_string()
            } else {
                format!(
                    "circuit breaker of {} is now {}",
                    breaker.participant, breaker.state
                )
            };
        }
        Command::Definitions(DefinitionsCommand::List) => {
            let list = client
                .list_definitions(pb::ListDefinitionsRequest {})
                .await
                .map_err(grpc)?
                .into_inner();
            if json_out {
                let items: Vec<Value> = list
                    .definitions
                    .iter()
                    .map(|d| json!({"name": d.name, "versions": d.versions, "latest": d.latest}))
                    .collect();
                text = Value::Array(items).to_string();
            } else {
                let _ = writeln!(text, "{:<30} {:>6}  VERSIONS", "DEFINITION", "LATEST");
                for d in &list.definitions {
                    let versions: Vec<String> = d.versions.iter().map(u32::to_string).collect();
                    let _ = writeln!(
                        text,
                        "{:<30} {:>6}  {}",
                        d.name,
                        d.latest,
                        versions.join(", ")
                    );
                }
            }
        }
        Command::Definitions(DefinitionsCommand::Get { name, version }) => {
            let d = client
                .get_definition(pb::GetDefinitionRequest {
                    name,
                    version: version.unwrap_or(0),
                })
                .await
                .map_err(grpc)?
                .into_inner();
            text = if json_out {
                json!({"name": d.name, "version": d.version, "yaml": d.yaml, "steps": d.steps, "participants": d.participants}).to_string()
            } else {
                d.yaml
            };
        }
        Command::Definitions(DefinitionsCommand::Put { file }) => {
            let yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let put = client
                .put_definition(pb::PutDefinitionRequest { yaml })
                .await
                .map_err(grpc)?
                .into_inner();
            text = if json_out {
                json!({"name": put.name, "version": put.version, "created": put.created})
                    .to_string()
            } else if put.created {
                format!("definition {} v{} stored", put.name, put.version)
            } else {
                format!(
                    "definition {} v{} was already stored with the same text",
                    put.name, put.version
                )
            };
        }
    }
    Ok(Outcome { text, exit_code })
}
