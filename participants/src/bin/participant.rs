//! `participant payment|store|rider [--listen ADDR] [--data DIR]`: runs one participant
//! service until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use participants::Kind;
use tracing_subscriber::EnvFilter;

/// Runs one food-delivery participant (payment, store or rider) over gRPC.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Which participant to run.
    kind: Kind,
    /// Address to listen on [default: 127.0.0.1:50061 / 50062 / 50063 for payment / store / rider].
    #[arg(long, env = "SAGA_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory of the participant's database [default: ./data/<kind>].
    #[arg(long, env = "SAGA_DATA")]
    data: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let listen = match args.listen {
        Some(addr) => addr,
        None => args
            .kind
            .default_listen()
            .parse()
            .context("invalid default listen address")?,
    };
    let data = args
        .data
        .unwrap_or_else(|| PathBuf::from("data").join(args.kind.as_str()));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    participants::serve(args.kind, listener, &data, shutdown_signal())
        .await
        .with_context(|| format!("the {} participant failed", args.kind))
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
