//! The chaos harness in CI: a bounded round (500 sagas; orchestrator kills and pauses,
//! participant kills, participant fault windows, a payment outage that opens the breaker,
//! proxy faults on every participant) must hold every rule; and the same harness against a
//! deliberately broken orchestrator (one compensation skipped) must find the break.
//!
//! `SAGA_CHAOS_SEED=N` replays a round's schedule; the report printed names the seed and
//! the `chaos` command that replays it.

use clap::Parser;
use tests::chaos::{self, Config, Report};

const ORCHESTRATOR: &str = env!("CARGO_BIN_EXE_crashable-orchestrator");
const PARTICIPANT: &str = env!("CARGO_BIN_EXE_chaos-participant");

/// One round at a time: the two rounds of this file would otherwise share two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    config: Config,
}

/// A config from `chaos` flags, with this build's binaries and the seed of
/// `SAGA_CHAOS_SEED` if set.
fn config(flags: &[&str]) -> Config {
    let mut args = vec![
        "chaos",
        "--orchestrator-bin",
        ORCHESTRATOR,
        "--participant-bin",
        PARTICIPANT,
    ];
    args.extend_from_slice(flags);
    let mut config = Cli::try_parse_from(args)
        .expect("the test's flags parse")
        .config;
    config.seed = std::env::var("SAGA_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    config.verbose = std::env::var_os("SAGA_CHAOS_VERBOSE").is_some();
    config
}

async fn round(config: Config) -> anyhow::Result<Report> {
    let _one = ONE_AT_A_TIME.lock().await;
    tests::init_test_logging();
    chaos::run(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_chaos_round_holds_every_rule() -> anyhow::Result<()> {
    let config = config(&[
        "--duration",
        "30s",
        "--sagas",
        "500",
        "--concurrency",
        "16",
        "--orchestrator-kills",
        "5",
        "--orchestrator-pauses",
        "3",
        "--participant-kills",
        "2",
        "--payment-outage",
        "4s",
        "--outage-at",
        "4s",
        "--fault-windows",
        "3",
        "--fault-window",
        "3s",
        // Every proxy fault of the on-demand run, resets of both kinds, refused
        // connections and partitions included: broken streams are unknown outcomes, retried
        // with the same key.
        "--terminal-within",
        "30s",
        "--settle-timeout",
        "60s",
    ]);
    let report = round(config).await?;
    println!("{report}");
    assert!(report.violations.is_empty(), "violations:\n{report}");
    assert!(
        report.unmet.is_empty(),
        "the round did not show everything:\n{report}"
    );
    assert_eq!(report.acknowledged, 500);
    assert_eq!(report.orchestrator_kills, 5);
    assert_eq!(report.participant_kills, 2);
    assert!(
        report
            .breaker
            .as_ref()
            .is_some_and(|b| b.opened_after.is_some())
    );
    // Every proxy injected faults.
    for kind in ["payment", "store", "rider"] {
        let faults: u64 = report
            .faults
            .iter()
            .filter(|(name, _, _)| name.starts_with("proxy:") && !name.contains("relayed"))
            .filter_map(|(_, _, detail)| {
                detail
                    .split([',', ';'])
                    .find_map(|part| part.trim().strip_prefix(&format!("{kind} ")))
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .sum();
        assert!(faults > 0, "no proxy fault at {kind}:\n{report}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_finds_a_skipped_compensation() -> anyhow::Result<()> {
    // A deliberately broken orchestrator: the first compensation is recorded as done
    // without calling the participant. No other fault, so that everything the checker
    // reports comes from the break.
    let config = config(&[
        "--duration",
        "4s",
        "--sagas",
        "60",
        "--concurrency",
        "8",
        "--orchestrator-kills",
        "0",
        "--orchestrator-pauses",
        "0",
        "--participant-kills",
        "0",
        "--payment-outage",
        "0s",
        "--fault-windows",
        "0",
        "--partitions",
        "0",
        "--latency",
        "0",
        "--reset",
        "0",
        "--blackhole",
        "0",
        "--refuse",
        "0",
        "--duplicate",
        "0",
        "--failpoints",
        "runtime::skip_compensation=1*return",
    ]);
    let report = round(config).await?;
    println!("{report}");
    assert!(
        !report.violations.is_empty(),
        "the checker missed the skipped compensation:\n{report}"
    );
    let sagas: std::collections::BTreeSet<_> = report
        .violations
        .iter()
        .map(|v| v.saga_id.clone())
        .collect();
    assert_eq!(
        sagas.len(),
        1,
        "one compensation was skipped, so one saga is wrong:\n{report}"
    );
    assert!(
        sagas.iter().all(Option::is_some),
        "each violation names its saga:\n{report}"
    );
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.what.contains("never received it") || v.what.contains("never undone")),
        "{report}"
    );
    // The data a failing run keeps is of no use here.
    if let Some(dir) = &report.kept {
        std::fs::remove_dir_all(dir)?;
    }
    Ok(())
}
