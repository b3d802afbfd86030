//! The chaos harness: starts the orchestrator and the participants as processes on
//! loopback, puts a fault-injecting proxy in front of each participant, drives load,
//! injects faults on a schedule drawn from a seed, heals, and checks the engine's rules.
//! Usage and what it checks: `chaos --help`, and the docs of `tests::chaos`.

use clap::Parser;
use tests::chaos::{Config, run};

/// Chaos testing of the saga orchestrator: crashes, network faults and participant
/// failures from a seed, then every rule checked.
///
/// Starts the orchestrator (crashable-orchestrator) and the payment, store and rider
/// participants (chaos-participant) as processes on loopback, found next to this program
/// (under `cargo run`, which builds only `chaos`, they are built first with the same
/// profile), with a fault-injecting HTTP/2 proxy in front of each participant. Starts --sagas
/// order-placement sagas over --duration, each key retried until acknowledged, while
/// killing (-9) and pausing the orchestrator, killing participants, injecting participant
/// faults, a payment outage that opens its circuit breaker, and proxy latency, resets,
/// blackholes, refused connections, partitions and duplicate deliveries. Then heals
/// everything, waits for every saga to be terminal, and checks, from the participants'
/// ledgers, the orchestrator's event logs, its offline replay and the acknowledgements:
/// no acknowledged saga lost; every saga terminal within --terminal-within of the heal; at
/// most one effect per idempotency key; COMPLETED means every effect stands; COMPENSATED
/// means every attempted step undone, in reverse order; no effect after its compensation;
/// FAILED only with a reason.
///
/// Prints a report: sagas started, acknowledged, completed, compensated, failed; faults by
/// kind; time from heal to all-terminal; violations, each with its saga. The report ends
/// with the command that replays the run (same seed, same schedule of faults).
///
/// Exit status: 0 pass; 1 invariant violations; 2 bad flags; 3 the run could not show what
/// it was asked to (e.g. the breaker never opened) or the harness failed.
///
/// Examples:
///
///   cargo run --release -p tests --bin chaos -- --duration 3m --seed 42
///
///   cargo run --release -p tests --bin chaos -- --duration 30s --sagas 500 \
///       --orchestrator-kills 5 --participant-kills 2 --payment-outage 5s
///
///   cargo run --release -p tests --bin chaos -- --duration 10s --sagas 100 \
///       --failpoints 'runtime::skip_compensation=1*return'   # must FAIL
#[derive(Debug, Parser)]
#[command(name = "chaos", version, verbatim_doc_comment)]
struct Cli {
    #[command(flatten)]
    config: Config,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli.config).await {
        Ok(report) => {
            println!("{report}");
            if !report.violations.is_empty() {
                std::process::ExitCode::from(1)
            } else if !report.unmet.is_empty() {
                std::process::ExitCode::from(3)
            } else {
                std::process::ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("chaos: the run failed: {e:#}");
            std::process::ExitCode::from(3)
        }
    }
}
