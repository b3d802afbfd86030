//! The system under test as a real deployment on one host: the payment, store and rider
//! participants and the orchestrator, each a process of its own (this binary, re-executed
//! with a hidden `participant` or `orchestrator` subcommand), on loopback, with their data
//! in one folder of the run's temporary directory.
//!
//! Children get `RUST_LOG=warn` and none of the caller's `SAGA_*`/`OTEL_*` variables; their
//! stderr goes to a log file beside their data. Each child is killed if its handle is
//! dropped (so an error path leaves no process behind); the normal stop is SIGTERM by PID,
//! after which every service drains and exits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use proto::saga::v1::saga_orchestrator_client::SagaOrchestratorClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

/// How long a child gets to start serving, and to exit after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The participant kinds, in saga order.
pub const PARTICIPANTS: [&str; 3] = ["payment", "store", "rider"];

/// Where the processes come from and what they load.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// This executable, re-executed for every child.
    pub exe: PathBuf,
    /// The definitions folder the orchestrator loads (`--sagas`).
    pub sagas: PathBuf,
}

impl Binaries {
    pub fn current(sagas: PathBuf) -> anyhow::Result<Binaries> {
        Ok(Binaries {
            exe: std::env::current_exe().context("cannot find this executable")?,
            sagas,
        })
    }

    /// A command running this executable as `role`, with a clean environment and its
    /// stderr in `log`.
    fn command(&self, role: &str, log: &Path) -> anyhow::Result<Command> {
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(&self.exe);
        command.arg(role);
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("SAGA_") || name.starts_with("OTEL_") || name == "FAILPOINTS" {
                command.env_remove(name.as_ref());
            }
        }
        command
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        Ok(command)
    }
}

/// A participant process.
pub struct Participant {
    pub kind: &'static str,
    pub addr: SocketAddr,
    pub pid: u32,
    child: Child,
    log: PathBuf,
}

/// An orchestrator process.
pub struct OrchestratorProcess {
    pub pid: u32,
    /// `http://ADDR` of its gRPC API.
    pub endpoint: String,
    pub admin: SocketAddr,
    /// Just before the process was spawned.
    pub spawned: Instant,
    /// When it printed that it serves gRPC: its store is open, its definitions loaded and
    /// every unfinished saga has a driver again (recovery runs before the server starts).
    pub serving: Instant,
    child: Child,
    log: PathBuf,
}

/// Participants and an orchestrator, with their data under `dir`.
pub struct Cluster {
    binaries: Binaries,
    dir: PathBuf,
    pub participants: Vec<Participant>,
    orchestrator: Option<OrchestratorProcess>,
}

impl Cluster {
    /// Starts the three participants, then the orchestrator (with data in
    /// `dir/orchestrator`, which may already hold a store), and returns once it serves.
    pub async fn start(binaries: &Binaries, dir: &Path) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut cluster = Cluster {
            binaries: binaries.clone(),
            dir: dir.to_owned(),
            participants: Vec::new(),
            orchestrator: None,
        };
        for kind in PARTICIPANTS {
            let participant = cluster.spawn_participant(kind).await?;
            cluster.participants.push(participant);
        }
        cluster.start_orchestrator().await?;
        Ok(cluster)
    }

    /// The orchestrator's data directory.
    pub fn orchestrator_data(dir: &Path) -> PathBuf {
        dir.join("orchestrator")
    }

    async fn spawn_participant(&self, kind: &'static str) -> anyhow::Result<Participant> {
        let addr = free_port()?;
        let log = self.dir.join(format!("{kind}.log"));
        let mut command = self.binaries.command("participant", &log)?;
        command
            .arg(kind)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data")
            .arg(self.dir.join(kind))
            .arg("--admin-listen")
            .arg("off")
            .stdout(Stdio::null());
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start the {kind} participant"))?;
        let pid = child.id().context("the participant has no pid")?;
        // Serving once its port accepts connections (bounded; a child that exits fails it).
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the {kind} participant exited ({status}) before serving:\n{}",
                    log_tail(&log)
                );
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the {kind} participant did not serve within {START_TIMEOUT:?}:\n{}",
                    log_tail(&log)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Participant {
            kind,
            addr,
            pid,
            child,
            log,
        })
    }

    /// Starts the orchestrator on `dir/orchestrator`; returns once it serves gRPC.
    pub async fn start_orchestrator(&mut self) -> anyhow::Result<&OrchestratorProcess> {
        if self.orchestrator.is_some() {
            bail!("the orchestrator is already running");
        }
        let starts = std::fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("orchestrator-"))
            .count();
        let log = self.dir.join(format!("orchestrator-{starts}.log"));
        let mut command = self.binaries.command("orchestrator", &log)?;
        command
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .arg("--data")
            .arg(Cluster::orchestrator_data(&self.dir))
            .arg("--sagas")
            .arg(&self.binaries.sagas)
            .stdout(Stdio::piped());
        for participant in &self.participants {
            command
                .arg("--participant")
                .arg(format!("{}=http://{}", participant.kind, participant.addr));
        }
        let spawned = Instant::now();
        let mut child = command.spawn().context("cannot start the orchestrator")?;
        let pid = child.id().context("the orchestrator has no pid")?;
        let stdout = child
            .stdout
            .take()
            .context("no stdout of the orchestrator")?;
        let mut lines = BufReader::new(stdout).lines();
        let started = tokio::time::timeout(START_TIMEOUT, async {
            let mut admin = None;
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.strip_prefix("admin endpoints on http://") {
                    admin = Some(addr.trim().parse::<SocketAddr>()?);
                }
                if let Some(url) = line.strip_prefix("orchestrator listening on ") {
                    let admin = admin.context("no admin address before the gRPC address")?;
                    return Ok((url.trim().to_owned(), admin, Instant::now()));
                }
            }
            bail!("the orchestrator exited before serving")
        })
        .await;
        let (endpoint, admin, serving) = match started {
            Ok(Ok(started)) => started,
            Ok(Err(e)) => return Err(e.context(log_tail(&log))),
            Err(_) => bail!(
                "the orchestrator did not serve within {START_TIMEOUT:?}:\n{}",
                log_tail(&log)
            ),
        };
        // Keep reading stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(self.orchestrator.insert(OrchestratorProcess {
            pid,
            endpoint,
            admin,
            spawned,
            serving,
            child,
            log,
        }))
    }

    pub fn orchestrator(&self) -> anyhow::Result<&OrchestratorProcess> {
        self.orchestrator
            .as_ref()
            .context("the orchestrator is not running")
    }

    /// A client of the orchestrator's gRPC API (one HTTP/2 connection; clones share it).
    pub async fn client(&self) -> anyhow::Result<SagaOrchestratorClient<Channel>> {
        let endpoint = self.orchestrator()?.endpoint.clone();
        let channel = Channel::from_shared(endpoint.clone())?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to the orchestrator at {endpoint}"))?;
        Ok(SagaOrchestratorClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024))
    }

    /// The pids of the participant processes.
    pub fn participant_pids(&self) -> Vec<u32> {
        self.participants.iter().map(|p| p.pid).collect()
    }

    /// SIGTERM to the orchestrator (it drains: drivers stop at a safe point, the store is
    /// flushed) and waits for it to exit; returns how long that took.
    pub async fn stop_orchestrator(&mut self) -> anyhow::Result<Duration> {
        let Some(mut orchestrator) = self.orchestrator.take() else {
            bail!("the orchestrator is not running");
        };
        let started = Instant::now();
        terminate(&mut orchestrator.child, orchestrator.pid, &orchestrator.log).await?;
        Ok(started.elapsed())
    }

    /// Stops every process (SIGTERM, each by pid, then waits for it).
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if self.orchestrator.is_some() {
            self.stop_orchestrator().await?;
        }
        for mut participant in std::mem::take(&mut self.participants) {
            terminate(&mut participant.child, participant.pid, &participant.log).await?;
        }
        Ok(())
    }
}

/// Sends SIGTERM to `pid` (the `kill` utility: this crate has no unsafe code for
/// `kill(2)`) and waits, bounded, for the child to exit 0.
async fn terminate(child: &mut Child, pid: u32, log: &Path) -> anyhow::Result<()> {
    if child.try_wait()?.is_none() {
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .context("cannot run `kill`")?;
        if !status.success() {
            bail!("kill -TERM {pid} failed: {status}");
        }
    }
    match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => bail!("process {pid} exited with {status}:\n{}", log_tail(log)),
        Ok(Err(e)) => Err(e).context(format!("cannot wait for process {pid}")),
        Err(_) => {
            // Only this child, by its handle.
            let _ = child.start_kill();
            bail!("process {pid} did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed")
        }
    }
}

/// A loopback port free at this instant (bound, read, released). Another process could
/// take it before the child binds it; the child then fails to start and says so.
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind loopback")?;
    Ok(listener.local_addr()?)
}

/// The last lines of a child's log, for an error message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    format!("{} (last lines):\n{tail}", log.display())
}
