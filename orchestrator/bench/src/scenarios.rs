//! The scenarios: each starts its own cluster on a fresh data directory (so every
//! orchestrator figure, peak RSS included, is that scenario's own), warms it up, measures
//! one batch of sagas, and stops the cluster.
//!
//! What is measured around the batch (warm-up excluded): utime + stime of the orchestrator
//! and of the three participants from `/proc/PID/stat`, the orchestrator's flush count from
//! `/metrics`, its peak RSS (`VmHWM`) and, for parked sagas, its current RSS (`VmRSS`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use proto::saga::v1 as pb;
use serde_json::{Value, json};

use crate::admin;
use crate::cluster::{Binaries, Cluster};
use crate::history;
use crate::load::{self, Client, Feed, Load, Outcome, Until, drive, percentiles};
use crate::procfs::{CpuClock, status_kib};
use crate::profile::Profiler;
use crate::report::{Report, number};

/// The order-placement definition (3 steps: payment, store, rider).
pub const ORDER_PLACEMENT: &str = "order-placement";
/// The food-delivery definition; its sagas park at `store_decision`.
pub const FOOD_DELIVERY: &str = "food-delivery";
/// The business status of a food-delivery saga parked at `store_decision`.
pub const PARKED_STATUS: &str = "waiting for the store";

/// What every scenario shares.
pub struct Bench {
    pub binaries: Binaries,
    /// The run's temporary directory; each scenario has a folder in it.
    pub root: PathBuf,
    pub clock: CpuClock,
    pub profiler: Option<Profiler>,
}

/// A throughput scenario: `sagas` sagas of `definition` at `concurrency`, `fail_pct` %
/// of them failing at the rider step.
#[derive(Debug, Clone)]
pub struct Throughput {
    pub name: String,
    pub definition: String,
    pub sagas: usize,
    pub concurrency: usize,
    pub fail_pct: u32,
}

/// Sagas run before measuring: they open the participants' connections, load the
/// descriptors and warm the allocator, as a process in service has.
fn warmup(concurrency: usize) -> usize {
    (2 * concurrency).max(20)
}

/// Counters read at the start of a measurement.
struct Meter {
    orchestrator: u32,
    orchestrator_cpu: Duration,
    participants: Vec<(u32, Duration)>,
    flushes: Flushes,
    own_cpu: Duration,
    admin: std::net::SocketAddr,
}

/// What a measurement found.
struct Measured {
    orchestrator_cpu: Duration,
    participants_cpu: Duration,
    flushes: Flushes,
    own_cpu: Duration,
    peak_rss_kib: u64,
}

impl Meter {
    async fn start(bench: &Bench, cluster: &Cluster) -> anyhow::Result<Meter> {
        let orchestrator = cluster.orchestrator()?;
        let participants = cluster
            .participant_pids()
            .into_iter()
            .map(|pid| Ok((pid, bench.clock.cpu(pid)?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Meter {
            orchestrator: orchestrator.pid,
            orchestrator_cpu: bench.clock.cpu(orchestrator.pid)?,
            participants,
            flushes: flushes(orchestrator.admin).await?,
            own_cpu: bench.clock.cpu(std::process::id())?,
            admin: orchestrator.admin,
        })
    }

    async fn stop(&self, bench: &Bench) -> anyhow::Result<Measured> {
        let mut participants_cpu = Duration::ZERO;
        for (pid, before) in &self.participants {
            participants_cpu += bench.clock.cpu(*pid)?.saturating_sub(*before);
        }
        Ok(Measured {
            orchestrator_cpu: bench
                .clock
                .cpu(self.orchestrator)?
                .saturating_sub(self.orchestrator_cpu),
            participants_cpu,
            flushes: flushes(self.admin).await?.since(self.flushes),
            own_cpu: bench
                .clock
                .cpu(std::process::id())?
                .saturating_sub(self.own_cpu),
            peak_rss_kib: status_kib(self.orchestrator, "VmHWM")?,
        })
    }
}

/// The orchestrator's flush histogram: how many flushes, and their total duration.
#[derive(Debug, Clone, Copy, Default)]
struct Flushes {
    count: f64,
    seconds: f64,
}

impl Flushes {
    fn since(self, before: Flushes) -> Flushes {
        Flushes {
            count: self.count - before.count,
            seconds: self.seconds - before.seconds,
        }
    }
}

async fn flushes(admin: std::net::SocketAddr) -> anyhow::Result<Flushes> {
    let text = admin::scrape(admin).await?;
    Ok(Flushes {
        count: admin::sample(&text, admin::FLUSHES)
            .with_context(|| format!("no {} in the orchestrator's /metrics", admin::FLUSHES))?,
        seconds: admin::sample(&text, admin::FLUSH_SECONDS).unwrap_or(0.0),
    })
}

async fn waiting_gauge(admin: std::net::SocketAddr) -> anyhow::Result<f64> {
    let text = admin::scrape(admin).await?;
    Ok(admin::sample(&text, admin::WAITING).unwrap_or(0.0))
}

/// The report of a measured batch.
fn report(name: &str, sagas: usize, concurrency: usize, out: &Outcome, m: &Measured) -> Report {
    let n = sagas.max(1) as f64;
    let wall_s = out.wall.as_secs_f64();
    let per_saga_ms = |cpu: Duration| cpu.as_secs_f64() * 1000.0 / n;
    let mut notes = vec![format!(
        "orchestrator + participants {:.3} ms CPU per saga; the load generator (this process) {:.3} ms",
        per_saga_ms(m.orchestrator_cpu + m.participants_cpu),
        per_saga_ms(m.own_cpu)
    )];
    if m.flushes.count > 0.0 {
        notes.push(format!(
            "{} group-commit flushes, {:.2} ms each on average (sled flush + fdatasync)",
            m.flushes.count,
            m.flushes.seconds * 1000.0 / m.flushes.count
        ));
    }
    if let Some(error) = &out.first_error {
        notes.push(format!("first error: {error}"));
    }
    Report {
        scenario: name.to_owned(),
        sagas,
        concurrency,
        completed: out.completed,
        compensated: out.compensated,
        errors: out.errors,
        wall_s,
        sagas_per_s: out.settled() as f64 / wall_s.max(f64::EPSILON),
        latency: percentiles(&out.latencies),
        orchestrator_cpu_ms_per_saga: per_saga_ms(m.orchestrator_cpu),
        participants_cpu_ms_per_saga: per_saga_ms(m.participants_cpu),
        flushes_per_saga: m.flushes.count / n,
        orchestrator_peak_rss_mb: m.peak_rss_kib as f64 / 1024.0,
        extra: Vec::new(),
        notes,
    }
}

/// Runs `f` on a fresh cluster in `root/name` and stops the cluster, also after an error.
async fn with_cluster<T>(
    bench: &Bench,
    name: &str,
    f: impl AsyncFnOnce(&mut Cluster) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut cluster = Cluster::start(&bench.binaries, &bench.root.join(name)).await?;
    let result = f(&mut cluster).await;
    let stopped = cluster.shutdown().await;
    let value = result?;
    stopped?;
    Ok(value)
}

/// Starts profiling the cluster's processes, if asked for.
async fn profile(
    bench: &Bench,
    cluster: &Cluster,
    scenario: &str,
) -> anyhow::Result<Option<crate::profile::Recording>> {
    let Some(profiler) = &bench.profiler else {
        return Ok(None);
    };
    let mut targets = vec![("orchestrator".to_owned(), cluster.orchestrator()?.pid)];
    for participant in &cluster.participants {
        targets.push((participant.kind.to_owned(), participant.pid));
    }
    Ok(Some(profiler.start(scenario, &targets).await?))
}

async fn stop_profile(recording: Option<crate::profile::Recording>) -> anyhow::Result<()> {
    if let Some(recording) = recording {
        for file in recording.stop().await? {
            eprintln!("  profile: {}", file.display());
        }
    }
    Ok(())
}

/// A throughput scenario on a fresh cluster.
pub async fn throughput(bench: &Bench, spec: &Throughput) -> anyhow::Result<Report> {
    with_cluster(bench, &spec.name, async |cluster: &mut Cluster| {
        measure_throughput(bench, cluster, spec, 0).await
    })
    .await
}

/// Warms up and measures `spec` on a running cluster whose change feed has nothing of
/// interest up to `after_cursor`.
async fn measure_throughput(
    bench: &Bench,
    cluster: &Cluster,
    spec: &Throughput,
    after_cursor: u64,
) -> anyhow::Result<Report> {
    let client = cluster.client().await?;
    let feed = Arc::new(Feed::open(&client, after_cursor, Until::Terminal).await?);
    let warm = Load {
        definition: spec.definition.clone(),
        count: warmup(spec.concurrency),
        concurrency: spec.concurrency,
        fail_pct: spec.fail_pct,
        prefix: format!("{}-warmup", spec.name),
    };
    let warmed = drive(&client, &feed, &warm, &Until::Terminal).await;
    if let Some(error) = warmed.first_error {
        bail!("the warm-up failed: {error}");
    }
    let load = Load {
        count: spec.sagas,
        prefix: spec.name.clone(),
        ..warm
    };
    let meter = Meter::start(bench, cluster).await?;
    let recording = profile(bench, cluster, &spec.name).await?;
    let out = drive(&client, &feed, &load, &Until::Terminal).await;
    stop_profile(recording).await?;
    let measured = meter.stop(bench).await?;
    let mut report = report(&spec.name, spec.sagas, spec.concurrency, &out, &measured);
    let expected = (0..spec.sagas)
        .filter(|i| load::fails(*i, spec.fail_pct))
        .count();
    if out.errors == 0 && out.compensated != expected {
        report.notes.push(format!(
            "{} sagas compensated where {expected} were made to fail",
            out.compensated
        ));
    }
    Ok(report)
}

/// A cluster with food-delivery sagas parked at `store_decision`.
pub struct Parked {
    pub cluster: Cluster,
    pub saga_ids: Vec<String>,
    pub concurrency: usize,
}

/// `waiting-10k`: parks `sagas` food-delivery sagas (started at `concurrency`) and reports
/// the orchestrator's RSS growth per parked saga. Returns the cluster, still running, for
/// `restart-10k`.
pub async fn waiting(
    bench: &Bench,
    name: &str,
    sagas: usize,
    concurrency: usize,
) -> anyhow::Result<(Report, Parked)> {
    let cluster = Cluster::start(&bench.binaries, &bench.root.join(name)).await?;
    match park(bench, &cluster, name, sagas, concurrency).await {
        Ok((report, saga_ids)) => Ok((
            report,
            Parked {
                cluster,
                saga_ids,
                concurrency,
            },
        )),
        Err(e) => {
            let _ = cluster.shutdown().await;
            Err(e)
        }
    }
}

async fn park(
    bench: &Bench,
    cluster: &Cluster,
    name: &str,
    sagas: usize,
    concurrency: usize,
) -> anyhow::Result<(Report, Vec<String>)> {
    let client = cluster.client().await?;
    let orchestrator = cluster.orchestrator()?;
    let (pid, admin) = (orchestrator.pid, orchestrator.admin);
    let feed = Arc::new(Feed::open(&client, 0, Until::Parked(PARKED_STATUS.into())).await?);
    // Warm up with sagas that finish, so the baseline has open connections but no saga.
    let warm = Load {
        definition: ORDER_PLACEMENT.into(),
        count: warmup(concurrency),
        concurrency,
        fail_pct: 0,
        prefix: format!("{name}-warmup"),
    };
    let warmed = drive(&client, &feed, &warm, &Until::Terminal).await;
    if let Some(error) = warmed.first_error {
        bail!("the warm-up failed: {error}");
    }
    let rss_before = status_kib(pid, "VmRSS")?;
    let meter = Meter::start(bench, cluster).await?;
    // RSS once the first tenth is parked: growth from there on is per saga only.
    let early = (sagas / 10).max(1);
    let base = feed.settled();
    let monitor_feed = feed.clone();
    let monitor = tokio::spawn(async move {
        // Bounded by the batch's own deadline; aborted when the batch ends.
        loop {
            if monitor_feed.settled() >= base + early {
                return status_kib(pid, "VmRSS").ok();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let load = Load {
        definition: FOOD_DELIVERY.into(),
        count: sagas,
        concurrency,
        fail_pct: 0,
        prefix: name.to_owned(),
    };
    let recording = profile(bench, cluster, name).await?;
    let out = drive(&client, &feed, &load, &Until::Parked(PARKED_STATUS.into())).await;
    stop_profile(recording).await?;
    let measured = meter.stop(bench).await?;
    let rss_after = status_kib(pid, "VmRSS")?;
    monitor.abort();
    let rss_early = monitor.await.ok().flatten();
    let gauge = waiting_gauge(admin).await?;

    let mut report = report(name, sagas, concurrency, &out, &measured);
    report.completed = out.parked;
    let per_saga_kib = rss_after.saturating_sub(rss_before) as f64 / sagas.max(1) as f64;
    report
        .extra
        .push(("rss_kib_per_waiting_saga", number(per_saga_kib, 2)));
    report.notes.push(format!(
        "orchestrator VmRSS {rss_before} KiB after warm-up, {rss_after} KiB with {} parked; \
         WAITING gauge {gauge}",
        out.parked
    ));
    if let Some(early_kib) = rss_early {
        let marginal = rss_after.saturating_sub(early_kib) as f64
            / (sagas.saturating_sub(early).max(1)) as f64;
        report.notes.push(format!(
            "marginal: {marginal:.2} KiB per saga from {early} parked ({early_kib} KiB) to {sagas}"
        ));
    }
    if gauge as usize != out.parked {
        report.errors += out.parked.abs_diff(gauge as usize);
        report.notes.push(format!(
            "the store counts {gauge} WAITING, {} parked were seen",
            out.parked
        ));
    }
    Ok((report, out.saga_ids))
}

/// `restart-10k`: with the sagas of `parked` waiting, stops the orchestrator (SIGTERM: it
/// drains) and starts it again on the same data. `resume_s` runs from the new process's
/// spawn until (1) it serves gRPC, which it does only after recovery gave every unfinished
/// saga a driver again, and (2) the drivers of the newest and of the oldest parked saga
/// have each taken a `store.accepted` signal (SignalSaga answers from the driver, once the
/// signal is durable).
pub async fn restart(bench: &Bench, name: &str, parked: Parked) -> anyhow::Result<Report> {
    let Parked {
        mut cluster,
        saga_ids,
        concurrency,
    } = parked;
    let result = measure_restart(bench, &mut cluster, name, &saga_ids, concurrency).await;
    let stopped = cluster.shutdown().await;
    let report = result?;
    stopped?;
    Ok(report)
}

async fn measure_restart(
    bench: &Bench,
    cluster: &mut Cluster,
    name: &str,
    saga_ids: &[String],
    concurrency: usize,
) -> anyhow::Result<Report> {
    let sagas = saga_ids.len();
    let (Some(newest), Some(oldest)) = (saga_ids.iter().max(), saga_ids.iter().min()) else {
        bail!("no parked saga to resume");
    };
    let before = waiting_gauge(cluster.orchestrator()?.admin).await?;
    let participants_before: Vec<(u32, Duration)> = cluster
        .participant_pids()
        .into_iter()
        .map(|pid| Ok((pid, bench.clock.cpu(pid)?)))
        .collect::<anyhow::Result<_>>()?;
    let own_before = bench.clock.cpu(std::process::id())?;
    let stop_took = cluster.stop_orchestrator().await?;

    let (spawned, serving) = {
        let orchestrator = cluster.start_orchestrator().await?;
        (orchestrator.spawned, orchestrator.serving)
    };
    let client = cluster.client().await?;
    for saga_id in [newest, oldest] {
        signal_accepted(&client, saga_id).await?;
    }
    let resumed = Instant::now();
    let orchestrator = cluster.orchestrator()?;
    let orchestrator_cpu = bench.clock.cpu(orchestrator.pid)?;
    let peak_rss_kib = status_kib(orchestrator.pid, "VmHWM")?;
    let flushes = flushes(orchestrator.admin).await?;
    let after = waiting_gauge(orchestrator.admin).await?;
    let mut participants_cpu = Duration::ZERO;
    for (pid, cpu) in participants_before {
        participants_cpu += bench.clock.cpu(pid)?.saturating_sub(cpu);
    }
    let own_cpu = bench
        .clock
        .cpu(std::process::id())?
        .saturating_sub(own_before);

    let resume = resumed.duration_since(spawned);
    let out = Outcome {
        wall: resume,
        parked: sagas,
        ..Outcome::default()
    };
    let measured = Measured {
        orchestrator_cpu,
        participants_cpu,
        flushes,
        own_cpu,
        peak_rss_kib,
    };
    let mut report = report(name, sagas, concurrency, &out, &measured);
    report.completed = 0;
    report.latency = None;
    report
        .extra
        .push(("resume_s", number(resume.as_secs_f64(), 3)));
    report.notes.push(format!(
        "SIGTERM to exit (drain) {:.3} s; spawn to serving gRPC (store open, definitions, \
         recovery of {before} WAITING sagas) {:.3} s; to both signals answered {:.3} s",
        stop_took.as_secs_f64(),
        serving.duration_since(spawned).as_secs_f64(),
        resume.as_secs_f64()
    ));
    if after != before || before as usize != sagas {
        report.errors += (before as usize).abs_diff(sagas) + (after as usize).abs_diff(sagas);
        report.notes.push(format!(
            "WAITING gauge {before} before the restart, {after} after; {sagas} were parked"
        ));
    }
    Ok(report)
}

/// Sends `store.accepted` to a parked saga; the driver must take it at once.
async fn signal_accepted(client: &Client, saga_id: &str) -> anyhow::Result<()> {
    let payload = orchestrator::convert::json_to_struct(&json!({"eta_minutes": 25}));
    let reply = client
        .clone()
        .signal_saga(pb::SignalSagaRequest {
            saga_id: saga_id.to_owned(),
            signal: "store.accepted".into(),
            payload: Some(payload),
        })
        .await
        .with_context(|| format!("SignalSaga store.accepted to {saga_id} after the restart"))?
        .into_inner();
    if reply.buffered || reply.duplicate || reply.step != "store_decision" {
        bail!("saga {saga_id} did not take store.accepted at store_decision: {reply:?}");
    }
    Ok(())
}

/// `history-1m`: `spec` on an empty store (`history-empty`), then on a store that already
/// holds `history` finished order-placement sagas (`history-1m`).
pub async fn history(
    bench: &Bench,
    spec: &Throughput,
    history: usize,
) -> anyhow::Result<Vec<Report>> {
    let empty_spec = Throughput {
        name: "history-empty".into(),
        ..spec.clone()
    };
    let empty = throughput(bench, &empty_spec).await?;
    eprintln!("  history-empty: {:.0} sagas/s", empty.sagas_per_s);

    let dir = bench.root.join(&spec.name);
    let data = Cluster::orchestrator_data(&dir);
    let filled = Instant::now();
    let last_cursor = history::prefill(&data, &bench.binaries.sagas, history).await?;
    let fill_s = filled.elapsed().as_secs_f64();
    let mut cluster = Cluster::start(&bench.binaries, &dir).await?;
    let start_s = {
        let orchestrator = cluster.orchestrator()?;
        orchestrator
            .serving
            .duration_since(orchestrator.spawned)
            .as_secs_f64()
    };
    let result = measure_throughput(bench, &cluster, spec, last_cursor).await;
    let stopped = cluster.stop_orchestrator().await;
    let _ = cluster.shutdown().await;
    let mut full = result?;
    stopped?;
    let vs_empty = (full.sagas_per_s / empty.sagas_per_s.max(f64::EPSILON) - 1.0) * 100.0;
    full.extra.push(("history_sagas", Value::from(history)));
    full.extra.push(("vs_empty_pct", number(vs_empty, 1)));
    full.notes.push(format!(
        "{history} finished sagas written in {fill_s:.1} s before the orchestrator started; \
         it served after {start_s:.3} s"
    ));
    Ok(vec![empty, full])
}
