//! What a participant (or the notifier) reports about itself: server spans, through
//! [`telemetry::grpc::ServerTracingLayer`] with the tracer of [`ParticipantOptions`], and
//! Prometheus metrics on the admin endpoints (`/metrics`, `/healthz`, `/readyz`), served when
//! [`ParticipantOptions::admin`] is given.
//!
//! Metrics (prometheus-client, one registry per server):
//! - `participant_requests_total{participant,method,code}`: calls of the participant's own
//!   service (not health or reflection) by method and gRPC code ("OK", "FAILED_PRECONDITION").
//! - `participant_request_duration_seconds{participant,method}`: their durations, until the
//!   status was sent.
//! - `participant_ledger_entries{participant}` (payment, store, rider): ledger entries so far,
//!   read from the database at each scrape.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use telemetry::grpc::{CallObserver, CallOutcome, ServerTracingLayer, code_name};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// How a participant (or the notifier) reports about itself; the default reports nothing.
#[derive(Debug, Default)]
pub struct ParticipantOptions {
    /// The tracer of the server spans (one per gRPC call); None: no span. In a process that
    /// runs several services, give each its own (`telemetry::Telemetry::service_tracer`).
    pub tracer: Option<telemetry::Tracer>,
    /// Where to serve the admin endpoints (`/metrics`, `/healthz`, `/readyz`); None: no
    /// admin server (and no metrics are kept).
    pub admin: Option<TcpListener>,
    /// Also serve `PUT /faults` and `DELETE /faults` on the admin endpoints, to inject
    /// random faults ([`crate::faults::RandomFaults`]): for chaos tests only.
    pub fault_injection: bool,
}

/// `PUT /faults` (JSON [`crate::faults::RandomFaults`]), `GET /faults`, `DELETE /faults`.
fn fault_routes(faults: Arc<crate::Faults>) -> axum::Router {
    use axum::extract::State;
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get;

    fn current(faults: &crate::Faults) -> axum::response::Response {
        let body = serde_json::to_string(&faults.random()).unwrap_or_default();
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
    axum::Router::new()
        .route(
            "/faults",
            get(|State(faults): State<Arc<crate::Faults>>| async move { current(&faults) })
                .put(
                    |State(faults): State<Arc<crate::Faults>>, body: String| async move {
                        let settings: crate::faults::RandomFaults =
                            match serde_json::from_str(&body) {
                                Ok(settings) => settings,
                                Err(e) => {
                                    return (
                                        StatusCode::BAD_REQUEST,
                                        format!("bad fault settings: {e}\n"),
                                    )
                                        .into_response();
                                }
                            };
                        match faults.set_random(settings) {
                            Ok(()) => {
                                warn!(faults = ?faults.random(), "random faults injected");
                                current(&faults)
                            }
                            Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
                        }
                    },
                )
                .delete(|State(faults): State<Arc<crate::Faults>>| async move {
                    faults.clear();
                    info!("faults cleared");
                    current(&faults)
                }),
        )
        .with_state(faults)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    participant: String,
    method: String,
    code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    participant: String,
    method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ParticipantLabel {
    participant: String,
}

fn duration_histogram() -> Histogram {
    // 1 ms to about 16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// One server's metrics and registry.
pub(crate) struct Metrics {
    participant: String,
    /// The gRPC service whose calls are counted.
    service: &'static str,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Family<MethodLabels, Histogram, fn() -> Histogram>,
    ledger: Option<Gauge<i64, AtomicI64>>,
}

impl Metrics {
    /// Metrics for `participant` serving `service`, with the ledger gauge when `ledger`.
    pub(crate) fn new(participant: &str, service: &'static str, ledger: bool) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "participant_requests",
            "Calls of the participant's service, by method and gRPC status code",
            requests.clone(),
        );
        let durations = Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        registry.register_with_unit(
            "participant_request_duration",
            "Durations of the participant's calls, until the status was sent",
            Unit::Seconds,
            durations.clone(),
        );
        let ledger = ledger.then(|| {
            let family = Family::<ParticipantLabel, Gauge<i64, AtomicI64>>::default();
            registry.register(
                "participant_ledger_entries",
                "Entries in the participant's ledger",
                family.clone(),
            );
            family
                .get_or_create(&ParticipantLabel {
                    participant: participant.to_owned(),
                })
                .clone()
        });
        Metrics {
            participant: participant.to_owned(),
            service,
            registry,
            requests,
            durations,
            ledger,
        }
    }

    /// The OpenMetrics text, with the ledger gauge set to `ledger_entries` first.
    pub(crate) fn encode(&self, ledger_entries: Option<u64>) -> String {
        if let (Some(gauge), Some(entries)) = (&self.ledger, ledger_entries) {
            gauge.set(i64::try_from(entries).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            warn!(participant = %self.participant, error = %e, "cannot encode the metrics");
        }
        text
    }
}

impl CallObserver for Metrics {
    fn on_call_end(&self, outcome: &CallOutcome<'_>) {
        if outcome.service != self.service {
            return;
        }
        self.requests
            .get_or_create(&RequestLabels {
                participant: self.participant.clone(),
                method: outcome.method.to_owned(),
                code: code_name(outcome.code).to_owned(),
            })
            .inc();
        self.durations
            .get_or_create(&MethodLabels {
                participant: self.participant.clone(),
                method: outcome.method.to_owned(),
            })
            .observe(outcome.elapsed.as_secs_f64());
    }
}

/// The reporting of one server: its tracing layer, and its admin server if any.
pub(crate) struct Reporting {
    pub(crate) layer: ServerTracingLayer,
    pub(crate) admin: Option<AdminServer>,
}

impl Reporting {
    /// Builds the layer and starts the admin server of `participant` (serving `service`).
    /// `ready` answers `/readyz` (Err: why not); `ledger_entries` feeds the ledger gauge
    /// (None: no gauge).
    pub(crate) fn start(
        options: ParticipantOptions,
        participant: &str,
        service: &'static str,
        ready: impl Fn() -> Result<(), String> + Send + Sync + 'static,
        ledger_entries: Option<Box<dyn Fn() -> Option<u64> + Send + Sync>>,
        faults: Option<Arc<crate::Faults>>,
    ) -> std::io::Result<Self> {
        let extra = match (options.fault_injection, faults) {
            (true, Some(faults)) => fault_routes(faults),
            _ => axum::Router::new(),
        };
        let layer = ServerTracingLayer::new(options.tracer);
        let Some(listener) = options.admin else {
            return Ok(Reporting { layer, admin: None });
        };
        let metrics = Arc::new(Metrics::new(participant, service, ledger_entries.is_some()));
        let layer = layer.with_observer(Arc::clone(&metrics) as Arc<dyn CallObserver>);
        let admin = telemetry::Admin {
            metrics: Arc::new(move || metrics.encode(ledger_entries.as_ref().and_then(|f| f()))),
            ready: Arc::new(ready),
        };
        let admin = AdminServer::spawn(listener, admin, extra, participant)?;
        Ok(Reporting {
            layer,
            admin: Some(admin),
        })
    }
}

/// A running admin server; [`AdminServer::stop`] ends it.
pub(crate) struct AdminServer {
    pub(crate) addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl AdminServer {
    fn spawn(
        listener: TcpListener,
        admin: telemetry::Admin,
        extra: axum::Router,
        participant: &str,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let signal = async move {
            // A dropped sender (the server future was dropped) also stops it.
            let _ = stopped.await;
        };
        info!(participant, %addr, "admin endpoints: /metrics /healthz /readyz");
        let task = tokio::spawn(telemetry::serve_admin_with(listener, admin, extra, signal));
        Ok(AdminServer { addr, stop, task })
    }

    /// Stops the admin server and waits for it.
    pub(crate) async fn stop(self, participant: &str) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(participant, error = %e, "the admin server failed"),
            Err(e) => warn!(participant, error = %e, "the admin server task failed"),
        }
    }
}

/// Readiness: serving, and the database (held weakly, so the admin server never keeps it
/// open) still open.
pub(crate) fn readiness<T: Send + Sync + 'static>(
    serving: Arc<AtomicBool>,
    database: std::sync::Weak<T>,
) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
    move || {
        if database.strong_count() == 0 {
            Err("the database is closed".to_owned())
        } else if !serving.load(Ordering::Acquire) {
            Err("shutting down".to_owned())
        } else {
            Ok(())
        }
    }
}
