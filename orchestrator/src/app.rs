//! Assembling an orchestrator: store, definitions, recovery, and the gRPC server with
//! health and reflection. The binaries and the tests start orchestrators through here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use saga_store::{SagaStore, SledStore};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use proto::saga::v1::saga_orchestrator_server::SagaOrchestratorServer;

use crate::api::Api;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::runtime::Runtime;

/// What an orchestrator needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// The sled data directory.
    pub data: PathBuf,
    /// A folder of definitions to load (and store) at start, if any.
    pub sagas: Option<PathBuf>,
    /// Participant name → endpoint, overriding the definitions' endpoints.
    pub participants: BTreeMap<String, String>,
    /// How long to keep trying to reach a participant's reflection service at start.
    pub descriptor_wait: Duration,
    /// How long a shutdown waits for open gRPC calls (streams included) to finish before
    /// dropping them.
    pub shutdown_grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the store: {0}")]
    Store(#[from] saga_store::StoreError),
    #[error("cannot load definitions:\n  {}", .0.join("\n  "))]
    Definitions(Vec<String>),
    #[error("cannot resume sagas: {0}")]
    Recover(crate::error::Error),
    #[error("gRPC server: {0}")]
    Server(String),
}

/// A running orchestrator.
pub struct Orchestrator {
    addr: SocketAddr,
    runtime: Runtime,
    store: SledStore,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    health: tonic_health::server::HealthReporter,
    shutdown_grace: Duration,
    /// The health monitor; it holds a store handle, so shutdown waits for it.
    monitor: Option<JoinHandle<()>>,
    admin: Option<(SocketAddr, JoinHandle<std::io::Result<()>>)>,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Orchestrator {
    /// Opens the store, loads definitions (stored ones, then the `sagas` folder), resumes
    /// unfinished sagas and serves gRPC on `listener`.
    pub async fn start(config: Config, listener: TcpListener) -> Result<Orchestrator, StartError> {
        Orchestrator::start_with_admin(config, listener, None).await
    }

    /// [`Orchestrator::start`], also serving `/metrics`, `/healthz` and `/readyz` on `admin`.
    pub async fn start_with_admin(
        config: Config,
        listener: TcpListener,
        admin: Option<TcpListener>,
    ) -> Result<Orchestrator, StartError> {
        let addr = listener
            .local_addr()
            .map_err(|e| StartError::Server(e.to_string()))?;
        let store = SledStore::open(&config.data)?;
        let metrics = Metrics::new();
        let flush_metrics = metrics.clone();
        store.observe_flushes(Arc::new(move |took, writes| {
            flush_metrics.flushed(took, writes);
        }));
        let shared: Arc<dyn SagaStore> = Arc::new(store.clone());
        let registry = Arc::new(Registry::new(
            shared.clone(),
            config.participants.clone(),
            config.descriptor_wait,
        ));
        let mut problems = registry
            .load_stored()
            .map_err(|e| StartError::Definitions(vec![e.to_string()]))?;
        if let Some(dir) = &config.sagas {
            if dir.is_dir() {
                if let Err(errors) = registry.load_dir(dir).await {
                    problems.extend(errors);
                    return Err(StartError::Definitions(problems));
                }
            } else {
                tracing::warn!(dir = %dir.display(), "no definitions folder; definitions can still be put through the API");
            }
        }
        for problem in &problems {
            tracing::error!(cause = %problem, "stored definition could not be loaded; its sagas wait for it");
        }
        let runtime = Runtime::new(shared.clone(), registry.clone(), metrics.clone());
        watch_breakers(&runtime);
        let resumed = runtime.recover().await.map_err(StartError::Recover)?;
        if resumed > 0 {
            tracing::info!(resumed, "resumed unfinished sagas");
        }

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<SagaOrchestratorServer<Api>>().await;
        let reporter = health.clone();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Server(e.to_string()))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let service = SagaOrchestratorServer::new(Api::new(runtime.clone()));
        let monitor_store = shared.clone();
        let monitor_runtime = runtime.clone();
        // Health follows the store: a storage fault makes the service NOT_SERVING.
        let monitor = tokio::spawn(async move {
            let mut faulted = false;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = monitor_runtime.shutting_down() => return,
                }
                let now_faulted = monitor_store.health().is_err();
                if now_faulted != faulted {
                    faulted = now_faulted;
                    if faulted {
                        health
                            .set_not_serving::<SagaOrchestratorServer<Api>>()
                            .await;
                    } else {
                        health.set_serving::<SagaOrchestratorServer<Api>>().await;
                    }
                }
            }
        });
        let server = tokio::spawn(
            Server::builder()
                .add_service(health_service)
                .add_service(reflection)
                .add_service(service)
                .serve_with_incoming_shutdown(
                    // serve_with_incoming ignores the builder's nodelay: set it on the stream, or
                    // Nagle and delayed ACKs hold small replies back by ~40 ms.
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        tracing::info!(%addr, "orchestrator serving gRPC");
        let admin = match admin {
            Some(listener) => {
                let admin_addr = listener
                    .local_addr()
                    .map_err(|e| StartError::Server(e.to_string()))?;
                let shutdown = runtime.clone();
                let task = tokio::spawn(telemetry::serve_admin(
                    listener,
                    admin_endpoints(&runtime),
                    async move { shutdown.shutting_down().await },
                ));
                tracing::info!(addr = %admin_addr, "admin endpoints: /metrics /healthz /readyz");
                Some((admin_addr, task))
            }
            None => None,
        };
        Ok(Orchestrator {
            addr,
            runtime,
            store,
            stop: Some(stop),
            server: Some(server),
            health: reporter,
            shutdown_grace: config.shutdown_grace,
            monitor: Some(monitor),
            admin,
        })
    }

    /// Where the admin endpoints listen, if they were asked for.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(addr, _)| *addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The store, for inspection (stats) and fault injection in tests.
    pub fn store(&self) -> &SledStore {
        &self.store
    }

    /// Stops serving, stops the drivers at a safe point and closes the store; the data
    /// directory can be reopened when this returns.
    ///
    /// Open calls get `shutdown_grace` to finish; streams that outlive it (a client watching
    /// health, say) are dropped. A client still connected after that keeps its connection's
    /// handle on the store, so reopening the same directory in this process needs clients to
    /// have disconnected; a process exit needs nothing.
    pub async fn shutdown(mut self) {
        self.health
            .set_not_serving::<SagaOrchestratorServer<Api>>()
            .await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.runtime.shutdown().await;
        if let Some(monitor) = self.monitor.take() {
            let _ = monitor.await;
        }
        if let Some((_, admin)) = self.admin.take() {
            let _ = admin.await;
        }
        if let Some(mut server) = self.server.take() {
            match tokio::time::timeout(self.shutdown_grace, &mut server).await {
                Ok(Ok(Err(e))) => tracing::warn!(cause = %e, "gRPC server ended with an error"),
                Ok(Err(e)) => tracing::warn!(cause = %e, "gRPC server task failed"),
                Ok(Ok(Ok(()))) => {}
                Err(_) => {
                    tracing::warn!(grace = ?self.shutdown_grace, "open gRPC calls outlived the shutdown grace; dropping them");
                    server.abort();
                }
            }
        }
    }
}

/// The admin endpoints of an orchestrator: metrics read at scrape time, readiness from the
/// store (not ready after a storage fault or once shutting down).
fn admin_endpoints(runtime: &Runtime) -> telemetry::Admin {
    let metrics_runtime = runtime.clone();
    let ready_runtime = runtime.clone();
    telemetry::Admin {
        metrics: Arc::new(move || {
            let breakers: Vec<(String, circuit_breaker::State)> = metrics_runtime
                .registry()
                .breakers()
                .all()
                .iter()
                .map(|b| {
                    let snapshot = b.snapshot();
                    (snapshot.name, snapshot.state)
                })
                .collect();
            metrics_runtime
                .metrics()
                .render(metrics_runtime.store().as_ref(), &breakers)
        }),
        ready: Arc::new(move || {
            if ready_runtime.is_shutting_down() {
                return Err("shutting down".to_owned());
            }
            ready_runtime
                .store()
                .health()
                .map_err(|e| format!("store: {e}"))?;
            if ready_runtime.registry().list().is_empty() {
                return Err("no definitions loaded".to_owned());
            }
            Ok(())
        }),
    }
}

/// Counts every breaker's state changes, and logs them. The observer lives in the registry,
/// so it holds only the metrics and the runtime's shutdown signal and task tracker (never the
/// runtime itself: that would be a cycle keeping the store open after shutdown).
fn watch_breakers(runtime: &Runtime) {
    let metrics = runtime.metrics().clone();
    let (shutdown, tasks) = runtime.background();
    runtime
        .registry()
        .breakers()
        .observe(Arc::new(move |participant, breaker| {
            if tokio::runtime::Handle::try_current().is_err() {
                return;
            }
            let metrics = metrics.clone();
            let shutdown = shutdown.clone();
            let participant = participant.to_owned();
            let mut states = breaker.subscribe();
            tasks.spawn(async move {
                let mut last = *states.borrow_and_update();
                loop {
                    tokio::select! {
                        changed = states.changed() => if changed.is_err() { return },
                        () = shutdown.cancelled() => return,
                    }
                    let now = *states.borrow_and_update();
                    if now != last {
                        metrics.breaker_transition(&participant, last.as_str(), now.as_str());
                        tracing::info!(participant = %participant, from = last.as_str(), to = now.as_str(), "circuit breaker state changed");
                        last = now;
                    }
                }
            });
        }));
}
