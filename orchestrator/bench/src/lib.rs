//! The benchmark of the saga orchestrator, as users run it: `cargo run --release --bin
//! bench`. It starts the orchestrator and the three participants as separate processes (this
//! binary re-executes itself with a hidden `orchestrator` or `participant` subcommand), on
//! loopback, with a fresh data directory on disk, drives sagas through the public gRPC API,
//! and reports throughput, end-to-end latency, CPU per saga, flushes per saga and memory.
//! BENCHMARKS.md at the repository root explains every figure and holds the latest run.
//!
//! - [`cli`]: the command line and the scenarios it selects.
//! - [`cluster`]: the processes (spawn, addresses, SIGTERM by pid).
//! - [`load`]: the load generator: workers that start sagas, and the `WatchSagas` feed
//!   that observes their ends.
//! - [`scenarios`]: what each scenario runs and measures; [`history`] fills a store with
//!   finished sagas for `history-1m`.
//! - [`procfs`], [`admin`]: CPU and memory from `/proc`, flushes from `/metrics`.
//! - [`report`]: the table and the JSON lines; [`profile`]: `--perf`.
//!
//! The criterion micro-benchmarks of the engine are in `benches/engine.rs`
//! (`cargo bench -p bench`).

pub mod admin;
pub mod cli;
pub mod cluster;
pub mod history;
pub mod load;
pub mod procfs;
pub mod profile;
pub mod report;
pub mod scenarios;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cli::{Args, ScenarioName};
use crate::cluster::Binaries;
use crate::report::Report;
use crate::scenarios::{Bench, Parked, Throughput};

/// The repository's definitions folder, as built.
pub fn default_sagas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sagas")
}

/// Runs the selected scenarios and prints their table and JSON lines.
pub fn run(args: Args) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_async(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether every scenario ran without an error.
async fn run_async(args: Args) -> anyhow::Result<bool> {
    let plan = args.plan();
    let sagas = args.sagas_dir.clone().unwrap_or_else(default_sagas_dir);
    let sagas = sagas
        .canonicalize()
        .with_context(|| format!("no definitions folder at {}", sagas.display()))?;
    let temp = tempfile::Builder::new()
        .prefix("saga-bench-")
        .tempdir_in(std::env::temp_dir())
        .context("cannot create a temporary directory")?;
    let bench = Bench {
        binaries: Binaries::current(sagas)?,
        root: temp.path().to_owned(),
        clock: procfs::CpuClock::new(),
        profiler: args
            .perf
            .as_deref()
            .map(profile::Profiler::new)
            .transpose()?,
    };
    let started = Instant::now();
    println!("{}", machine(&bench.root));
    println!(
        "durability: {:?} (every state change flushed and fdatasync'ed before it is acted on)",
        args.durability
    );
    if args.keep_data {
        println!("data: {} (kept)", bench.root.display());
    } else {
        // Not its path: the output is meant to be pasted into notes and files.
        println!("data: a fresh temporary directory, removed at the end");
    }
    println!();

    let mut reports: Vec<Report> = Vec::new();
    let mut ok = true;
    let mut parked: Option<Parked> = None;
    for (index, scenario) in plan.iter().enumerate() {
        let name = scenario.name.as_str();
        eprintln!(
            "running {name}: {} sagas at concurrency {} ...",
            scenario.sagas, scenario.concurrency
        );
        let spec = Throughput {
            name: name.to_owned(),
            definition: scenario.definition.clone(),
            sagas: scenario.sagas,
            concurrency: scenario.concurrency,
            fail_pct: scenario.fail_pct,
        };
        let result: anyhow::Result<Vec<Report>> = match scenario.name {
            ScenarioName::C64
            | ScenarioName::C64Fail10
            | ScenarioName::C1
            | ScenarioName::Custom => scenarios::throughput(&bench, &spec).await.map(|r| vec![r]),
            ScenarioName::History1m => scenarios::history(&bench, &spec, args.history_sagas).await,
            ScenarioName::Waiting10k => {
                match scenarios::waiting(&bench, name, scenario.sagas, scenario.concurrency).await {
                    Ok((report, cluster)) => {
                        // Kept running only if restart-10k comes next.
                        if plan.get(index + 1).map(|s| s.name) == Some(ScenarioName::Restart10k) {
                            parked = Some(cluster);
                        } else {
                            cluster.cluster.shutdown().await?;
                        }
                        Ok(vec![report])
                    }
                    Err(e) => Err(e),
                }
            }
            ScenarioName::Restart10k => {
                let cluster = match parked.take() {
                    Some(cluster) => Ok(cluster),
                    // Run alone: park the sagas first (not reported).
                    None => scenarios::waiting(
                        &bench,
                        "restart-10k-parking",
                        scenario.sagas,
                        scenario.concurrency,
                    )
                    .await
                    .map(|(_, cluster)| cluster),
                };
                match cluster {
                    Ok(cluster) => scenarios::restart(&bench, name, cluster)
                        .await
                        .map(|r| vec![r]),
                    Err(e) => Err(e),
                }
            }
        };
        match result {
            Ok(done) => {
                for report in done {
                    eprintln!("  {}", report.json_line());
                    ok &= report.errors == 0;
                    reports.push(report);
                }
            }
            Err(e) => {
                eprintln!("  {name} failed: {e:#}");
                ok = false;
            }
        }
    }
    if let Some(parked) = parked {
        parked.cluster.shutdown().await?;
    }

    println!("{}", report::table(&reports));
    for report in &reports {
        println!("{}", report.json_line());
    }
    println!();
    let total = started.elapsed();
    println!("total: {:.1} s", total.as_secs_f64());
    if plan.iter().map(|s| s.name).eq(cli::DEFAULT_SCENARIOS) && total > DEFAULT_RUN_BUDGET {
        println!("the default scenarios took longer than {DEFAULT_RUN_BUDGET:?}");
    }
    if args.keep_data {
        let kept = temp.keep();
        println!("data kept in {}", kept.display());
    }
    Ok(ok)
}

/// One line about the machine: cores, CPU model, kernel, date, and what an fdatasync of
/// a small write costs on the disk under the data directory.
fn machine(dir: &Path) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    let fsync = match fsync_cost(dir, 100) {
        Ok(lat) => format!(
            "fdatasync of a 4 KiB write: p50 {:.2} ms, p90 {:.2} ms, max {:.2} ms",
            lat.p50, lat.p90, lat.max
        ),
        Err(e) => format!("fdatasync cost not measured: {e:#}"),
    };
    format!(
        "machine: {cores} cores, {model}, Linux {}; {}\n{fsync}",
        kernel.trim(),
        date.trim()
    )
}

/// Latency of `rounds` 4 KiB writes each followed by `fdatasync`, in a file under `dir`.
pub fn fsync_cost(dir: &Path, rounds: usize) -> anyhow::Result<load::Percentiles> {
    use std::io::{Seek, Write};
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    let mut took = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let started = Instant::now();
        file.seek(std::io::SeekFrom::Start((i * block.len()) as u64))?;
        file.write_all(&block)?;
        file.sync_data()?;
        took.push(started.elapsed());
    }
    drop(file);
    std::fs::remove_file(&path)?;
    load::percentiles(&took).context("no rounds")
}

/// How long a run of the default scenarios may take (issue 9's acceptance).
pub const DEFAULT_RUN_BUDGET: Duration = Duration::from_secs(180);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fsync_probe_measures_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let lat = fsync_cost(dir.path(), 5).unwrap();
        assert!(lat.p50 > 0.0 && lat.max >= lat.p50);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn the_definitions_folder_is_found() {
        assert!(default_sagas_dir().join("order-placement.yaml").is_file());
        assert!(default_sagas_dir().join("food-delivery.yaml").is_file());
    }
}
