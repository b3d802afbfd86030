//! The chaos harness: the engine's rules (DESIGN.md section 3) checked under crashes,
//! network faults and participant failures, from a seed.
//!
//! # Running it
//!
//! ```sh
//! # three minutes of faults (the defaults): 3000 sagas, 20 orchestrator kills, 5
//! # participant kills, a 30 s payment outage, 5 % latency / 2 % reset / 1 % blackhole
//! cargo run --release -p tests --bin chaos -- --duration 3m --seed 42
//! # a short round
//! cargo run --release -p tests --bin chaos -- --duration 30s --sagas 500 --orchestrator-kills 5 \
//!     --participant-kills 2 --payment-outage 5s --fault-window 3s
//! # replay a run: the report prints the command, with every setting and the seed
//! cargo run --release -p tests --bin chaos -- --seed 42 ...
//! # a deliberately broken orchestrator (one compensation skipped): the run must FAIL
//! cargo run --release -p tests --bin chaos -- --duration 10s --sagas 100 \
//!     --failpoints 'runtime::skip_compensation=1*return'
//! ```
//!
//! `chaos --help` lists every knob. Exit status: 0 when the run holds every rule and
//! showed what it was asked to (the payment breaker opening), 1 on any invariant
//! violation, 3 when the run could not show everything (e.g. the breaker never opened) or
//! the harness failed, 2 on bad flags. Data and logs (`logs/` holds each process's stderr,
//! one file per start) are kept when the run does not pass, or always with `--keep DIR`.
//!
//! # What a run does
//!
//! 1. Starts the three participants (`chaos-participant payment|store|rider
//!    --allow-fault-injection`, each on a fixed loopback port with its own data), a
//!    fault-injecting HTTP/2 proxy in front of each ([`proxy`]), and the orchestrator
//!    (`crashable-orchestrator serve`, failpoints compiled in) pointed at the proxies; both
//!    binaries are found next to the `chaos` binary (under `cargo run`, which builds only
//!    `chaos`, they are built first, with the same profile) or named by
//!    `--orchestrator-bin` and `--participant-bin`.
//! 2. Drives load through the public gRPC API ([`load`]): `--sagas` order-placement sagas
//!    with mixed inputs (success, store failure, rider failure), spread over `--duration`,
//!    `--concurrency` clients, each key retried until acknowledged.
//! 3. Injects faults on a schedule drawn from the seed ([`schedule`]): orchestrator
//!    `kill -9` (restart on the same data) and SIGSTOP pauses; participant `kill -9`
//!    (restart on the same port and data); windows of random participant faults (transient
//!    UNAVAILABLE, latency spikes, hangs past the deadline, lost replies); a payment outage
//!    long enough to open the payment circuit breaker (watched through
//!    `ListCircuitBreakers`); proxy partitions; and, all run long, the proxies' latency,
//!    resets after forwarding, blackholes, refused connections and duplicate deliveries.
//! 4. Heals everything (processes up, faults off, blackholed requests released) and
//!    measures, per saga open at the heal, the time until it is terminal.
//! 5. Checks, from the participants' ledgers (`ListLedger`), the orchestrator's event log
//!    (`GetSaga`, `WatchSaga`), the offline replay of its data directory
//!    (`orchestrator::check::check_dir`, after stopping it) and the clients' record of
//!    acknowledgements, that:
//!    - no acknowledged saga is lost, and its key still names it (`created = false`);
//!    - every saga is terminal, within `--terminal-within` of the heal;
//!    - no idempotency key has two effects;
//!    - COMPLETED: every forward effect stands;
//!    - COMPENSATED: every attempted step is compensated, every effect undone, in reverse
//!      order, and every compensation the log records reached its participant;
//!    - no forward effect was applied after its compensation;
//!    - FAILED (and COMPENSATED) carry a recorded reason;
//!    - the replay agrees with what the orchestrator stored.
//!
//!    Each violation names its saga and what is wrong.
//!
//! A seed fixes the schedule (which fault, where, when) and the sequence of every random
//! draw (the proxies', the participants', the clients'); which request meets which draw
//! still depends on timing, so a replay reproduces the run's faults, not its exact
//! interleaving.

pub mod cluster;
pub mod config;
pub mod load;
pub mod proxy;
pub mod report;
pub mod schedule;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use participants::Kind;
use proto::saga::v1 as pb;
use proto::saga::v1::saga_orchestrator_client::SagaOrchestratorClient;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

pub use config::Config;
pub use report::Report;

use crate::invariants::{self, SagaRecord, Violation};
use cluster::{OrchestratorNode, ParticipantProcess};
use orchestrator::cli::sagactl::status_name;
use proxy::{Proxy, ProxyStats};
use report::{BreakerSeen, HealTimes};
use schedule::{Action, Planned, Schedule};

/// Calls made while collecting the results, at once.
const COLLECT_CONCURRENCY: usize = 16;

/// The binaries a run starts.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub orchestrator: PathBuf,
    pub participant: PathBuf,
}

impl Binaries {
    /// From the flags, else next to the running program (where cargo puts every binary of
    /// the crate). Under `cargo run` (which builds only the `chaos` binary), those are
    /// built first with the same profile, so that a run never uses stale ones.
    pub fn find(config: &Config) -> anyhow::Result<Binaries> {
        let dir = std::env::current_exe()
            .context("cannot find the running program")?
            .parent()
            .map(PathBuf::from)
            .context("the running program has no directory")?;
        if config.orchestrator_bin.is_none() || config.participant_bin.is_none() {
            build_siblings_under_cargo_run(&dir)?;
        }
        // A test binary lives in target/<profile>/deps, the binaries one level up.
        let sibling = |name: &str| -> PathBuf {
            let here = dir.join(name);
            if here.exists() {
                return here;
            }
            dir.parent().map_or(here.clone(), |up| {
                let there = up.join(name);
                if there.exists() { there } else { here }
            })
        };
        let binaries = Binaries {
            orchestrator: config
                .orchestrator_bin
                .clone()
                .unwrap_or_else(|| sibling("crashable-orchestrator")),
            participant: config
                .participant_bin
                .clone()
                .unwrap_or_else(|| sibling("chaos-participant")),
        };
        for path in [&binaries.orchestrator, &binaries.participant] {
            anyhow::ensure!(
                path.exists(),
                "{} does not exist: build the tests crate's binaries (cargo build -p tests --bins), or name them with --orchestrator-bin / --participant-bin",
                path.display()
            );
        }
        Ok(binaries)
    }
}

/// `cargo run` sets CARGO and CARGO_MANIFEST_PATH, and builds only the binary it runs: build
/// the crate's other binaries (the orchestrator and the participant) with the same profile
/// (the name of the folder the program is in).
fn build_siblings_under_cargo_run(dir: &std::path::Path) -> anyhow::Result<()> {
    let (Some(cargo), Some(manifest)) = (
        std::env::var_os("CARGO"),
        std::env::var_os("CARGO_MANIFEST_PATH"),
    ) else {
        return Ok(());
    };
    if std::env::var("CARGO_PKG_NAME").as_deref() != Ok("tests") {
        return Ok(());
    }
    let mut command = std::process::Command::new(cargo);
    command
        .arg("build")
        .arg("--manifest-path")
        .arg(manifest)
        .args([
            "-p",
            "tests",
            "--bin",
            "crashable-orchestrator",
            "--bin",
            "chaos-participant",
        ]);
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            command.arg("--release");
        }
        Some(profile) => {
            command.args(["--profile", profile]);
        }
    }
    let status = command
        .status()
        .context("build the orchestrator and participant binaries")?;
    anyhow::ensure!(
        status.success(),
        "building the orchestrator and participant binaries failed ({status})"
    );
    Ok(())
}

fn index(kind: Kind) -> usize {
    Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0)
}

/// What was done, by kind.
#[derive(Debug, Default)]
struct Counts {
    orchestrator_kills: AtomicUsize,
    orchestrator_pauses: AtomicUsize,
    participant_kills: [AtomicUsize; 3],
    windows: [AtomicUsize; 3],
}

/// The running system and what the schedule did to it.
struct Chaos {
    orchestrator: Mutex<OrchestratorNode>,
    participants: Vec<Mutex<ParticipantProcess>>,
    proxies: Vec<Proxy>,
    window_faults: serde_json::Value,
    start: Instant,
    verbose: bool,
    counts: Counts,
    /// The payment outage's start and end, once they happened (a std mutex, never held
    /// across an await).
    outage: std::sync::Mutex<(Option<Instant>, Option<Instant>)>,
}

impl Chaos {
    fn say(&self, what: impl std::fmt::Display) {
        if self.verbose {
            eprintln!(
                "[chaos +{:>7.2}s] {what}",
                self.start.elapsed().as_secs_f64()
            );
        }
    }

    fn participant(&self, kind: Kind) -> &Mutex<ParticipantProcess> {
        &self.participants[index(kind)]
    }

    fn proxy(&self, kind: Kind) -> &Proxy {
        &self.proxies[index(kind)]
    }

    /// Waits `length`, or less if the run is being healed.
    async fn hold(length: Duration, cancel: &CancellationToken) {
        tokio::select! {
            () = tokio::time::sleep(length) => {}
            () = cancel.cancelled() => {}
        }
    }

    async fn apply(&self, action: &Action, cancel: &CancellationToken) -> anyhow::Result<()> {
        match action {
            Action::KillOrchestrator { down } => {
                let mut node = self.orchestrator.lock().await;
                node.kill().await?;
                self.counts
                    .orchestrator_kills
                    .fetch_add(1, Ordering::Relaxed);
                // The downtime is part of the fault, drawn with it.
                tokio::time::sleep(*down).await;
                node.start().await.context("restart the orchestrator")?;
                self.say("orchestrator back");
            }
            Action::PauseOrchestrator { pause } => {
                let mut node = self.orchestrator.lock().await;
                if node.is_running() {
                    node.pause(*pause).await?;
                    self.counts
                        .orchestrator_pauses
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            Action::KillParticipant { kind, down } => {
                let mut participant = self.participant(*kind).lock().await;
                participant.kill().await?;
                self.counts.participant_kills[index(*kind)].fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(*down).await;
                participant
                    .start()
                    .await
                    .with_context(|| format!("restart {kind}"))?;
                self.say(format!("{kind} back"));
            }
            Action::FaultWindow { kind, length } => {
                self.participant(*kind)
                    .lock()
                    .await
                    .set_window(Some(self.window_faults.clone()))
                    .await?;
                self.counts.windows[index(*kind)].fetch_add(1, Ordering::Relaxed);
                Chaos::hold(*length, cancel).await;
                self.participant(*kind)
                    .lock()
                    .await
                    .set_window(None)
                    .await?;
                self.say(format!("{kind}'s random faults over"));
            }
            Action::PaymentOutage { length } => {
                self.participant(Kind::Payment)
                    .lock()
                    .await
                    .set_outage(true)
                    .await?;
                self.set_outage(true);
                Chaos::hold(*length, cancel).await;
                self.participant(Kind::Payment)
                    .lock()
                    .await
                    .set_outage(false)
                    .await?;
                self.set_outage(false);
                self.say("payment outage over");
            }
            Action::Partition { kind, length } => {
                self.proxy(*kind).partition(true);
                Chaos::hold(*length, cancel).await;
                self.proxy(*kind).partition(false);
                self.say(format!("{kind}'s partition over"));
            }
        }
        Ok(())
    }

    fn set_outage(&self, on: bool) {
        let mut outage = self
            .outage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if on {
            outage.0 = Some(Instant::now());
        } else {
            outage.1 = Some(Instant::now());
        }
    }

    /// Runs one track of the schedule until its end or the heal.
    async fn run_track(
        self: Arc<Self>,
        track: Vec<Planned>,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        for planned in track {
            // The fault's moment in the schedule, not a wait for a condition.
            tokio::select! {
                () = tokio::time::sleep_until(self.start + planned.at) => {}
                () = cancel.cancelled() => return Ok(()),
            }
            self.say(&planned.action);
            self.apply(&planned.action, &cancel)
                .await
                .with_context(|| format!("{}", planned.action))?;
        }
        Ok(())
    }

    /// Everything back: faults off, blackholes released, every process up.
    async fn heal(&self) -> anyhow::Result<()> {
        for proxy in &self.proxies {
            proxy.heal();
        }
        for participant in &self.participants {
            participant.lock().await.heal().await?;
        }
        let mut node = self.orchestrator.lock().await;
        node.start().await?;
        if let Some(process) = &node.process {
            // A pause always ends with SIGCONT; once more costs nothing.
            let _ = process.signal("CONT");
        }
        Ok(())
    }
}

/// A lazily connected client of the orchestrator's fixed address: it reconnects by itself
/// after a restart.
fn client(url: &str) -> anyhow::Result<SagaOrchestratorClient<Channel>> {
    let channel = Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    Ok(SagaOrchestratorClient::new(channel).max_decoding_message_size(usize::MAX))
}

/// The payment breaker's state changes, as `ListCircuitBreakers` showed them.
async fn watch_breaker(
    mut client: SagaOrchestratorClient<Channel>,
    stop: CancellationToken,
) -> Vec<(Instant, String, u32)> {
    let mut seen: Vec<(Instant, String, u32)> = Vec::new();
    while !stop.is_cancelled() {
        if let Ok(answer) = client
            .list_circuit_breakers(pb::ListCircuitBreakersRequest {})
            .await
            && let Some(b) = answer
                .into_inner()
                .breakers
                .into_iter()
                .find(|b| b.participant == "payment")
            && seen
                .last()
                .is_none_or(|(_, state, openings)| *state != b.state || *openings != b.openings)
        {
            seen.push((Instant::now(), b.state, b.openings));
        }
        // A sampling period, not a wait for a condition.
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = stop.cancelled() => {}
        }
    }
    seen
}

const OPEN_STATUSES: [pb::SagaStatus; 3] = [
    pb::SagaStatus::Running,
    pb::SagaStatus::Waiting,
    pb::SagaStatus::Compensating,
];

/// Every saga of `status` (every saga when unspecified), through ListSagas' pages.
async fn list_sagas(
    client: &mut SagaOrchestratorClient<Channel>,
    status: pb::SagaStatus,
) -> Result<Vec<pb::SagaSummary>, tonic::Status> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    // Bounded: a page holds up to 1000 sagas.
    for _ in 0..100_000 {
        let page = client
            .list_sagas(pb::ListSagasRequest {
                status: status as i32,
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(page.sagas);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(out)
}

/// Polls the not-terminal sagas from the heal on, until there are none (and the load is
/// over) or `deadline`; returns, per saga seen open, the time from `heal` until it was seen
/// terminal, and the sagas still open.
async fn settle(
    client: &mut SagaOrchestratorClient<Channel>,
    heal: Instant,
    deadline: Instant,
    load_done: impl Fn() -> bool,
) -> (HashMap<String, Duration>, BTreeMap<String, String>) {
    let mut terminal_after: HashMap<String, Duration> = HashMap::new();
    let mut open: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let mut now_open: BTreeMap<String, String> = BTreeMap::new();
        let mut complete = true;
        for status in OPEN_STATUSES {
            match list_sagas(client, status).await {
                Ok(sagas) => now_open.extend(
                    sagas
                        .into_iter()
                        .map(|s| (s.saga_id, status_name(s.status).to_owned())),
                ),
                Err(_) => complete = false,
            }
        }
        if complete {
            let seen = heal.elapsed();
            for id in open.keys() {
                if !now_open.contains_key(id) {
                    terminal_after.insert(id.clone(), seen);
                }
            }
            open = now_open;
            if open.is_empty() && load_done() {
                return (terminal_after, open);
            }
        }
        if Instant::now() > deadline {
            return (terminal_after, open);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The state and whole log of a saga; the log only for a terminal one (WatchSaga ends at
/// a terminal status).
async fn record(
    mut client: SagaOrchestratorClient<Channel>,
    saga_id: String,
) -> Result<SagaRecord, tonic::Status> {
    let saga = client
        .get_saga(pb::GetSagaRequest {
            saga_id: saga_id.clone(),
        })
        .await?
        .into_inner();
    let mut events = Vec::new();
    if !OPEN_STATUSES.iter().any(|s| *s as i32 == saga.status) {
        let watched = tokio::time::timeout(Duration::from_secs(30), async {
            let mut stream = client
                .watch_saga(pb::WatchSagaRequest { saga_id })
                .await?
                .into_inner();
            while let Some(event) = stream.message().await? {
                events.push(event);
            }
            Ok::<_, tonic::Status>(())
        })
        .await;
        match watched {
            Ok(result) => result?,
            Err(_) => return Err(tonic::Status::deadline_exceeded("WatchSaga did not end")),
        }
    }
    Ok(SagaRecord { saga, events })
}

/// The saga id a line of `orchestrator check` names (`saga ID: ...`), if any.
fn replay_violation(problem: &str) -> Violation {
    match problem
        .strip_prefix("saga ")
        .and_then(|rest| rest.split_once(':'))
    {
        Some((id, what)) => Violation::saga(id, format!("offline replay: {}", what.trim())),
        None => Violation::global(format!("offline replay: {problem}")),
    }
}

/// Runs one chaos round (see the module docs) and returns its report. An `Err` means the
/// harness could not run at all (a binary missing, a process that would not start).
pub async fn run(config: Config) -> anyhow::Result<Report> {
    let seed = config.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(7, |d| d.as_nanos() as u64)
    });
    let binaries = Binaries::find(&config)?;
    let begun = Instant::now();
    let sagas_dir = config.sagas_dir.clone().unwrap_or_else(crate::sagas_dir);
    // A temporary directory is removed at the end of a clean run only: a run that fails,
    // or a harness that stops on an error, leaves its data and logs to look at.
    let (work, remove_at_end) = match &config.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            (dir.clone(), false)
        }
        None => (
            tempfile::Builder::new().prefix("chaos-").tempdir()?.keep(),
            true,
        ),
    };
    run_in(
        config,
        seed,
        begun,
        binaries,
        sagas_dir,
        &work,
        remove_at_end,
    )
    .await
    .with_context(|| format!("data and logs kept in {}", work.display()))
}

async fn run_in(
    config: Config,
    seed: u64,
    begun: Instant,
    binaries: Binaries,
    sagas_dir: PathBuf,
    work: &std::path::Path,
    remove_at_end: bool,
) -> anyhow::Result<Report> {
    let work = work.to_owned();
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut report = Report {
        seed,
        replay: config.replay_command(seed),
        planned: config.sagas,
        ..Report::default()
    };
    if config.verbose {
        eprintln!("[chaos] seed {seed}; data and logs in {}", work.display());
    }

    // The system: participants, their proxies, the orchestrator.
    let mut participants = Vec::new();
    for kind in Kind::ALL {
        let mut participant = ParticipantProcess::new(
            kind,
            &binaries.participant,
            work.join(kind.as_str()),
            &logs,
            &config.child_log,
            seed ^ (0x7061_0000 + index(kind) as u64),
        )?;
        participant
            .start()
            .await
            .with_context(|| format!("start {kind}"))?;
        participants.push(participant);
    }
    let mut proxies = Vec::new();
    for participant in &participants {
        let seed = seed ^ (0x7072_0000 + index(participant.kind) as u64);
        proxies.push(
            Proxy::start(
                participant.kind.as_str(),
                participant.addr,
                config.proxy_faults(),
                seed,
            )
            .await?,
        );
    }
    let spawn = crate::process::Spawn {
        binary: binaries.orchestrator.clone(),
        data: work.join("orchestrator"),
        sagas: sagas_dir,
        listen: cluster::free_addr()?,
        admin_listen: cluster::free_addr()?,
        participants: proxies.iter().map(|p| (p.name.clone(), p.url())).collect(),
        failpoints: config.failpoints.clone(),
        log: logs.join("orchestrator.log"),
        log_filter: config.child_log.clone(),
    };
    let mut node = OrchestratorNode::new(spawn, &logs);
    node.start().await.context("start the orchestrator")?;
    let url = node.url();
    let data = node.data().to_owned();

    let schedule = Schedule::plan(&config, seed);
    let chaos = Arc::new(Chaos {
        orchestrator: Mutex::new(node),
        participants: participants.into_iter().map(Mutex::new).collect(),
        proxies,
        window_faults: config.window_faults(),
        start: Instant::now(),
        verbose: config.verbose,
        counts: Counts::default(),
        outage: std::sync::Mutex::new((None, None)),
    });

    // Load, the breaker's watch, the schedule.
    let progress = Arc::new(load::Progress::default());
    let give_up = Arc::new(load::GiveUp::default());
    let load = tokio::spawn(load::run(
        client(&url)?,
        config.sagas,
        config.concurrency,
        config.duration,
        seed,
        give_up.clone(),
        progress.clone(),
    ));
    let stop_watching = CancellationToken::new();
    let breaker_watch = tokio::spawn(watch_breaker(client(&url)?, stop_watching.clone()));
    let heal_now = CancellationToken::new();
    let mut tracks = tokio::task::JoinSet::new();
    for track in schedule.tracks.clone() {
        tracks.spawn(chaos.clone().run_track(track, heal_now.clone()));
    }
    let ticker = config.verbose.then(|| {
        let (chaos, progress, stop) = (chaos.clone(), progress.clone(), stop_watching.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    () = stop.cancelled() => {}
                }
                chaos.say(format!(
                    "{} started, {} acknowledged, {} StartSaga calls retried",
                    progress.started.load(Ordering::Relaxed),
                    progress.acknowledged.load(Ordering::Relaxed),
                    progress.retried_calls.load(Ordering::Relaxed)
                ));
            }
        })
    });

    // The run's fault time, then the heal.
    tokio::time::sleep_until(chaos.start + config.duration).await;
    heal_now.cancel();
    while let Some(result) = tracks.join_next().await {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => report.unmet.push(format!("the schedule failed: {e:#}")),
            Err(e) => report.unmet.push(format!("a schedule track panicked: {e}")),
        }
    }
    chaos.heal().await.context("heal")?;
    let heal = Instant::now();
    report.fault_time = heal - chaos.start;
    chaos.say("healed");
    give_up.set(heal + config.settle_timeout);

    // Every saga terminal?
    let mut orchestrator = client(&url)?;
    let (terminal_after, still_open) = settle(
        &mut orchestrator,
        heal,
        heal + config.settle_timeout,
        || load.is_finished(),
    )
    .await;
    let outcome = load.await.context("the load panicked")?;
    chaos.say("settled");
    stop_watching.cancel();
    let breaker_seen = breaker_watch.await.unwrap_or_default();
    if let Some(ticker) = ticker {
        let _ = ticker.await;
    }

    // Collect: sagas, their logs, the acknowledgements again, the ledgers.
    let summaries = list_sagas(&mut orchestrator, pb::SagaStatus::Unspecified)
        .await
        .context("list the sagas")?;
    let mut ids: BTreeSet<String> = summaries.iter().map(|s| s.saga_id.clone()).collect();
    ids.extend(outcome.acks.iter().map(|a| a.saga_id.clone()));
    let mut records = Vec::new();
    let mut violations = Vec::new();
    let fetched: Vec<(String, Result<SagaRecord, tonic::Status>)> =
        futures::stream::iter(ids.iter().cloned())
            .map(|id| {
                let client = orchestrator.clone();
                async move { (id.clone(), record(client, id).await) }
            })
            .buffer_unordered(COLLECT_CONCURRENCY)
            .collect()
            .await;
    for (id, fetched) in fetched {
        match fetched {
            Ok(record) => records.push(record),
            Err(status) if status.code() == tonic::Code::NotFound => {
                violations.push(Violation::saga(
                    &id,
                    "acknowledged by StartSaga, but lost: GetSaga answers NOT_FOUND",
                ));
            }
            Err(status) => {
                violations.push(Violation::saga(
                    &id,
                    format!("cannot be read: {:?}: {}", status.code(), status.message()),
                ));
            }
        }
    }
    records.sort_by(|a, b| a.saga.saga_id.cmp(&b.saga.saga_id));
    let again: Vec<(load::Ack, Result<pb::StartSagaResponse, tonic::Status>)> =
        futures::stream::iter(outcome.acks.iter().cloned())
            .map(|ack| {
                let mut client = orchestrator.clone();
                async move {
                    let answer = crate::process::start_saga(
                        &mut client,
                        &crate::mixed_input(ack.index),
                        &ack.key,
                    )
                    .await;
                    (ack, answer)
                }
            })
            .buffer_unordered(COLLECT_CONCURRENCY)
            .collect()
            .await;
    for (ack, answer) in again {
        match answer {
            Ok(answer) if answer.saga_id == ack.saga_id && !answer.created => {}
            Ok(answer) => violations.push(Violation::saga(
                &ack.saga_id,
                format!(
                    "its key {} now names saga {} (created: {}): the same key gave two sagas",
                    ack.key, answer.saga_id, answer.created
                ),
            )),
            Err(status) => violations.push(Violation::saga(
                &ack.saga_id,
                format!(
                    "StartSaga with its key {} again fails: {:?}: {}",
                    ack.key,
                    status.code(),
                    status.message()
                ),
            )),
        }
    }
    for missing in &outcome.not_acknowledged {
        violations.push(Violation::global(format!(
            "key {} was never acknowledged ({}): {}",
            missing.key,
            if missing.refused {
                "refused"
            } else {
                "still failing when the load gave up after the heal"
            },
            missing.error
        )));
    }
    // Late duplicates still on their way would land after the ledgers are read.
    let quiet = Instant::now() + Duration::from_secs(15);
    while chaos.proxies.iter().any(|p| p.in_flight_duplicates() > 0) && Instant::now() < quiet {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ledgers = BTreeMap::new();
    for participant in &chaos.participants {
        let participant = participant.lock().await;
        let entries = invariants::ledger_at(participant.kind, participant.addr)
            .await
            .with_context(|| format!("read the {} ledger", participant.kind))?;
        ledgers.insert(participant.kind.to_string(), entries);
    }

    // The offline replay, on the stopped orchestrator's data.
    chaos
        .orchestrator
        .lock()
        .await
        .stop(Duration::from_secs(15))
        .await?;
    match tokio::task::spawn_blocking(move || orchestrator::check::check_dir(&data)).await? {
        Ok(replay) => {
            report.replayed = replay.sagas;
            violations.extend(replay.problems.iter().map(|p| replay_violation(p)));
        }
        Err(e) => violations.push(Violation::global(format!(
            "offline replay: cannot open the orchestrator's data: {e}"
        ))),
    }
    for participant in &chaos.participants {
        participant.lock().await.stop().await?;
    }

    // The rules.
    let (figures, found) = invariants::check_sagas(&ledgers, &records);
    violations.extend(found);
    let bound = config.terminal_within;
    let mut late: Vec<(&String, &Duration)> =
        terminal_after.iter().filter(|(_, t)| **t > bound).collect();
    late.sort();
    for (id, after) in late {
        violations.push(Violation::saga(
            id,
            format!(
                "terminal only {:.2}s after the heal (bound {:.0}s)",
                after.as_secs_f64(),
                bound.as_secs_f64()
            ),
        ));
    }
    for (id, status) in &still_open {
        if !records.iter().any(|r| &r.saga.saga_id == id) {
            violations.push(Violation::saga(
                id,
                format!("still {status} when the wait after the heal ended"),
            ));
        }
    }

    // The report.
    report.started = progress.started.load(Ordering::Relaxed);
    report.acknowledged = outcome.acks.len();
    report.not_acknowledged = outcome.not_acknowledged.len();
    report.retried_calls = outcome.retried_calls;
    report.in_store = summaries.len();
    report.completed = figures.completed;
    report.compensated = figures.compensated;
    report.failed = figures.failed;
    report.not_terminal = records.len() - figures.completed - figures.compensated - figures.failed;
    report.figures = figures;
    report.reasons = reasons(&records);
    report.deferred_sagas = records
        .iter()
        .filter(|r| r.events.iter().any(|e| e.kind == "step_deferred"))
        .count();
    report.heal = HealTimes::from_times(
        terminal_after.values().copied().collect(),
        terminal_after.len() + still_open.len(),
        bound,
    );
    let counts = &chaos.counts;
    report.orchestrator_kills = counts.orchestrator_kills.load(Ordering::Relaxed);
    report.participant_kills = counts
        .participant_kills
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum();
    report.faults = fault_table(&chaos, &schedule, &config);
    let (outage_start, outage_end) = *chaos
        .outage
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !config.payment_outage.is_zero() {
        let seen = breaker(
            &breaker_seen,
            outage_start,
            outage_end,
            config.payment_outage,
        );
        if seen.opened_after.is_none() {
            report.unmet.push(format!(
                "the payment circuit breaker was never seen open during the {:.0}s payment outage",
                config.payment_outage.as_secs_f64()
            ));
        }
        report.breaker = Some(seen);
    }
    let planned_kills = schedule.count(|a| matches!(a, Action::KillOrchestrator { .. }));
    if report.orchestrator_kills < planned_kills {
        report.unmet.push(format!(
            "only {} of the {planned_kills} orchestrator kills happened before the heal",
            report.orchestrator_kills
        ));
    }
    let planned_kills = schedule.count(|a| matches!(a, Action::KillParticipant { .. }));
    if report.participant_kills < planned_kills {
        report.unmet.push(format!(
            "only {} of the {planned_kills} participant kills happened before the heal",
            report.participant_kills
        ));
    }
    violations.sort();
    violations.dedup();
    report.violations = violations;
    report.total_time = begun.elapsed();
    if report.is_clean() && remove_at_end {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        let lines: Vec<String> = report.violations.iter().map(ToString::to_string).collect();
        let _ = std::fs::write(work.join("violations.txt"), lines.join("\n"));
        report.kept = Some(work);
    }
    Ok(report)
}

/// The most frequent reasons of COMPENSATED and FAILED sagas (the saga-specific parts of a
/// reason, such as an order id, are few: the reasons group well as they are).
fn reasons(records: &[SagaRecord]) -> Vec<(String, String, usize)> {
    const SHOWN: usize = 6;
    let mut out = Vec::new();
    for status in ["COMPENSATED", "FAILED"] {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for record in records.iter().filter(|r| crate::status(&r.saga) == status) {
            let reason: String = record.saga.reason.chars().take(160).collect();
            *counts.entry(reason).or_default() += 1;
        }
        let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let others: usize = counts.iter().skip(SHOWN).map(|(_, n)| n).sum();
        out.extend(
            counts
                .into_iter()
                .take(SHOWN)
                .map(|(reason, n)| (status.to_owned(), reason, n)),
        );
        if others > 0 {
            out.push((status.to_owned(), "(other reasons)".to_owned(), others));
        }
    }
    out
}

/// The faults injected, by kind, with their detail.
fn fault_table(chaos: &Chaos, schedule: &Schedule, config: &Config) -> Vec<(String, u64, String)> {
    let counts = &chaos.counts;
    let per_kind = |counters: &[AtomicUsize; 3]| -> String {
        Kind::ALL
            .iter()
            .map(|k| format!("{k} {}", counters[index(*k)].load(Ordering::Relaxed)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let sum = |counters: &[AtomicUsize; 3]| -> u64 {
        counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed) as u64)
            .sum()
    };
    let stats: Vec<(Kind, ProxyStats)> = Kind::ALL
        .iter()
        .map(|k| (*k, chaos.proxy(*k).stats()))
        .collect();
    let mut total = ProxyStats::default();
    for (_, s) in &stats {
        total += *s;
    }
    let proxy_detail = |pick: fn(&ProxyStats) -> u64| -> String {
        stats
            .iter()
            .map(|(k, s)| format!("{k} {}", pick(s)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let outage = schedule.count(|a| matches!(a, Action::PaymentOutage { .. }));
    vec![
        (
            "orchestrator kill -9 (restart on the same data)".into(),
            counts.orchestrator_kills.load(Ordering::Relaxed) as u64,
            String::new(),
        ),
        (
            "orchestrator SIGSTOP/SIGCONT pause".into(),
            counts.orchestrator_pauses.load(Ordering::Relaxed) as u64,
            format!("up to {}", config::format_duration(config.pause_max)),
        ),
        (
            "participant kill -9 (restart on the same data)".into(),
            sum(&counts.participant_kills),
            per_kind(&counts.participant_kills),
        ),
        (
            "participant random-fault windows".into(),
            sum(&counts.windows),
            format!(
                "{} of {} each: unavailable {}, slow {} ({}), hang {} ({}), lost reply {}",
                per_kind(&counts.windows),
                config::format_duration(config.fault_window),
                config.unavailable,
                config.slow,
                config::format_duration(config.slow_time),
                config.hang,
                config::format_duration(config.hang_time),
                config.lose_reply
            ),
        ),
        (
            "payment outage (every payment call UNAVAILABLE)".into(),
            outage as u64,
            if outage > 0 {
                config::format_duration(config.payment_outage)
            } else {
                String::new()
            },
        ),
        (
            "participant answers UNAVAILABLE (injected, lost replies, outage)".into(),
            total.upstream_unavailable,
            proxy_detail(|s| s.upstream_unavailable),
        ),
        (
            "proxy: added latency".into(),
            total.latency,
            format!(
                "{}; up to {}",
                proxy_detail(|s| s.latency),
                config::format_duration(config.latency_max)
            ),
        ),
        (
            "proxy: reset after forwarding".into(),
            total.reset,
            format!(
                "{}; RST_STREAM {}",
                proxy_detail(|s| s.reset),
                config.reset_kind.as_str()
            ),
        ),
        (
            "proxy: blackhole until the heal".into(),
            total.blackhole,
            proxy_detail(|s| s.blackhole),
        ),
        (
            "proxy: connection refused".into(),
            total.refused,
            proxy_detail(|s| s.refused),
        ),
        (
            "proxy: duplicate delivery".into(),
            total.duplicate,
            proxy_detail(|s| s.duplicate),
        ),
        (
            "proxy: partitions".into(),
            total.partitions,
            format!(
                "{}; {} connections cut or refused",
                proxy_detail(|s| s.partitions),
                total.partition_refused
            ),
        ),
        (
            "proxy: participant unreachable, answered UNAVAILABLE".into(),
            total.upstream_failures,
            proxy_detail(|s| s.upstream_failures),
        ),
        (
            "proxy: unary requests relayed (for scale)".into(),
            total.requests,
            proxy_detail(|s| s.requests),
        ),
    ]
}

/// What the breaker's watch says about the outage.
fn breaker(
    seen: &[(Instant, String, u32)],
    start: Option<Instant>,
    end: Option<Instant>,
    outage: Duration,
) -> BreakerSeen {
    let mut states: Vec<String> = Vec::new();
    for (_, state, _) in seen {
        if !states.contains(state) {
            states.push(state.clone());
        }
    }
    // Open during the outage: already at its start (zero: opened earlier, by faults before
    // it, and still open), else the first time it was seen open after.
    let opened = start.and_then(|start| {
        let before = seen.iter().rev().find(|(at, _, _)| *at < start);
        if before.is_some_and(|(_, state, _)| state != "closed") {
            return Some(Duration::ZERO);
        }
        seen.iter()
            .find(|(at, state, _)| *at >= start && state != "closed")
            .map(|(at, _, _)| *at - start)
    });
    // Closed again: the state at the end of the outage if it was closed then (zero), else
    // the first time it was seen closed after.
    let closed = end.and_then(|end| {
        let before = seen.iter().rev().find(|(at, _, _)| *at < end);
        if before.is_some_and(|(_, state, _)| state == "closed") {
            return Some(Duration::ZERO);
        }
        seen.iter()
            .find(|(at, state, _)| *at >= end && state == "closed")
            .map(|(at, _, _)| *at - end)
    });
    let openings = seen
        .windows(2)
        .filter(|w| w[0].1 == "closed" && w[1].1 != "closed")
        .count()
        + usize::from(seen.first().is_some_and(|(_, state, _)| state != "closed"));
    BreakerSeen {
        outage,
        opened_after: opened,
        closed_after: closed,
        times_opened: openings,
        max_openings: seen.iter().map(|(_, _, n)| *n).max().unwrap_or(0),
        states,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64, state: &str) -> (Instant, String, u32) {
        (base + Duration::from_millis(ms), state.to_owned(), 1)
    }

    #[test]
    fn a_breaker_already_open_when_the_outage_starts_was_open_during_it() {
        let t = Instant::now();
        let outage = Duration::from_secs(4);
        let (start, end) = (t + Duration::from_secs(4), t + Duration::from_secs(8));
        // Opened by earlier faults at 3 s, closed again at 15 s.
        let seen = [
            at(t, 0, "closed"),
            at(t, 3_000, "open"),
            at(t, 15_000, "closed"),
        ];
        let report = breaker(&seen, Some(start), Some(end), outage);
        assert_eq!(report.opened_after, Some(Duration::ZERO));
        assert_eq!(report.closed_after, Some(Duration::from_secs(7)));
        // Opened during the outage.
        let seen = [
            at(t, 0, "closed"),
            at(t, 5_500, "open"),
            at(t, 9_000, "closed"),
        ];
        let report = breaker(&seen, Some(start), Some(end), outage);
        assert_eq!(report.opened_after, Some(Duration::from_millis(1_500)));
        // Never open.
        let seen = [at(t, 0, "closed")];
        assert_eq!(
            breaker(&seen, Some(start), Some(end), outage).opened_after,
            None
        );
    }
}
