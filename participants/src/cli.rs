//! The `participant` command line (the binary is a thin wrapper around [`main`]).
//!
//! `participant payment|store|rider [--listen ADDR] [--data DIR]`: runs one participant
//! service until Ctrl-C or SIGTERM.
//!
//! `participant notifier --orchestrator URL [--data DIR] [--listen ADDR] [--definition NAME]`:
//! runs the notifier, which follows the orchestrator's change feed, until Ctrl-C or SIGTERM.
//!
//! `participant healthcheck [--url URL]`: exits 0 when an admin endpoint answers 200 (for
//! container HEALTHCHECKs; the images have no HTTP client).
//!
//! Every service form also takes `--log-format text|json`, `--otlp-endpoint URL` (server
//! spans over OTLP/gRPC; the `OTEL_*` variables apply) and `--admin-listen ADDR|off`
//! (`/metrics`, `/healthz`, `/readyz`).

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::{Kind, NotifierConfig, ParticipantOptions};
use anyhow::Context;
use clap::{Parser, Subcommand};
use telemetry::{LogFormat, TelemetryConfig};

/// Runs one food-delivery participant (payment, store or rider), or the notifier, over gRPC.
#[derive(Debug, Parser)]
#[command(name = "participant", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Address to listen on [default: 127.0.0.1:50061 / 50062 / 50063 / 50064 for payment / store / rider / notifier].
    #[arg(long, env = "SAGA_LISTEN", global = true, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory of the database [default: ./data/<payment|store|rider|notifier>].
    #[arg(long, env = "SAGA_DATA", global = true, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Log lines as human-readable text or as JSON objects (with the current span's fields).
    #[arg(
        long,
        env = "SAGA_LOG_FORMAT",
        global = true,
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
    /// Export server spans over OTLP/gRPC to this collector, e.g. http://127.0.0.1:4317
    /// [default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then OTEL_EXPORTER_OTLP_ENDPOINT; none:
    /// no export].
    #[arg(long, global = true, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Address of the admin endpoints (/metrics, /healthz, /readyz), or "off" [default:
    /// 127.0.0.1:9465 / 9466 / 9467 / 9468 for payment / store / rider / notifier, clear of
    /// the orchestrator's 9464].
    #[arg(long, env = "SAGA_ADMIN_LISTEN", global = true, value_name = "ADDR")]
    pub admin_listen: Option<AdminListen>,
    /// For chaos tests only: the admin endpoints also accept `PUT /faults` (JSON:
    /// unavailable, slow, slow_ms, hang, hang_ms, lose_reply probabilities, seed) and
    /// `DELETE /faults`, to inject random faults into every mutating call.
    #[arg(long, global = true)]
    pub allow_fault_injection: bool,
}

/// `--admin-listen`: an address, or "off".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminListen {
    Off,
    At(SocketAddr),
}

impl std::str::FromStr for AdminListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("off") {
            return Ok(AdminListen::Off);
        }
        s.trim()
            .parse()
            .map(AdminListen::At)
            .map_err(|e| format!("expected an address such as 127.0.0.1:9465, or \"off\": {e}"))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The payment participant: authorizes, voids, captures and refunds charges.
    Payment,
    /// The store participant: submits and cancels store orders.
    Store,
    /// The rider participant: requests and cancels deliveries.
    Rider,
    /// The notifier: records one notification per saga status change of the orchestrator's
    /// change feed (WatchSagas), resuming from its stored cursor.
    Notifier(NotifierArgs),
    /// Exit 0 when an admin endpoint answers 200, else print why and exit 1.
    Healthcheck(HealthcheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct HealthcheckArgs {
    /// The endpoint to probe.
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://127.0.0.1:9465/healthz"
    )]
    pub url: String,
    /// How long to wait for the answer, in seconds.
    #[arg(long, default_value_t = 3)]
    pub timeout_secs: u64,
}

#[derive(Debug, clap::Args)]
pub struct NotifierArgs {
    /// The orchestrator's gRPC endpoint, e.g. http://127.0.0.1:50051.
    #[arg(long, env = "SAGA_ORCHESTRATOR", value_name = "URL")]
    pub orchestrator: String,
    /// Follow only the sagas of this definition [default: every definition].
    #[arg(long, env = "SAGA_DEFINITION", value_name = "NAME")]
    pub definition: Option<String>,
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Payment => Kind::Payment.as_str(),
            Command::Store => Kind::Store.as_str(),
            Command::Rider => Kind::Rider.as_str(),
            Command::Notifier(_) => "notifier",
            Command::Healthcheck(_) => "healthcheck",
        }
    }

    fn default_listen(&self) -> &'static str {
        match self {
            Command::Payment => Kind::Payment.default_listen(),
            Command::Store => Kind::Store.default_listen(),
            Command::Rider => Kind::Rider.default_listen(),
            Command::Notifier(_) | Command::Healthcheck(_) => crate::notifier::DEFAULT_LISTEN,
        }
    }

    fn default_admin_listen(&self) -> &'static str {
        match self {
            Command::Payment => "127.0.0.1:9465",
            Command::Store => "127.0.0.1:9466",
            Command::Rider => "127.0.0.1:9467",
            Command::Notifier(_) | Command::Healthcheck(_) => "127.0.0.1:9468",
        }
    }
}

/// The whole of the binary's `main` after parsing.
pub async fn main(cli: Cli) -> std::process::ExitCode {
    let result = match &cli.command {
        Command::Healthcheck(args) => {
            telemetry::probe(&args.url, std::time::Duration::from_secs(args.timeout_secs))
                .await
                .map_err(anyhow::Error::msg)
        }
        _ => match telemetry::init(TelemetryConfig {
            service_name: cli.command.name().to_owned(),
            log_format: cli.log_format,
            otlp_endpoint: cli.otlp_endpoint.clone(),
        })
        .context("cannot set up logging and tracing")
        {
            Ok(telemetry) => {
                let result = run(cli, &telemetry).await;
                // Export the last spans before exit (also after a failure).
                telemetry.shutdown_async().await;
                result
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a service form of the command until Ctrl-C or SIGTERM.
pub async fn run(cli: Cli, telemetry: &telemetry::Telemetry) -> anyhow::Result<()> {
    let name = cli.command.name();
    let listen = match cli.listen {
        Some(addr) => addr,
        None => cli
            .command
            .default_listen()
            .parse()
            .context("invalid default listen address")?,
    };
    let admin_listen = match cli.admin_listen {
        Some(AdminListen::Off) => None,
        Some(AdminListen::At(addr)) => Some(addr),
        None => Some(
            cli.command
                .default_admin_listen()
                .parse()
                .context("invalid default admin address")?,
        ),
    };
    let data = cli.data.unwrap_or_else(|| PathBuf::from("data").join(name));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let admin = match admin_listen {
        None => None,
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (admin endpoints)"))?,
        ),
    };
    let options = ParticipantOptions {
        tracer: telemetry.tracer(),
        admin,
        fault_injection: cli.allow_fault_injection,
    };
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
            return crate::serve_notifier_with(config, listener, options, shutdown_signal())
                .await
                .context("the notifier failed");
        }
        Command::Healthcheck(args) => {
            return telemetry::probe(&args.url, std::time::Duration::from_secs(args.timeout_secs))
                .await
                .map_err(anyhow::Error::msg);
        }
    };
    crate::serve_with(kind, listener, &data, options, shutdown_signal())
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

    #[test]
    fn telemetry_flags_parse_with_defaults_apart_from_the_orchestrator() {
        let cli = Cli::try_parse_from(["participant", "payment"]).unwrap();
        if std::env::var_os("SAGA_LOG_FORMAT").is_none() {
            assert_eq!(cli.log_format, LogFormat::Text);
        }
        assert_eq!(cli.otlp_endpoint, None);
        if std::env::var_os("SAGA_ADMIN_LISTEN").is_none() {
            assert_eq!(cli.admin_listen, None);
        }
        let defaults: Vec<_> = ["payment", "store", "rider"]
            .into_iter()
            .map(|kind| {
                Cli::try_parse_from(["participant", kind])
                    .unwrap()
                    .command
                    .default_admin_listen()
            })
            .collect();
        assert_eq!(
            defaults,
            ["127.0.0.1:9465", "127.0.0.1:9466", "127.0.0.1:9467"]
        );
        assert_ne!(
            telemetry::DEFAULT_ADMIN_LISTEN,
            Command::Payment.default_admin_listen()
        );

        let cli = Cli::try_parse_from([
            "participant",
            "--log-format",
            "json",
            "store",
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
            "--admin-listen",
            "127.0.0.1:1",
        ])
        .unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        assert_eq!(cli.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!(
            cli.admin_listen,
            Some(AdminListen::At("127.0.0.1:1".parse().unwrap()))
        );
        let cli = Cli::try_parse_from(["participant", "rider", "--admin-listen", "off"]).unwrap();
        assert_eq!(cli.admin_listen, Some(AdminListen::Off));
        assert!(
            Cli::try_parse_from(["participant", "rider", "--admin-listen", "nowhere"]).is_err()
        );
        assert!(Cli::try_parse_from(["participant", "rider", "--log-format", "yaml"]).is_err());
    }
}
