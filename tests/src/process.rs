//! The orchestrator as a separate process (the `crashable-orchestrator` binary, which has
//! failpoints compiled in), against participants running in the test process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use participants::{Kind, ParticipantHandle};
use proto::saga::v1 as pb;
use proto::saga::v1::saga_orchestrator_client::SagaOrchestratorClient;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::sagas_dir;

/// The three participants, in this process, with their data in a temp dir.
pub struct Participants {
    pub dir: TempDir,
    pub handles: BTreeMap<String, ParticipantHandle>,
}

impl Participants {
    pub async fn start() -> anyhow::Result<Participants> {
        crate::init_test_logging();
        let dir = tempfile::tempdir()?;
        let mut handles = BTreeMap::new();
        for kind in [Kind::Payment, Kind::Store, Kind::Rider] {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let handle =
                participants::spawn(kind, listener, &dir.path().join(kind.to_string())).await?;
            handles.insert(kind.to_string(), handle);
        }
        Ok(Participants { dir, handles })
    }

    pub fn get(&self, kind: Kind) -> &ParticipantHandle {
        &self.handles[&kind.to_string()]
    }

    pub async fn shutdown(self) -> anyhow::Result<()> {
        for (_, handle) in self.handles {
            handle.shutdown().await?;
        }
        Ok(())
    }
}

/// A running orchestrator process.
pub struct OrchestratorProcess {
    child: Child,
    pub endpoint: String,
    pub client: SagaOrchestratorClient<Channel>,
    /// The admin endpoints' base URL (`http://ADDR`), when they are on.
    pub admin: Option<String>,
    log: PathBuf,
}

/// How to start an orchestrator process: every address and directory named
/// ([`OrchestratorProcess::spawn_with`]).
#[derive(Debug, Clone)]
pub struct Spawn {
    /// The `crashable-orchestrator` binary.
    pub binary: PathBuf,
    pub data: PathBuf,
    pub sagas: PathBuf,
    /// `127.0.0.1:0` for any port; a fixed address to come back where clients expect it.
    pub listen: std::net::SocketAddr,
    pub admin_listen: std::net::SocketAddr,
    /// `--participant NAME=URL` overrides.
    pub participants: Vec<(String, String)>,
    /// The `FAILPOINTS` variable (the `fail` crate's syntax), if any.
    pub failpoints: Option<String>,
    /// Where the process's stderr goes.
    pub log: PathBuf,
    /// Its `RUST_LOG`.
    pub log_filter: String,
}

impl OrchestratorProcess {
    /// Starts `crashable-orchestrator serve` on `data`, with `failpoints` (the `FAILPOINTS`
    /// syntax of the `fail` crate) if given; returns once it serves gRPC.
    ///
    /// `binary` is `env!("CARGO_BIN_EXE_crashable-orchestrator")`, which only integration
    /// tests can name.
    pub async fn spawn(
        binary: &str,
        data: &Path,
        participants: &Participants,
        failpoints: Option<&str>,
    ) -> anyhow::Result<Self> {
        static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAGA_TEST_LOG_DIR keeps the child logs after the test's temp dir is gone.
        let log_dir = std::env::var_os("SAGA_TEST_LOG_DIR").map(PathBuf::from);
        let log = match &log_dir {
            Some(dir) => dir.join(format!("orchestrator-{}-{n}.log", std::process::id())),
            None => data.with_file_name(format!("orchestrator-{n}.log")),
        };
        let any: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
        OrchestratorProcess::spawn_with(Spawn {
            binary: PathBuf::from(binary),
            data: data.to_owned(),
            sagas: sagas_dir(),
            listen: any,
            admin_listen: any,
            participants: participants
                .handles
                .iter()
                .map(|(name, handle)| (name.clone(), format!("http://{}", handle.addr)))
                .collect(),
            failpoints: failpoints.map(str::to_owned),
            log,
            log_filter: std::env::var("SAGA_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
        })
        .await
    }

    /// Starts `crashable-orchestrator serve` as `spawn` says; returns once it serves gRPC.
    pub async fn spawn_with(spawn: Spawn) -> anyhow::Result<Self> {
        let log = spawn.log.clone();
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(&spawn.binary);
        command
            .arg("serve")
            .arg("--listen")
            .arg(spawn.listen.to_string())
            .arg("--data")
            .arg(&spawn.data)
            .arg("--sagas")
            .arg(&spawn.sagas)
            .arg("--admin-listen")
            .arg(spawn.admin_listen.to_string());
        for (name, url) in &spawn.participants {
            command.arg("--participant").arg(format!("{name}={url}"));
        }
        command
            .env("RUST_LOG", &spawn.log_filter)
            .env_remove("SAGA_LISTEN")
            .env_remove("SAGA_PARTICIPANTS")
            .env_remove("SAGA_ADMIN_LISTEN")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("SAGA_DATA")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        match &spawn.failpoints {
            Some(points) => command.env("FAILPOINTS", points),
            None => command.env_remove("FAILPOINTS"),
        };
        let mut child = command
            .spawn()
            .with_context(|| format!("spawn {}", spawn.binary.display()))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (endpoint, admin) = tokio::time::timeout(Duration::from_secs(30), async {
            let mut admin = None;
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("admin endpoints on ") {
                    admin = Some(url.trim().to_owned());
                }
                if let Some(url) = line.strip_prefix("orchestrator listening on ") {
                    return Ok((url.trim().to_owned(), admin));
                }
            }
            bail!(
                "the orchestrator exited before serving; see {}",
                log.display()
            )
        })
        .await
        .with_context(|| {
            format!(
                "the orchestrator did not start within 30s; see {}",
                log.display()
            )
        })??;
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let client = SagaOrchestratorClient::connect(endpoint.clone()).await?;
        Ok(OrchestratorProcess {
            child,
            endpoint,
            client,
            admin,
            log,
        })
    }

    /// The process id, while the process runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` (a name such as `STOP`, `CONT`, `TERM`) to the process, by its id,
    /// with the system's `kill`.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("the orchestrator has already exited")?;
        send_signal(pid, signal)
    }

    /// `kill -9`, and wait until the process is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM (by process id, with the system's `kill`): the orchestrator drains and exits.
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.signal("TERM")
    }

    /// Waits for the process to end by itself.
    pub async fn wait_exit(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!(
                "the orchestrator did not exit within {deadline:?}; see {}",
                self.log.display()
            ),
        }
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Sends `signal` (e.g. `KILL`, `STOP`, `CONT`, `TERM`) to process `pid` with the system's
/// `kill`.
pub fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("run kill -{signal} {pid}"))?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed: {status}");
    }
    Ok(())
}

/// Starts a saga through `client`.
pub async fn start_saga(
    client: &mut SagaOrchestratorClient<Channel>,
    input: &Value,
    key: &str,
) -> Result<pb::StartSagaResponse, tonic::Status> {
    client
        .start_saga(pb::StartSagaRequest {
            definition: "order-placement".into(),
            version: None,
            input: Some(orchestrator::convert::json_to_struct(input)),
            idempotency_key: key.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Waits for every saga to be terminal (watching each, under one deadline); returns them.
pub async fn wait_all_terminal(
    client: &SagaOrchestratorClient<Channel>,
    ids: &[String],
    deadline: Duration,
) -> anyhow::Result<Vec<pb::Saga>> {
    let client = client.clone();
    let ids = ids.to_vec();
    tokio::time::timeout(deadline, async move {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let mut client = client.clone();
            let mut stream = client
                .watch_saga(pb::WatchSagaRequest {
                    saga_id: id.clone(),
                })
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            out.push(
                client
                    .get_saga(pb::GetSagaRequest { saga_id: id })
                    .await?
                    .into_inner(),
            );
        }
        Ok::<_, anyhow::Error>(out)
    })
    .await
    .context("sagas not terminal in time")?
}
