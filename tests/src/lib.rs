//! The harness for cross-process scenarios: a [`Cluster`] of real gRPC servers on
//! `127.0.0.1:0` (payment, store and rider participants and an orchestrator), each with
//! its own temporary sled directory, and helpers to drive and inspect it.
//!
//! Waiting is done by watching (the WatchSaga stream ends at a terminal status) under a
//! deadline, never by sleeping.
//!
//! [`process`] runs the orchestrator as a separate process (with failpoints compiled in) for
//! the crash and kill tests; [`invariants`] checks the durability rules against the
//! participants' ledgers; [`chaos`] is the chaos harness (the `chaos` binary and
//! `tests/chaos.rs`): processes, fault-injecting proxies, load and faults from a seed, then
//! the rules checked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use participants::{Kind, ParticipantHandle};
use proto::participant::v1::{LedgerEntry, ListLedgerRequest};
use proto::saga::v1 as pb;
use proto::saga::v1::saga_orchestrator_client::SagaOrchestratorClient;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tonic::transport::Channel;

pub use orchestrator::Orchestrator;

pub mod chaos;
pub mod invariants;
pub mod otlp;
pub mod process;

/// How long a scenario waits for a saga before failing.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `check` until it holds, for up to 10 s (for state that is not behind the API, such
/// as the runtime's table of parked sagas).
pub async fn eventually(what: &str, check: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// The repository's `sagas/` folder.
pub fn sagas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sagas")
}

/// A standard order-placement input; `changes` overrides fields.
pub fn order_input(order_id: &str, changes: Value) -> Value {
    let mut input = json!({
        "order_id": order_id,
        "customer_id": "c-1",
        "amount_cents": 2599,
        "card": "tok_visa",
        "store_id": "s-1",
        "items": ["bibimbap"],
        "zone": "gangnam",
    });
    if let (Value::Object(base), Value::Object(changes)) = (&mut input, changes) {
        base.extend(changes);
    }
    input
}

/// The `i`-th input of a mixed load: success, failure at the store (a sold-out item) and
/// failure at the rider (a zone without riders), in turn.
pub fn mixed_input(i: usize) -> Value {
    let changes = match i % 3 {
        0 => json!({}),
        1 => json!({"items": ["tteokbokki"]}),
        _ => json!({"zone": "nowhere"}),
    };
    order_input(&format!("o-{i}"), changes)
}

/// Participants and an orchestrator on loopback, with their data in one temp dir.
pub struct Cluster {
    pub dir: TempDir,
    pub participants: BTreeMap<String, ParticipantHandle>,
    pub orchestrator: Option<Orchestrator>,
    pub client: SagaOrchestratorClient<Channel>,
    /// The address of the orchestrator last stopped.
    last_addr: Option<std::net::SocketAddr>,
}

/// Binds `addr` again after its listener closed (bounded retries: the port may take a
/// moment to be free).
async fn bind_again(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(e).with_context(|| format!("cannot bind {addr} again"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Logs to stderr when `SAGA_TEST_LOG` is set (e.g. `SAGA_TEST_LOG=debug`), for
/// investigating a failing scenario.
pub fn init_test_logging() {
    if let Ok(filter) = std::env::var("SAGA_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

impl Cluster {
    /// Starts the three participants and an orchestrator loading `sagas/`.
    pub async fn start() -> anyhow::Result<Cluster> {
        init_test_logging();
        Cluster::start_with(None).await
    }

    /// [`Cluster::start`], with each participant reporting its server spans through its own
    /// service tracer of `telemetry` (as `orchestrator dev` does).
    pub async fn start_with(telemetry: Option<&telemetry::Telemetry>) -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let mut participants = BTreeMap::new();
        for kind in [Kind::Payment, Kind::Store, Kind::Rider] {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let options = participants::ParticipantOptions {
                tracer: telemetry.and_then(|t| t.service_tracer(kind.as_str())),
                ..Default::default()
            };
            let handle = participants::spawn_with(
                kind,
                listener,
                &dir.path().join(kind.to_string()),
                options,
            )
            .await
            .with_context(|| format!("start {kind}"))?;
            participants.insert(kind.to_string(), handle);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let (orchestrator, client) = start_orchestrator(&dir, &participants, listener).await?;
        Ok(Cluster {
            dir,
            participants,
            orchestrator: Some(orchestrator),
            client,
            last_addr: None,
        })
    }

    pub fn orchestrator(&self) -> &Orchestrator {
        self.orchestrator.as_ref().expect("orchestrator running")
    }

    pub fn participant(&self, kind: Kind) -> &ParticipantHandle {
        &self.participants[&kind.to_string()]
    }

    /// Stops the orchestrator (in-flight calls are abandoned) and starts a new one on the
    /// same data directory and the same address, as a restarted deployment would.
    pub async fn restart_orchestrator(&mut self) -> anyhow::Result<()> {
        self.stop_orchestrator().await;
        self.start_orchestrator_again().await
    }

    /// Stops the orchestrator; [`Cluster::start_orchestrator_again`] brings it back.
    pub async fn stop_orchestrator(&mut self) {
        if let Some(old) = self.orchestrator.take() {
            self.last_addr = Some(old.addr());
            old.shutdown().await;
        }
    }

    /// Starts an orchestrator on the data directory (and address) of the stopped one.
    pub async fn start_orchestrator_again(&mut self) -> anyhow::Result<()> {
        let listener = match self.last_addr {
            Some(addr) => bind_again(addr).await?,
            None => TcpListener::bind("127.0.0.1:0").await?,
        };
        let (orchestrator, client) =
            start_orchestrator(&self.dir, &self.participants, listener).await?;
        self.orchestrator = Some(orchestrator);
        self.client = client;
        Ok(())
    }

    /// The orchestrator's gRPC URL.
    pub fn orchestrator_url(&self) -> String {
        let addr = self
            .orchestrator
            .as_ref()
            .map(Orchestrator::addr)
            .or(self.last_addr)
            .expect("an orchestrator was started");
        format!("http://{addr}")
    }

    /// Polls GetSaga (under [`DEADLINE`]) until `ready` holds; returns the saga.
    pub async fn wait_until(
        &mut self,
        saga_id: &str,
        what: &str,
        ready: impl Fn(&pb::Saga) -> bool,
    ) -> anyhow::Result<pb::Saga> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let saga = self
                .client
                .get_saga(pb::GetSagaRequest {
                    saga_id: saga_id.to_owned(),
                })
                .await?
                .into_inner();
            if ready(&saga) {
                return Ok(saga);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("saga {saga_id} never got to {what}: {saga:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts a saga of `definition` with `input` and an optional idempotency key.
    pub async fn start_saga(
        &mut self,
        definition: &str,
        input: Value,
        key: &str,
    ) -> Result<pb::StartSagaResponse, tonic::Status> {
        let request = pb::StartSagaRequest {
            definition: definition.to_owned(),
            version: None,
            input: Some(orchestrator::convert::json_to_struct(&input)),
            idempotency_key: key.to_owned(),
        };
        self.client
            .start_saga(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Waits (by watching, under [`DEADLINE`]) until the saga is terminal; returns it.
    pub async fn wait_terminal(&mut self, saga_id: &str) -> anyhow::Result<pb::Saga> {
        let mut sagas =
            process::wait_all_terminal(&self.client, &[saga_id.to_owned()], DEADLINE).await?;
        sagas.pop().context("no saga returned")
    }

    /// A participant's whole ledger.
    pub async fn ledger(&self, kind: Kind) -> anyhow::Result<Vec<LedgerEntry>> {
        ledger(self.participant(kind)).await
    }

    /// Starts a saga and waits for its end.
    pub async fn run(&mut self, definition: &str, input: Value) -> anyhow::Result<pb::Saga> {
        let started = self.start_saga(definition, input, "").await?;
        self.wait_terminal(&started.saga_id).await
    }

    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(o) = self.orchestrator.take() {
            o.shutdown().await;
        }
        for (_, p) in std::mem::take(&mut self.participants) {
            p.shutdown().await?;
        }
        Ok(())
    }
}

async fn start_orchestrator(
    dir: &TempDir,
    participants: &BTreeMap<String, ParticipantHandle>,
    listener: TcpListener,
) -> anyhow::Result<(Orchestrator, SagaOrchestratorClient<Channel>)> {
    let config = orchestrator::Config {
        data: dir.path().join("orchestrator"),
        sagas: Some(sagas_dir()),
        participants: participants
            .iter()
            .map(|(name, p)| (name.clone(), format!("http://{}", p.addr)))
            .collect(),
        descriptor_wait: Duration::from_secs(10),
        shutdown_grace: Duration::from_secs(5),
    };
    let admin = TcpListener::bind("127.0.0.1:0").await?;
    let orchestrator = Orchestrator::start_with_admin(config, listener, Some(admin)).await?;
    let client = SagaOrchestratorClient::connect(format!("http://{}", orchestrator.addr())).await?;
    Ok((orchestrator, client))
}

/// The ledger of one participant, through its gRPC API.
pub async fn ledger(participant: &ParticipantHandle) -> anyhow::Result<Vec<LedgerEntry>> {
    let channel = Channel::from_shared(format!("http://{}", participant.addr))?
        .connect()
        .await?;
    let request = tonic::Request::new(ListLedgerRequest {});
    let entries = match participant.kind {
        Kind::Payment => {
            proto::payment::v1::payment_client::PaymentClient::new(channel)
                .list_ledger(request)
                .await?
        }
        Kind::Store => {
            proto::store::v1::store_client::StoreClient::new(channel)
                .list_ledger(request)
                .await?
        }
        Kind::Rider => {
            proto::rider::v1::rider_client::RiderClient::new(channel)
                .list_ledger(request)
                .await?
        }
    };
    Ok(entries.into_inner().entries)
}

/// The (operation, noop) pairs of a saga's entries in a ledger, in ledger order.
pub fn effects_of(ledger: &[LedgerEntry], saga_id: &str) -> Vec<(String, bool)> {
    ledger
        .iter()
        .filter(|e| e.idempotency_key.starts_with(&format!("{saga_id}/")))
        .map(|e| (e.operation.clone(), e.noop))
        .collect()
}

/// The status name of a saga message.
pub fn status(saga: &pb::Saga) -> &'static str {
    orchestrator::cli::sagactl::status_name(saga.status)
}

/// Fails unless every idempotency key appears at most once in the ledger.
pub fn assert_no_doubled_effects(ledger: &[LedgerEntry]) -> anyhow::Result<()> {
    let mut seen = BTreeMap::new();
    for entry in ledger {
        if let Some(first) = seen.insert(entry.idempotency_key.clone(), entry.seq) {
            bail!(
                "key {} has two ledger entries (seq {first} and {})",
                entry.idempotency_key,
                entry.seq
            );
        }
    }
    Ok(())
}
