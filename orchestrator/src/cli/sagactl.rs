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
    about = "Start, inspect, watch and cancel sagas",
    after_help = "Exit status: 0 on success; 1 on an error; with --wait, 3 when the saga ended COMPENSATED or FAILED."
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
    let text = match input.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read input file {path}"))?,
        None => input.to_owned(),
    };
    let value: Value = serde_json::from_str(&text).context("--input is not valid JSON")?;
    if !value.is_object() {
        bail!("--input must be a JSON object, like '{{\"order_id\":\"o-1\"}}'");
    }
    Ok(convert::json_to_struct(&value))
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
        } => {
            let status = match status {
                None => pb::SagaStatus::Unspecified,
                Some(s) => match saga_engine::SagaStatus::parse(&s) {
                    Some(s) => convert::saga_status(s),
                    None => bail!(
                        "--status `{s}` is not one of RUNNING, WAITING, COMPENSATING, COMPLETED, COMPENSATED, FAILED"
                    ),
                },
            };
            let page = client
                .list_sagas(pb::ListSagasRequest {
                    status: status as i32,
                    definition: definition.unwrap_or_default(),
                    page_size,
                    page_token: page_token.unwrap_or_default(),
                })
                .await
                .map_err(grpc)?
                .into_inner();
            if json_out {
                let sagas: Vec<Value> = page
                    .sagas
                    .iter()
                    .map(|s| json!({"saga_id": s.saga_id, "definition": s.definition, "version": s.version,
                        "status": status_name(s.status), "created_at_ms": time(&s.created_at), "updated_at_ms": time(&s.updated_at)}))
                    .collect();
                text = json!({"sagas": sagas, "next_page_token": page.next_page_token}).to_string();
            } else {
                let _ = writeln!(
                    text,
                    "{:<38} {:<22} {:>3} {:<13}",
                    "SAGA", "DEFINITION", "V", "STATUS"
                );
                for s in &page.sagas {
                    let _ = writeln!(
                        text,
                        "{:<38} {:<22} {:>3} {:<13}",
                        s.saga_id,
                        s.definition,
                        s.version,
                        status_name(s.status)
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
