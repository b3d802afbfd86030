//! `participant payment|store|rider [--listen ADDR] [--data DIR]`: runs one participant
//! service until Ctrl-C or SIGTERM.
//!
//! `participant notifier --orchestrator URL [--data DIR] [--listen ADDR] [--definition NAME]`:
//! runs the notifier, which follows the orchestrator's change feed, until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use participants::{Kind, NotifierConfig};
use tracing_subscriber::EnvFilter;

/// Runs one food-delivery participant (payment, store or rider), or the notifier, over gRPC.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Address to listen on [default: 127.0.0.1:50061 / 50062 / 50063 / 50064 for payment / store / rider / notifier].
    #[arg(long, env = "SAGA_LISTEN", global = true, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Directory of the database [default: ./data/<payment|store|rider|notifier>].
    #[arg(long, env = "SAGA_DATA", global = true, value_name = "DIR")]
    data: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The payment participant: authorizes, voids, captures and refunds charges.
    Payment,
    /// The store participant: submits and cancels store orders.
    Store,
    /// The rider participant: requests and cancels deliveries.
    Rider,
    /// The notifier: records one notification per saga status change of the orchestrator's
    /// change feed (WatchSagas), resuming from its stored cursor.
    Notifier(NotifierArgs),
}

#[derive(Debug, clap::Args)]
struct NotifierArgs {
    /// The orchestrator's gRPC endpoint, e.g. http://127.0.0.1:50051.
    #[arg(long, env = "SAGA_ORCHESTRATOR", value_name = "URL")]
    orchestrator: String,
    /// Follow only the sagas of this definition [default: every definition].
    #[arg(long, env = "SAGA_DEFINITION", value_name = "NAME")]
    definition: Option<String>,
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Payment => Kind::Payment.as_str(),
            Command::Store => Kind::Store.as_str(),
            Command::Rider => Kind::Rider.as_str(),
            Command::Notifier(_) => "notifier",
        }
    }

    fn default_listen(&self) -> &'static str {
        match self {
            Command::Payment => Kind::Payment.default_listen(),
            Command::Store => Kind::Store.default_listen(),
            Command::Rider => Kind::Rider.default_listen(),
            Command::Notifier(_) => participants::notifier::DEFAULT_LISTEN,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let name = cli.command.name();
    let listen = match cli.listen {
        Some(addr) => addr,
        None => cli
            .command
            .default_listen()
            .parse()
            .context("invalid default listen address")?,
    };
    let data = cli.data.unwrap_or_else(|| PathBuf::from("data").join(name));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let kind = match cli.command {
        Command::Payment => Kind::Payment,
        Command::Store => Kind::Store,
        Command::Rider => Kind::Rider,
        Command::Notifier(args) => {
            let config = NotifierConfig {
                orchestrator: args.orchestrator,
                data,
                definition: args.definition,
            };
            return participants::serve_notifier(config, listener, shutdown_signal())
                .await
                .context("the notifier failed");
        }
    };
    participants::serve(kind, listener, &data, shutdown_signal())
        .await
        .with_context(|| format!("the {kind} participant failed"))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn participants_parse_as_before() {
        for args in [
            &[
                "participant",
                "store",
                "--listen",
                "127.0.0.1:1",
                "--data",
                "d",
            ][..],
            &[
                "participant",
                "--listen",
                "127.0.0.1:1",
                "store",
                "--data",
                "d",
            ][..],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert!(matches!(cli.command, Command::Store));
            assert_eq!(cli.listen, Some("127.0.0.1:1".parse().unwrap()));
            assert_eq!(cli.data, Some(PathBuf::from("d")));
        }
        let cli = Cli::try_parse_from(["participant", "rider"]).unwrap();
        assert_eq!(cli.command.default_listen(), "127.0.0.1:50063");
        assert!(Cli::try_parse_from(["participant", "rider", "--orchestrator", "x"]).is_err());
        assert!(Cli::try_parse_from(["participant", "cook"]).is_err());
    }

    #[test]
    fn the_notifier_takes_its_own_flags() {
        let cli = Cli::try_parse_from([
            "participant",
            "notifier",
            "--orchestrator",
            "http://127.0.0.1:50051",
            "--data",
            "d",
            "--definition",
            "order",
        ])
        .unwrap();
        assert_eq!(cli.command.default_listen(), "127.0.0.1:50064");
        let Command::Notifier(args) = cli.command else {
            panic!("not the notifier: {:?}", cli.command);
        };
        assert_eq!(args.orchestrator, "http://127.0.0.1:50051");
        assert_eq!(args.definition.as_deref(), Some("order"));
        assert_eq!(cli.data, Some(PathBuf::from("d")));
        // --orchestrator is required (unless SAGA_ORCHESTRATOR is set).
        if std::env::var_os("SAGA_ORCHESTRATOR").is_none() {
            assert!(Cli::try_parse_from(["participant", "notifier"]).is_err());
        }
    }
}
