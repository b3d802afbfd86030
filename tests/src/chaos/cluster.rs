//! The processes of a chaos run: the three participants (`chaos-participant`) and the
//! orchestrator (`crashable-orchestrator`), each on a fixed loopback port so that it comes
//! back where its clients expect it after a `kill -9`, with its data directory kept across
//! restarts and a log file per start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use participants::Kind;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::process::{OrchestratorProcess, Spawn, send_signal};

/// How long a process gets to start serving.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// A free port on loopback: bound, then released for the process to bind.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// A small HTTP/1 client for the admin endpoints.
#[derive(Clone)]
pub struct Http(Client<HttpConnector, Full<Bytes>>);

impl Default for Http {
    fn default() -> Self {
        Http(Client::builder(TokioExecutor::new()).build_http())
    }
}

impl Http {
    /// `method url` with an optional body; the status and the body, within 5 s.
    pub async fn call(
        &self,
        method: http::Method,
        url: &str,
        body: Option<String>,
    ) -> anyhow::Result<(u16, String)> {
        let mut request = http::Request::builder().method(method.clone()).uri(url);
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            let response = self.0.request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, anyhow::Error>((status, String::from_utf8_lossy(&body).into_owned()))
        })
        .await
        .with_context(|| format!("{method} {url}: no answer within 5s"))?
        .with_context(|| format!("{method} {url}"))?;
        Ok(answer)
    }
}

/// Sends SIGKILL to `child` and waits until it is gone.
async fn kill_child(child: &mut Child) -> anyhow::Result<()> {
    child.start_kill()?;
    child.wait().await?;
    Ok(())
}

/// SIGTERM, then SIGKILL if the process has not exited within `grace`.
async fn stop_child(child: &mut Child, grace: Duration) -> anyhow::Result<()> {
    if let Some(pid) = child.id() {
        send_signal(pid, "TERM")?;
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return Ok(());
        }
    }
    kill_child(child).await
}

/// One participant process and what it should be doing.
pub struct ParticipantProcess {
    pub kind: Kind,
    binary: PathBuf,
    /// Its gRPC address (the proxy's upstream).
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    data: PathBuf,
    logs: PathBuf,
    log_filter: String,
    child: Option<Child>,
    starts: u32,
    http: Http,
    /// The random faults of the current fault window, if any (JSON for `PUT /faults`).
    window: Option<Value>,
    /// A payment outage: every mutating call fails UNAVAILABLE.
    outage: bool,
    /// Seeds the participant's draws; changed at every `PUT` (derived from the run's seed).
    seed: u64,
}

impl ParticipantProcess {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: Kind,
        binary: &Path,
        data: PathBuf,
        logs: &Path,
        log_filter: &str,
        seed: u64,
    ) -> anyhow::Result<Self> {
        Ok(ParticipantProcess {
            kind,
            binary: binary.to_owned(),
            addr: free_addr()?,
            admin: free_addr()?,
            data,
            logs: logs.to_owned(),
            log_filter: log_filter.to_owned(),
            child: None,
            starts: 0,
            http: Http::default(),
            window: None,
            outage: false,
            seed,
        })
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn log_path(&self) -> PathBuf {
        self.logs.join(format!("{}-{}.log", self.kind, self.starts))
    }

    /// Starts the process (on its address and data directory) and waits until it is ready,
    /// then gives it the faults it should have.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        self.starts += 1;
        let log = self.log_path();
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(&self.binary)
            .arg(self.kind.as_str())
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--data")
            .arg(&self.data)
            .arg("--admin-listen")
            .arg(self.admin.to_string())
            .arg("--allow-fault-injection")
            .env("RUST_LOG", &self.log_filter)
            .env_remove("SAGA_LISTEN")
            .env_remove("SAGA_DATA")
            .env_remove("SAGA_ADMIN_LISTEN")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + START_DEADLINE;
        let ready = format!("http://{}/readyz", self.admin);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "{} exited at start ({status}); see {}",
                    self.kind,
                    log.display()
                );
            }
            if let Ok((200, _)) = self.http.call(http::Method::GET, &ready, None).await {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} not ready within {START_DEADLINE:?}; see {}",
                    self.kind,
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.apply_faults().await
    }

    /// `kill -9`, and wait until the process is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child).await?;
        }
        Ok(())
    }

    /// SIGTERM (SIGKILL after 10 s).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(10)).await?;
        }
        Ok(())
    }

    /// Sets (or, with `None`, ends) the random faults of a fault window.
    pub async fn set_window(&mut self, faults: Option<Value>) -> anyhow::Result<()> {
        self.window = faults;
        self.apply_faults().await
    }

    /// Starts or ends a total outage (every mutating call UNAVAILABLE).
    pub async fn set_outage(&mut self, on: bool) -> anyhow::Result<()> {
        self.outage = on;
        self.apply_faults().await
    }

    /// No faults any more, and running.
    pub async fn heal(&mut self) -> anyhow::Result<()> {
        self.window = None;
        self.outage = false;
        if self.child.is_none() {
            self.start().await
        } else {
            self.apply_faults().await
        }
    }

    /// Tells the running process the faults it should have (again after a restart, which
    /// forgets them).
    async fn apply_faults(&mut self) -> anyhow::Result<()> {
        if self.child.is_none() {
            return Ok(());
        }
        let url = format!("http://{}/faults", self.admin);
        let body = if self.outage {
            Some(json!({"unavailable": 1.0}))
        } else {
            self.window.clone()
        };
        let (status, text) = match body {
            None => self.http.call(http::Method::DELETE, &url, None).await?,
            Some(mut body) => {
                self.seed = self.seed.wrapping_add(1);
                body["seed"] = json!(self.seed);
                self.http
                    .call(http::Method::PUT, &url, Some(body.to_string()))
                    .await?
            }
        };
        if status != 200 {
            bail!("{}: {url} answered {status}: {}", self.kind, text.trim());
        }
        Ok(())
    }
}

/// The orchestrator process, restarted on the same address and data directory.
pub struct OrchestratorNode {
    spawn: Spawn,
    logs: PathBuf,
    pub process: Option<OrchestratorProcess>,
    starts: u32,
    /// The last admin base URL (`http://ADDR`).
    pub admin: String,
}

impl OrchestratorNode {
    pub fn new(spawn: Spawn, logs: &Path) -> Self {
        let admin = format!("http://{}", spawn.admin_listen);
        OrchestratorNode {
            spawn,
            logs: logs.to_owned(),
            process: None,
            starts: 0,
            admin,
        }
    }

    /// The gRPC URL clients use (the same across restarts).
    pub fn url(&self) -> String {
        format!("http://{}", self.spawn.listen)
    }

    pub fn data(&self) -> &Path {
        &self.spawn.data
    }

    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// Starts the process and waits until it serves gRPC. The address may still be held
    /// for a moment by the process just killed: a few attempts, under a deadline.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if self.process.is_some() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + START_DEADLINE;
        loop {
            self.starts += 1;
            let mut spawn = self.spawn.clone();
            spawn.log = self.logs.join(format!("orchestrator-{}.log", self.starts));
            match OrchestratorProcess::spawn_with(spawn).await {
                Ok(process) => {
                    if let Some(admin) = &process.admin {
                        self.admin.clone_from(admin);
                    }
                    self.process = Some(process);
                    return Ok(());
                }
                Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "orchestrator start failed; again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// `kill -9`, and wait until the process is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut process) = self.process.take() {
            process.kill().await?;
        }
        Ok(())
    }

    /// SIGSTOP for `pause`, then SIGCONT.
    pub async fn pause(&mut self, pause: Duration) -> anyhow::Result<()> {
        let Some(process) = &self.process else {
            return Ok(());
        };
        process.signal("STOP")?;
        tokio::time::sleep(pause).await;
        process.signal("CONT")
    }

    /// SIGTERM and wait for the drain (SIGKILL after `grace`).
    pub async fn stop(&mut self, grace: Duration) -> anyhow::Result<()> {
        if let Some(mut process) = self.process.take() {
            // A stopped process would not drain: continue it first (harmless otherwise).
            let _ = process.signal("CONT");
            process.terminate()?;
            if process.wait_exit(grace).await.is_err() {
                process.kill().await?;
            }
        }
        Ok(())
    }
}
