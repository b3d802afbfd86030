//! The `bench` command line, and which scenarios (with which parameters) it runs.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::scenarios::{FOOD_DELIVERY, ORDER_PLACEMENT};

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "End-to-end benchmark: the orchestrator and the payment, store and rider participants \
             as processes on loopback, driven over gRPC",
    after_help = "Without --scenario, runs c64, c64-fail10, c1, waiting-10k and restart-10k; \
                  or, if --sagas, --concurrency, --fail-pct or --definition is given, one \
                  `custom` scenario with them. Given with --scenario, they override the \
                  scenarios' own parameters. Prints a table, then one JSON line per scenario; \
                  exits 1 if a scenario failed or had errors."
)]
pub struct Args {
    /// Sagas per scenario (for waiting-10k and restart-10k: sagas parked).
    #[arg(long)]
    pub sagas: Option<usize>,
    /// Sagas in flight at once.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Percent of sagas failing at the rider step (`"zone":"nowhere"`), which compensates
    /// the store order and the payment.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub fail_pct: Option<u32>,
    /// Definition of the throughput scenarios; it must run to its end without signals.
    #[arg(long)]
    pub definition: Option<String>,
    /// What the orchestrator makes durable before acting; `strict` (every state change
    /// flushed and fdatasync'ed before it is acted on) is the only mode it has.
    #[arg(long, value_enum, default_value_t = Durability::Strict)]
    pub durability: Durability,
    /// Scenarios to run, in order (repeatable).
    #[arg(long = "scenario", value_enum)]
    pub scenarios: Vec<ScenarioName>,
    /// Finished sagas stored before `history-1m` measures.
    #[arg(long, default_value_t = 1_000_000)]
    pub history_sagas: usize,
    /// The definitions folder [default: the repository's sagas/].
    #[arg(long)]
    pub sagas_dir: Option<PathBuf>,
    /// Record a `perf` profile of every process during each measured batch, into DIR
    /// (slows them down: the figures of such a run are not the benchmark's).
    #[arg(long, value_name = "DIR")]
    pub perf: Option<PathBuf>,
    /// Keep the temporary data directory (its path is printed) instead of removing it.
    #[arg(long)]
    pub keep_data: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Durability {
    Strict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScenarioName {
    /// 5,000 order-placement sagas at concurrency 64.
    #[value(name = "c64")]
    C64,
    /// c64 with 10 % of the sagas failing at the rider step (compensation).
    #[value(name = "c64-fail10")]
    C64Fail10,
    /// 300 sagas one after the other: sequential latency.
    #[value(name = "c1")]
    C1,
    /// 10,000 food-delivery sagas parked waiting for `store.accepted`: memory per saga.
    #[value(name = "waiting-10k")]
    Waiting10k,
    /// The parked sagas of waiting-10k across an orchestrator restart: time to resume.
    #[value(name = "restart-10k")]
    Restart10k,
    /// c64 on a store with 1,000,000 finished sagas, against an empty store (on demand).
    #[value(name = "history-1m")]
    History1m,
    /// The parameters of the flags (defaults: 5,000 order-placement sagas at 64, none failing).
    #[value(name = "custom")]
    Custom,
}

impl ScenarioName {
    pub fn as_str(self) -> &'static str {
        match self {
            ScenarioName::C64 => "c64",
            ScenarioName::C64Fail10 => "c64-fail10",
            ScenarioName::C1 => "c1",
            ScenarioName::Waiting10k => "waiting-10k",
            ScenarioName::Restart10k => "restart-10k",
            ScenarioName::History1m => "history-1m",
            ScenarioName::Custom => "custom",
        }
    }
}

/// The scenarios run without `--scenario`.
pub const DEFAULT_SCENARIOS: [ScenarioName; 5] = [
    ScenarioName::C64,
    ScenarioName::C64Fail10,
    ScenarioName::C1,
    ScenarioName::Waiting10k,
    ScenarioName::Restart10k,
];

/// One scenario to run, with its parameters settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    pub name: ScenarioName,
    pub definition: String,
    pub sagas: usize,
    pub concurrency: usize,
    pub fail_pct: u32,
}

impl Args {
    /// The scenarios to run, in order, each once.
    pub fn plan(&self) -> Vec<Scenario> {
        let flags_given = self.sagas.is_some()
            || self.concurrency.is_some()
            || self.fail_pct.is_some()
            || self.definition.is_some();
        let names: Vec<ScenarioName> = if !self.scenarios.is_empty() {
            let mut names = Vec::new();
            for name in &self.scenarios {
                if !names.contains(name) {
                    names.push(*name);
                }
            }
            names
        } else if flags_given {
            vec![ScenarioName::Custom]
        } else {
            DEFAULT_SCENARIOS.to_vec()
        };
        names
            .into_iter()
            .map(|name| {
                let (sagas, concurrency, fail_pct, definition) = match name {
                    ScenarioName::C64 | ScenarioName::Custom | ScenarioName::History1m => {
                        (5_000, 64, 0, ORDER_PLACEMENT)
                    }
                    ScenarioName::C64Fail10 => (5_000, 64, 10, ORDER_PLACEMENT),
                    ScenarioName::C1 => (300, 1, 0, ORDER_PLACEMENT),
                    ScenarioName::Waiting10k | ScenarioName::Restart10k => {
                        (10_000, 64, 0, FOOD_DELIVERY)
                    }
                };
                let parks = matches!(name, ScenarioName::Waiting10k | ScenarioName::Restart10k);
                Scenario {
                    name,
                    sagas: self.sagas.unwrap_or(sagas).max(1),
                    concurrency: self.concurrency.unwrap_or(concurrency).max(1),
                    fail_pct: if parks {
                        0
                    } else {
                        self.fail_pct.unwrap_or(fail_pct)
                    },
                    definition: match (&self.definition, parks) {
                        (Some(definition), false) => definition.clone(),
                        _ => definition.to_owned(),
                    },
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Vec<Scenario> {
        Args::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .unwrap()
            .plan()
    }

    #[test]
    fn no_flags_run_the_default_scenarios() {
        let names: Vec<_> = plan(&[]).iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["c64", "c64-fail10", "c1", "waiting-10k", "restart-10k"]
        );
        let c1 = &plan(&[])[2];
        assert_eq!((c1.sagas, c1.concurrency, c1.fail_pct), (300, 1, 0));
        assert_eq!(plan(&[])[1].fail_pct, 10);
        assert_eq!(plan(&[])[3].definition, FOOD_DELIVERY);
    }

    #[test]
    fn flags_alone_run_one_custom_scenario() {
        let scenarios = plan(&["--sagas", "100", "--concurrency", "8", "--fail-pct", "50"]);
        assert_eq!(
            scenarios,
            [Scenario {
                name: ScenarioName::Custom,
                definition: ORDER_PLACEMENT.into(),
                sagas: 100,
                concurrency: 8,
                fail_pct: 50,
            }]
        );
    }

    #[test]
    fn flags_override_the_named_scenarios_but_parked_ones_keep_their_definition() {
        let scenarios = plan(&[
            "--scenario",
            "c1",
            "--scenario",
            "waiting-10k",
            "--scenario",
            "c1",
            "--sagas",
            "50",
            "--definition",
            "other",
        ]);
        assert_eq!(scenarios.len(), 2);
        assert_eq!((scenarios[0].sagas, scenarios[0].concurrency), (50, 1));
        assert_eq!(scenarios[0].definition, "other");
        assert_eq!(scenarios[1].sagas, 50);
        assert_eq!(scenarios[1].definition, FOOD_DELIVERY);
    }

    #[test]
    fn bad_values_are_refused() {
        let parse = |args: &[&str]| {
            Args::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
        };
        assert!(parse(&["--fail-pct", "101"]).is_err());
        assert!(parse(&["--scenario", "c128"]).is_err());
        assert!(parse(&["--durability", "relaxed"]).is_err());
        assert!(parse(&["--scenario", "history-1m"]).is_ok());
    }
}
