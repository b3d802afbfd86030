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

/// Runs the parsed command until SIGINT or SIGTERM.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let listener = bind(args.common.listen, "the orchestrator").await?;
            let participants = args.participants.into_iter().collect();
            let orchestrator = Orchestrator::start(
                config(&args.common, &args.common.data, participants),
                listener,
            )
            .await
            .context("cannot start the orchestrator")?;
            println!("orchestrator listening on http://{}", orchestrator.addr());
            super::shutdown_signal().await;
            tracing::info!("shutting down");
            orchestrator.shutdown().await;
            Ok(())
        }
        Command::Dev(args) => dev(args).await,
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

async fn dev(args: DevArgs) -> anyhow::Result<()> {
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
        let handle = participants::spawn(kind, listener, &common.data.join(kind.to_string()))
            .await
            .with_context(|| format!("cannot start the {kind} participant"))?;
        endpoints.insert(kind.to_string(), format!("http://{}", handle.addr));
        handles.push(handle);
    }
    let orchestrator = Orchestrator::start(
        config(common, &common.data.join("orchestrator"), endpoints.clone()),
        orchestrator_listener,
    )
    .await
    .context("cannot start the orchestrator")?;

    println!("saga orchestrator (dev): everything runs in this process; Ctrl-C stops it");
    println!("  orchestrator  http://{}", orchestrator.addr());
    for (name, endpoint) in &endpoints {
        println!("  {name:<13} {endpoint}");
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
