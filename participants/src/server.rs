//! Running a participant: the gRPC server with health and reflection, and its shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use proto::payment::v1::payment_server::PaymentServer;
use proto::rider::v1::rider_server::RiderServer;
use proto::store::v1::store_server::StoreServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracing::info;

use crate::core::Core;
use crate::observability::{ParticipantOptions, Reporting, readiness};
use crate::payment::PaymentService;
use crate::rider::RiderService;
use crate::store::StoreService;
use crate::{Faults, Kind, ParticipantError};

pub(crate) const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
pub(crate) const REFLECTION_SERVICE: &str = "grpc.reflection.v1.ServerReflection";

/// A participant running in the background, started by [`spawn`].
pub struct ParticipantHandle {
    pub kind: Kind,
    /// The address the server listens on.
    pub addr: SocketAddr,
    /// The participant's fault injection and call counts.
    pub faults: Arc<Faults>,
    /// The address of the admin endpoints, when [`ParticipantOptions::admin`] was given.
    pub admin_addr: Option<SocketAddr>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ParticipantError>>,
}

impl std::fmt::Debug for ParticipantHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParticipantHandle")
            .field("kind", &self.kind)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ParticipantHandle {
    /// Stops the server gracefully and waits until it and its sled database are fully closed
    /// (the data dir can be reopened immediately after this returns).
    pub async fn shutdown(self) -> Result<(), ParticipantError> {
        // The server may already have stopped (with an error the task returns below).
        let _ = self.shutdown.send(());
        self.task.await?
    }
}

/// Serves `kind` on an already-bound listener with data in `data_dir` (created if missing),
/// with gRPC health (status SERVING for its service name and "") and server reflection (v1)
/// registered. Returns once the server is running.
pub async fn spawn(
    kind: Kind,
    listener: TcpListener,
    data_dir: &Path,
) -> Result<ParticipantHandle, ParticipantError> {
    spawn_with(kind, listener, data_dir, ParticipantOptions::default()).await
}

/// [`spawn`], with server spans from `options.tracer` and the admin endpoints on
/// `options.admin`.
pub async fn spawn_with(
    kind: Kind,
    listener: TcpListener,
    data_dir: &Path,
    options: ParticipantOptions,
) -> Result<ParticipantHandle, ParticipantError> {
    let addr = listener.local_addr()?;
    let faults = Arc::new(Faults::default());
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let signal = async move {
        // A dropped handle leaves the server running (until the runtime stops).
        if shutdown_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let (run, admin_addr) = start(
        kind,
        listener,
        data_dir,
        Arc::clone(&faults),
        options,
        signal,
    )
    .await?;
    let task = tokio::spawn(run);
    Ok(ParticipantHandle {
        kind,
        addr,
        faults,
        admin_addr,
        shutdown: shutdown_tx,
        task,
    })
}

/// Serves `kind` until `shutdown` resolves, then drains the calls in flight and closes the
/// database.
pub async fn serve(
    kind: Kind,
    listener: TcpListener,
    data_dir: &Path,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ParticipantError> {
    serve_with(
        kind,
        listener,
        data_dir,
        ParticipantOptions::default(),
        shutdown,
    )
    .await
}

/// [`serve`], with server spans from `options.tracer` and the admin endpoints on
/// `options.admin` (served until the participant is closed).
pub async fn serve_with(
    kind: Kind,
    listener: TcpListener,
    data_dir: &Path,
    options: ParticipantOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ParticipantError> {
    let faults = Arc::new(Faults::default());
    start(kind, listener, data_dir, faults, options, shutdown)
        .await?
        .0
        .await
}

/// Opens the database, starts the admin server (if any) and builds the server; the returned
/// future serves until `shutdown`, then resolves once the database is closed and the admin
/// server stopped. Also returns the admin server's address.
async fn start(
    kind: Kind,
    listener: TcpListener,
    data_dir: &Path,
    faults: Arc<Faults>,
    options: ParticipantOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<
    (
        impl Future<Output = Result<(), ParticipantError>> + Send + 'static,
        Option<SocketAddr>,
    ),
    ParticipantError,
> {
    let addr = listener.local_addr()?;
    let (core, closed) = Core::open(kind, data_dir, Arc::clone(&faults))?;
    let serving = Arc::new(AtomicBool::new(true));
    let ledger = Arc::downgrade(&core);
    let Reporting { layer, admin } = Reporting::start(
        options,
        kind.as_str(),
        kind.service_name(),
        readiness(Arc::clone(&serving), Arc::downgrade(&core)),
        Some(Box::new(move || {
            ledger.upgrade().and_then(|core| core.ledger_entries().ok())
        })),
        Some(faults),
    )?;
    let admin_addr = admin.as_ref().map(|admin| admin.addr);

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(kind.service_name(), ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(kind.service_name())
        .with_service_name(HEALTH_SERVICE)
        .with_service_name(REFLECTION_SERVICE)
        .build_v1()?;

    let router = Server::builder()
        .layer(layer)
        .add_service(health)
        .add_service(reflection);
    let router = match kind {
        Kind::Payment => {
            router.add_service(PaymentServer::new(PaymentService::new(Arc::clone(&core))))
        }
        Kind::Store => router.add_service(StoreServer::new(StoreService::new(Arc::clone(&core)))),
        Kind::Rider => router.add_service(RiderServer::new(RiderService::new(Arc::clone(&core)))),
    };
    let data_dir = data_dir.to_path_buf();
    info!(participant = %kind, %addr, data = %data_dir.display(), "serving");

    Ok((
        async move {
            let signal = async move {
                shutdown.await;
                serving.store(false, Ordering::Release);
                info!(participant = %kind, "shutting down");
                reporter
                    .set_service_status("", ServingStatus::NotServing)
                    .await;
                reporter
                    .set_service_status(kind.service_name(), ServingStatus::NotServing)
                    .await;
            };
            let served = router
                .serve_with_incoming_shutdown(
                    // serve_with_incoming ignores the builder's nodelay: set it on the stream, or
                    // Nagle and delayed ACKs hold small replies back by ~40 ms.
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    signal,
                )
                .await;
            // Every call has drained: make the last writes durable, then wait for the last
            // reference to the core (a call task may still hold one) to close the database.
            let flushed = core.flush().await;
            drop(core);
            // Resolves (with "closed") once the core and its database are dropped.
            let _ = closed.await;
            info!(participant = %kind, data = %data_dir.display(), "closed");
            if let Some(admin) = admin {
                admin.stop(kind.as_str()).await;
            }
            served?;
            flushed
        },
        admin_addr,
    ))
}
