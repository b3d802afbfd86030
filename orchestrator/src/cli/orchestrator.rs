//! `orchestrator serve` and `orchestrator dev`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use participants::Kind;
use tokio::net::TcpListener;

use crate::app::{Config, Orchestrator};
use telemetry::{LogFormat, Telemetry, TelemetryConfig};

#[derive(Debug, Parser)]
#[command(
    name = "orchestrator",
    version,
    about = "Saga orchestrator: runs YAML-defined sagas across gRPC participants"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the orchestrator against participants running elsewhere.
    Serve(ServeArgs),
    /// Run the orchestrator and the payment, store and rider participants in one process,
    /// on loopback, with embedded storage: everything needed to try it out.
    Dev(DevArgs),
    /// Replay every saga of a (stopped) orchestrator's data directory and report each one
    /// whose stored state disagrees with its event log; exits 1 if any does.
    Check(CheckArgs),
    /// Exit 0 when an admin endpoint answers 200, else print why and exit 1 (for container
    /// HEALTHCHECKs; the images have no HTTP client).
    Healthcheck(HealthcheckArgs),
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The endpoint to probe.
    #[arg(long, default_value = "http://127.0.0.1:9464/healthz")]
    pub url: String,
    /// How long to wait for the answer, e.g. 3s.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Data directory (sled) of the orchestrator; for `dev`, that is DATA/orchestrator.
    #[arg(long, env = "SAGA_DATA", default_value = "./data")]
    pub data: PathBuf,
}

#[derive(Debug, Args)]
pub struct Common {
    /// gRPC listen address of the orchestrator.
    #[arg(long, env = "SAGA_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Data directory (sled).
    #[arg(long, env = "SAGA_DATA", default_value = "./data")]
    pub data: PathBuf,
    /// Folder of saga definitions (*.yaml) loaded at start.
    #[arg(long, env = "SAGA_SAGAS", default_value = "./sagas")]
    pub sagas: PathBuf,
    /// How long to keep trying a participant's reflection service at start, e.g. 30s.
    #[arg(long, env = "SAGA_DESCRIPTOR_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub descriptor_wait: Duration,
    /// On SIGINT/SIGTERM, how long open calls get to finish before they are dropped.
    #[arg(long, env = "SAGA_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Export traces over OTLP/gRPC to this collector, e.g. http://localhost:4317 (Jaeger).
    /// Default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT; without
    /// any, no trace is exported. OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES and
    /// OTEL_TRACES_SAMPLER(_ARG) are honoured.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Log format on stderr: human-readable text, or one JSON object per line.
    #[arg(long, env = "SAGA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Admin HTTP listener (/metrics, /healthz, /readyz); `off` disables it.
    #[arg(long, env = "SAGA_ADMIN_LISTEN", default_value = telemetry::DEFAULT_ADMIN_LISTEN, value_parser = parse_admin)]
    pub admin_listen: AdminListen,
}

/// `--admin-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminListen(pub Option<SocketAddr>);

fn parse_admin(text: &str) -> Result<AdminListen, String> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(AdminListen(None));
    }
    text.trim()
        .parse()
        .map(|addr| AdminListen(Some(addr)))
        .map_err(|e| format!("`{text}` is not an address like 127.0.0.1:9464, nor `off`: {e}"))
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: Common,
    /// Where a participant lives, overriding its definitions: NAME=URL, repeatable
    /// (e.g. --participant payment=http://payment:50061).
    #[arg(long = "participant", env = "SAGA_PARTICIPANTS", value_delimiter = ',', value_parser = parse_participant)]
    pub participants: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    #[command(flatten)]
    pub common: Common,
    /// Listen address of the payment participant.
    #[arg(long, default_value = "127.0.0.1:50061")]
    pub payment: SocketAddr,
    /// Listen address of the store participant.
    #[arg(long, default_value = "127.0.0.1:50062")]
    pub store: SocketAddr,
    /// Listen address of the rider participant.
    #[arg(long, default_value = "127.0.0.1:50063")]
    pub rider: SocketAddr,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    saga_engine::duration::parse_duration(text)
}

fn parse_participant(text: &str) -> Result<(String, String), String> {
    let (name, url) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not NAME=URL (e.g. payment=http://127.0.0.1:50061)"))?;
    if name.trim().is_empty() || !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "`{text}` is not NAME=URL with an http:// or https:// URL"
        ));
    }
    Ok((name.trim().to_owned(), url.trim().to_owned()))
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what}"))
}

fn config(common: &Common, data: &Path, participants: BTreeMap<String, String>) -> Config {
    Config {
        data: data.to_owned(),
        sagas: Some(common.sagas.clone()),
        participants,
        descriptor_wait: common.descriptor_wait,
        shutdown_grace: common.shutdown_grace,
    }
}

/// Installs logging and (when asked for) trace export for the parsed command: the
/// binaries call this once, before [`run`], and shut the result down after it.
pub fn init_telemetry(cli: &Cli) -> anyhow::Result<Telemetry> {
    let mut config = TelemetryConfig::new("orchestrator");
    if let Command::Serve(ServeArgs { common, .. }) | Command::Dev(DevArgs { common, .. }) =
        &cli.command
    {
        config.log_format = common.log_format;
        config.otlp_endpoint = common.otlp_endpoint.clone();
    }
    telemetry::init(config).context("cannot set up logging and tracing")
}

async fn bind_admin(common: &Common) -> anyhow::Result<Option<TcpListener>> {
    match common.admin_listen.0 {
        Some(addr) => Ok(Some(bind(addr, "the admin endpoints").await?)),
        None => Ok(None),
    }
}

/// The whole of an orchestrator binary's `main` after parsing: telemetry, the command,
/// the export of buffered spans, and the exit status.
pub async fn main(cli: Cli) -> std::process::ExitCode {
    let telemetry = match init_telemetry(&cli) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = run(cli, Some(&telemetry)).await;
    // Export the spans still buffered before exiting.
    telemetry.shutdown_async().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the parsed command until SIGINT or SIGTERM. `telemetry` (from
/// [`init_telemetry`]) gives the in-process participants of `dev` their own service names.
pub async fn run(cli: Cli, telemetry: Option<&Telemetry>) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let listener = bind(args.common.listen, "the orchestrator").await?;
            let admin = bind_admin(&args.common).await?;
            let participants = args.participants.into_iter().collect();
            let orchestrator = Orchestrator::start_with_admin(
                config(&args.common, &args.common.data, participants),
                listener,
                admin,
            )
            .await
            .context("cannot start the orchestrator")?;
            if let Some(addr) = orchestrator.admin_addr() {
                println!("admin endpoints on http://{addr}");
            }
            println!("orchestrator listening on http://{}", orchestrator.addr());
            super::shutdown_signal().await;
            tracing::info!("shutting down");
            orchestrator.shutdown().await;
            Ok(())
        }
        Command::Dev(args) => dev(args, telemetry).await,
        Command::Healthcheck(args) => telemetry::probe(&args.url, args.timeout)
            .await
            .map_err(anyhow::Error::msg),
        Command::Check(args) => {
            let report = crate::check::check_dir(&args.data)
                .with_context(|| format!("cannot check {}", args.data.display()))?;
            for problem in &report.problems {
                println!("{problem}");
            }
            println!(
                "checked {} sagas and {} definitions in {}: {} problem(s)",
                report.sagas,
                report.definitions,
                args.data.display(),
                report.problems.len()
            );
            if report.is_clean() {
                Ok(())
            } else {
                bail!("the store disagrees with the event logs")
            }
        }
    }
}

async fn dev(args: DevArgs, telemetry: Option<&Telemetry>) -> anyhow::Result<()> {
    let common = &args.common;
    if !common.sagas.is_dir() {
        bail!(
            "no definitions folder at {} (run from the repository root or pass --sagas DIR)",
            common.sagas.display()
        );
    }
    std::fs::create_dir_all(&common.data)
        .with_context(|| format!("cannot create {}", common.data.display()))?;
    let orchestrator_listener = bind(common.listen, "the orchestrator").await?;
    let mut handles = Vec::new();
    let mut endpoints = BTreeMap::new();
    for (kind, addr) in [
        (Kind::Payment, args.payment),
        (Kind::Store, args.store),
        (Kind::Rider, args.rider),
    ] {
        let listener = bind(addr, &format!("the {kind} participant")).await?;
        // Each participant reports its spans as its own service, as in a real deployment.
        let options = participants::ParticipantOptions {
            tracer: telemetry.and_then(|t| t.service_tracer(kind.as_str())),
            ..Default::default()
        };
        let handle =
            participants::spawn_with(kind, listener, &common.data.join(kind.to_string()), options)
                .await
                .with_context(|| format!("cannot start the {kind} participant"))?;
        endpoints.insert(kind.to_string(), format!("http://{}", handle.addr));
        handles.push(handle);
    }
    let admin = bind_admin(common).await?;
    let orchestrator = Orchestrator::start_with_admin(
        config(common, &common.data.join("orchestrator"), endpoints.clone()),
        orchestrator_listener,
        admin,
    )
    .await
    .context("cannot start the orchestrator")?;

    println!("saga orchestrator (dev): everything runs in this process; Ctrl-C stops it");
    println!("  orchestrator  http://{}", orchestrator.addr());
    for (name, endpoint) in &endpoints {
        println!("  {name:<13} {endpoint}");
    }
    if let Some(addr) = orchestrator.admin_addr() {
        println!("  admin         http://{addr}/metrics  /healthz  /readyz");
    }
    if telemetry.is_some_and(Telemetry::exporting) {
        println!("  traces        exported over OTLP");
    }
    println!("  data          {}", common.data.display());
    let definitions: Vec<String> = orchestrator
        .runtime()
        .registry()
        .list()
        .into_iter()
        .map(|(name, versions)| format!("{name} (v{})", versions.last().copied().unwrap_or(0)))
        .collect();
    println!("  definitions   {}", definitions.join(", "));
    println!();
    println!("try:");
    println!(
        "  cargo run --release --bin sagactl -- --endpoint http://{} start order-placement --input '{{\"order_id\":\"o-1\",\"customer_id\":\"c-1\",\"amount_cents\":2599,\"card\":\"tok_visa\",\"store_id\":\"s-1\",\"items\":[\"bibimbap\"],\"zone\":\"gangnam\"}}' --wait",
        orchestrator.addr()
    );

    super::shutdown_signal().await;
    tracing::info!("shutting down");
    orchestrator.shutdown().await;
    for handle in handles {
        if let Err(e) = handle.shutdown().await {
            tracing::warn!(cause = %e, "participant did not stop cleanly");
        }
    }
    Ok(())
}
