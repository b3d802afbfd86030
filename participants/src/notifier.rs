//! The notifier: a stand-in for a messenger that tells customers about their order. It
//! follows the orchestrator's change feed (`saga.v1.SagaOrchestrator/WatchSagas`), records
//! exactly one notification per change, in feed order, across disconnects and restarts of
//! either side, and serves them over `notifier.v1.Notifier` (with gRPC health and server
//! reflection, like the participants).
//!
//! Storage: one sled database in the data directory, with three trees:
//!
//! - `notifications`: `<cursor, 8 bytes big-endian>` → the encoded `notifier.v1.Notification`.
//! - `by_saga`: `<saga id> 0x00 <cursor, 8 bytes big-endian>` → empty: the index by saga.
//! - `meta`: `cursor` → the last consumed cursor (8 bytes big-endian).
//!
//! Each change is written by one transaction over the three trees, which ignores the change
//! when its cursor is not above the stored one (the duplicate guard). The changes already
//! received are then flushed together, and only after that flush does the notifier read the
//! next message: a notification is durable once [`NotifierHandle::cursor`] has reached its
//! cursor, and `ListNotifications` shows nothing beyond that cursor.
//!
//! The feed loop connects with `after_cursor` = the stored cursor; when the stream ends or
//! fails (or the orchestrator cannot be reached) it backs off, 50 ms doubling to 2 s with
//! jitter (reset once a connection delivered something), and connects again, until the
//! notifier is shut down. Shutdown is observed only while waiting (on the network or the
//! backoff), never between a write and its flush.

use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use prost::Message;
use proto::notifier::v1::notifier_server::{Notifier, NotifierServer};
use proto::notifier::v1::{ListNotificationsRequest, ListNotificationsResponse, Notification};
use proto::saga::v1::saga_orchestrator_client::SagaOrchestratorClient;
use proto::saga::v1::{SagaChange, SagaStatus, WatchSagasRequest};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic::{Request, Response, Status, Streaming};
use tonic_health::ServingStatus;
use tracing::{debug, error, info, warn};

use crate::ParticipantError;
use crate::observability::{ParticipantOptions, Reporting, readiness};
use crate::server::{HEALTH_SERVICE, REFLECTION_SERVICE};

/// The default listen address of `participant notifier`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50064";
/// The fully-qualified gRPC service name, "notifier.v1.Notifier".
pub const SERVICE_NAME: &str = proto::notifier::v1::notifier_server::SERVICE_NAME;

/// The first reconnect delay; it doubles after each fruitless attempt.
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
/// The longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// At most this many changes already received are written before one flush.
const MAX_BATCH: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings find an orchestrator that vanished without closing the connection (the feed
/// may be quiet for a long time, so they are sent while idle too).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

const CURSOR_KEY: &[u8] = b"cursor";
/// The separator between the saga id and the cursor in `by_saga` keys.
const SEPARATOR: u8 = 0x00;
/// `SagaStatus::as_str_name` without this prefix is a notification's status.
const STATUS_PREFIX: &str = "SAGA_STATUS_";
const LOG_NAME: &str = "notifier";

/// What the notifier follows and where it keeps its notifications.
#[derive(Debug, Clone)]
pub struct NotifierConfig {
    /// The orchestrator's gRPC endpoint, e.g. `http://127.0.0.1:50051`.
    pub orchestrator: String,
    /// The directory of the notifier's database (created if missing).
    pub data: PathBuf,
    /// Follow only the sagas of this definition (the feed's `definition` filter).
    pub definition: Option<String>,
}

/// A notifier running in the background, started by [`spawn_notifier`].
pub struct NotifierHandle {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    cursor: Arc<AtomicU64>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), ParticipantError>>,
}

impl std::fmt::Debug for NotifierHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifierHandle")
            .field("addr", &self.addr)
            .field("cursor", &self.cursor())
            .finish_non_exhaustive()
    }
}

impl NotifierHandle {
    /// The address the `notifier.v1.Notifier` server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the admin endpoints, when [`ParticipantOptions::admin`] was given.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The last cursor consumed from the orchestrator's feed and made durable: every change
    /// up to it is recorded (or was filtered out by the orchestrator).
    pub fn cursor(&self) -> u64 {
        self.cursor.load(Ordering::Acquire)
    }

    /// Stops the feed loop and the server, and waits until the database is flushed and
    /// closed (the data directory can be reopened as soon as this returns).
    pub async fn shutdown(self) -> Result<(), ParticipantError> {
        // The notifier may already have stopped (with an error the task returns below).
        let _ = self.shutdown.send(true);
        self.task.await?
    }
}

/// Starts the notifier on an already-bound listener: opens the database in `config.data`
/// (created if missing), serves `notifier.v1.Notifier` with gRPC health (SERVING for the
/// service and "") and server reflection (v1), and follows the orchestrator's feed from the
/// stored cursor. Returns once the server is running; the orchestrator need not be up.
pub async fn spawn_notifier(
    config: NotifierConfig,
    listener: TcpListener,
) -> Result<NotifierHandle, ParticipantError> {
    spawn_notifier_with(config, listener, ParticipantOptions::default()).await
}

/// [`spawn_notifier`], with server spans from `options.tracer` and the admin endpoints on
/// `options.admin`.
pub async fn spawn_notifier_with(
    config: NotifierConfig,
    listener: TcpListener,
    options: ParticipantOptions,
) -> Result<NotifierHandle, ParticipantError> {
    let addr = listener.local_addr()?;
    let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
    let signal = async move {
        // A dropped handle leaves the notifier running (until the runtime stops).
        if shutdown_rx.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let (run, cursor, admin_addr) = start(config, listener, options, signal).await?;
    let task = tokio::spawn(run);
    Ok(NotifierHandle {
        addr,
        admin_addr,
        cursor,
        shutdown: shutdown_tx,
        task,
    })
}

/// Runs the notifier until `shutdown` resolves, then stops the feed loop, drains the calls
/// in flight and closes the database.
pub async fn serve_notifier(
    config: NotifierConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ParticipantError> {
    serve_notifier_with(config, listener, ParticipantOptions::default(), shutdown).await
}

/// [`serve_notifier`], with server spans from `options.tracer` and the admin endpoints on
/// `options.admin` (served until the notifier is closed).
pub async fn serve_notifier_with(
    config: NotifierConfig,
    listener: TcpListener,
    options: ParticipantOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ParticipantError> {
    let (run, _cursor, _admin) = start(config, listener, options, shutdown).await?;
    run.await
}

/// Opens the database, starts the admin server (if any) and builds the server; the returned
/// future serves and follows the feed until `shutdown`, then resolves once the database is
/// closed and the admin server stopped.
async fn start(
    config: NotifierConfig,
    listener: TcpListener,
    options: ParticipantOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<
    (
        impl Future<Output = Result<(), ParticipantError>> + Send + 'static,
        Arc<AtomicU64>,
        Option<SocketAddr>,
    ),
    ParticipantError,
> {
    let addr = listener.local_addr()?;
    let endpoint = orchestrator_endpoint(&config.orchestrator)?;
    let (store, closed) = Store::open(&config.data)?;
    let cursor = Arc::clone(&store.durable);
    let serving = Arc::new(AtomicBool::new(true));
    let Reporting { layer, admin } = Reporting::start(
        options,
        LOG_NAME,
        SERVICE_NAME,
        readiness(Arc::clone(&serving), Arc::downgrade(&store)),
        None,
        None,
    )?;
    let admin_addr = admin.as_ref().map(|admin| admin.addr);

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(SERVICE_NAME)
        .with_service_name(HEALTH_SERVICE)
        .with_service_name(REFLECTION_SERVICE)
        .build_v1()?;
    let router = Server::builder()
        .layer(layer)
        .add_service(health)
        .add_service(reflection)
        .add_service(NotifierServer::new(NotifierService {
            store: Arc::clone(&store),
        }));

    let data = config.data;
    info!(
        participant = LOG_NAME,
        %addr,
        data = %data.display(),
        orchestrator = %config.orchestrator,
        definition = config.definition.as_deref().unwrap_or(""),
        cursor = store.durable(),
        "serving"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let feed = Feed {
        store: Arc::clone(&store),
        endpoint,
        url: config.orchestrator,
        definition: config.definition,
        stop: stop_rx,
    };

    let run = async move {
        let feed = tokio::spawn(feed.run());
        let stop_tx = Arc::new(stop_tx);
        let stop = Arc::clone(&stop_tx);
        let signal = async move {
            shutdown.await;
            serving.store(false, Ordering::Release);
            info!(participant = LOG_NAME, "shutting down");
            let _ = stop.send(true);
            reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
            reporter
                .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
                .await;
        };
        let served = router
            .serve_with_incoming_shutdown(
                // As in `server`: without nodelay, small replies wait for delayed ACKs.
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                signal,
            )
            .await;
        // Also when the server failed by itself: the feed loop stops with it.
        let _ = stop_tx.send(true);
        let fed = feed.await;
        // Every call has drained and the feed loop is done: make the last writes durable,
        // then wait for the last reference to the store (a call task may still hold one)
        // to close the database.
        let flushed = store.flush().await;
        drop(store);
        // Resolves (with "closed") once the store and its database are dropped.
        let _ = closed.await;
        info!(participant = LOG_NAME, data = %data.display(), "closed");
        if let Some(admin) = admin {
            admin.stop(LOG_NAME).await;
        }
        served?;
        fed?;
        flushed.map(drop)
    };
    Ok((run, cursor, admin_addr))
}

/// The orchestrator's endpoint, checked once: a plain `http://HOST:PORT` URL.
fn orchestrator_endpoint(url: &str) -> Result<Endpoint, ParticipantError> {
    let invalid = |reason: String| ParticipantError::OrchestratorUrl {
        url: url.to_owned(),
        reason,
    };
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| invalid(e.to_string()))?;
    if endpoint.uri().scheme_str() != Some("http") || endpoint.uri().authority().is_none() {
        return Err(invalid("expected http://HOST:PORT".to_owned()));
    }
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// The notification a change becomes.
fn notification(change: &SagaChange) -> Notification {
    let status = status_name(change.status);
    let what = if change.business_status.is_empty() {
        &status
    } else {
        &change.business_status
    };
    let text = format!("Order {}: {what}", change.saga_id);
    Notification {
        cursor: change.cursor,
        saga_id: change.saga_id.clone(),
        definition: change.definition.clone(),
        status,
        business_status: change.business_status.clone(),
        at: change.at,
        text,
    }
}

/// The status name without its prefix, e.g. "WAITING"; `UNKNOWN_<n>` for a value this
/// build does not know.
fn status_name(status: i32) -> String {
    match SagaStatus::try_from(status) {
        Ok(status) => {
            let name = status.as_str_name();
            name.strip_prefix(STATUS_PREFIX).unwrap_or(name).to_owned()
        }
        Err(_) => format!("UNKNOWN_{status}"),
    }
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// `<saga id> 0x00`: the prefix of a saga's keys in `by_saga`.
fn saga_prefix(saga_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(saga_id.len() + 9);
    key.extend_from_slice(saga_id.as_bytes());
    key.push(SEPARATOR);
    key
}

fn saga_key(saga_id: &str, cursor: u64) -> Vec<u8> {
    let mut key = saga_prefix(saga_id);
    key.extend_from_slice(&cursor.to_be_bytes());
    key
}

fn decode_notification(bytes: &[u8]) -> Result<Notification, ParticipantError> {
    Notification::decode(bytes).map_err(|e| ParticipantError::Corrupt(format!("notification: {e}")))
}

/// The notifier's database. The server and the feed loop share it through an `Arc`; the
/// notifier waits for the last reference to drop (the database closes with it) before it
/// reports closed.
struct Store {
    db: sled::Db,
    notifications: sled::Tree,
    by_saga: sled::Tree,
    meta: sled::Tree,
    /// The last cursor known to be durable: set on open and after each flush.
    durable: Arc<AtomicU64>,
    // Declared last, so dropped after the trees and `db`: its receiver fires once the
    // database is closed.
    _closed: oneshot::Sender<()>,
}

impl Store {
    /// Opens (creating if needed) the database at `data_dir`. The receiver resolves (with an
    /// error) once the returned store and its database are dropped.
    fn open(data_dir: &Path) -> Result<(Arc<Store>, oneshot::Receiver<()>), ParticipantError> {
        std::fs::create_dir_all(data_dir).map_err(|source| ParticipantError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let db = crate::core::open_db(data_dir)?;
        let notifications = db.open_tree("notifications")?;
        let by_saga = db.open_tree("by_saga")?;
        let meta = db.open_tree("meta")?;
        let (closed_tx, closed_rx) = oneshot::channel();
        let store = Store {
            db,
            notifications,
            by_saga,
            meta,
            durable: Arc::new(AtomicU64::new(0)),
            _closed: closed_tx,
        };
        // What a reopened database holds is durable.
        store
            .durable
            .store(store.stored_cursor()?, Ordering::Release);
        Ok((Arc::new(store), closed_rx))
    }

    fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// The last consumed cursor as written (durable after the next flush).
    fn stored_cursor(&self) -> Result<u64, ParticipantError> {
        match self.meta.get(CURSOR_KEY)? {
            None => Ok(0),
            Some(bytes) => decode_u64(&bytes)
                .ok_or_else(|| ParticipantError::Corrupt("the stored cursor".to_owned())),
        }
    }

    /// Records the notification of `change` with its index entry and the new cursor, in one
    /// transaction; `None` (and nothing written) when its cursor is not above the stored one.
    fn record(&self, change: &SagaChange) -> Result<Option<Notification>, ParticipantError> {
        let notification = notification(change);
        let value = notification.encode_to_vec();
        let cursor = change.cursor.to_be_bytes();
        let index = saga_key(&change.saga_id, change.cursor);
        let recorded = (&self.notifications, &self.by_saga, &self.meta)
            .transaction(|(notifications, by_saga, meta)| {
                let stored = match meta.get(CURSOR_KEY)? {
                    None => 0,
                    Some(bytes) => decode_u64(&bytes).ok_or_else(|| {
                        ConflictableTransactionError::Abort("the stored cursor".to_owned())
                    })?,
                };
                if change.cursor <= stored {
                    return Ok(false);
                }
                notifications.insert(&cursor[..], value.as_slice())?;
                by_saga.insert(index.as_slice(), &[][..])?;
                meta.insert(CURSOR_KEY, &cursor[..])?;
                Ok(true)
            })
            .map_err(|e| match e {
                TransactionError::Abort(what) => ParticipantError::Corrupt(what),
                TransactionError::Storage(e) => ParticipantError::Storage(e),
            })?;
        Ok(recorded.then_some(notification))
    }

    /// Makes everything written so far durable and returns the durable cursor.
    ///
    /// Not `sled::Db::flush_async`, which can deadlock sled's thread pool (see
    /// `core::Core::flush`): a blocking flush on tokio's blocking pool.
    async fn flush(&self) -> Result<u64, ParticipantError> {
        // Read before the flush: everything written up to this cursor is covered by it.
        let cursor = self.stored_cursor()?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush()).await??;
        self.durable.fetch_max(cursor, Ordering::AcqRel);
        Ok(self.durable())
    }

    /// The durable notifications, oldest first, of one saga or (`saga_id` empty) of all,
    /// and the durable cursor they go up to.
    fn list(&self, saga_id: &str) -> Result<(Vec<Notification>, u64), ParticipantError> {
        let cursor = self.durable();
        if saga_id.is_empty() {
            let notifications = self
                .notifications
                .range(..=cursor.to_be_bytes())
                .values()
                .map(|value| decode_notification(&value?))
                .collect::<Result<_, _>>()?;
            return Ok((notifications, cursor));
        }
        let prefix = saga_prefix(saga_id);
        let mut notifications = Vec::new();
        for key in self.by_saga.scan_prefix(&prefix).keys() {
            let key = key?;
            // Exactly 8 bytes after the prefix, or the key belongs to another saga whose id
            // starts with `<saga_id> 0x00`.
            let Some(at) = key.get(prefix.len()..).and_then(decode_u64) else {
                continue;
            };
            if at > cursor {
                continue;
            }
            let value = self.notifications.get(at.to_be_bytes())?.ok_or_else(|| {
                ParticipantError::Corrupt(format!("index entry without notification {at}"))
            })?;
            notifications.push(decode_notification(&value)?);
        }
        Ok((notifications, cursor))
    }
}

/// The `notifier.v1.Notifier` service.
struct NotifierService {
    store: Arc<Store>,
}

#[tonic::async_trait]
impl Notifier for NotifierService {
    async fn list_notifications(
        &self,
        request: Request<ListNotificationsRequest>,
    ) -> Result<Response<ListNotificationsResponse>, Status> {
        const METHOD: &str = "ListNotifications";
        let saga_id = request.into_inner().saga_id;
        let (notifications, cursor) = self.store.list(&saga_id).map_err(|e| {
            error!(participant = LOG_NAME, method = METHOD, cause = %e, "cannot read the notifications");
            Status::internal(format!("storage failure: {e}"))
        })?;
        info!(
            participant = LOG_NAME,
            method = METHOD,
            saga.id = %saga_id,
            notifications = notifications.len(),
            cursor,
            "call"
        );
        Ok(Response::new(ListNotificationsResponse {
            notifications,
            cursor,
        }))
    }
}

/// Why a connection to the feed ended. Logged with its sources, see [`chain`].
#[derive(Debug, thiserror::Error)]
enum FeedError {
    #[error("cannot connect")]
    Connect(#[from] tonic::transport::Error),
    #[error("the feed failed: {} ({:?})", .0.message(), .0.code())]
    Feed(Status),
    #[error("cannot record")]
    Storage(#[from] ParticipantError),
}

impl From<Status> for FeedError {
    fn from(status: Status) -> Self {
        FeedError::Feed(status)
    }
}

/// The error's message followed by those of its sources (tonic's transport error alone
/// just says "transport error"), skipping a source its parent already quoted.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let message = e.to_string();
        if !text.ends_with(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = e.source();
    }
    text
}

/// How a connection to the feed ended, when not with an error.
enum Ended {
    /// The notifier is shutting down.
    Stopped,
    /// The orchestrator ended the stream.
    Closed,
}

/// The feed loop: connects, records, reconnects, until stopped.
struct Feed {
    store: Arc<Store>,
    endpoint: Endpoint,
    url: String,
    definition: Option<String>,
    stop: watch::Receiver<bool>,
}

impl Feed {
    async fn run(mut self) {
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let mut received = 0;
            let ended = self.connection(&mut received).await;
            let cause = match ended {
                Ok(Ended::Stopped) => break,
                Ok(Ended::Closed) => "the orchestrator ended the stream".to_owned(),
                Err(e) => chain(&e),
            };
            if received > 0 {
                backoff = INITIAL_BACKOFF;
            }
            let delay = jittered(backoff);
            warn!(
                participant = LOG_NAME,
                orchestrator = %self.url,
                cursor = self.store.durable(),
                received,
                %cause,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "feed disconnected, reconnecting"
            );
            tokio::select! {
                () = stopped(self.stop.clone()) => break,
                () = tokio::time::sleep(delay) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        debug!(participant = LOG_NAME, "feed loop stopped");
    }

    /// One connection: from the stored cursor until the stream ends, fails, or the notifier
    /// stops. `received` counts the changes it delivered.
    async fn connection(&mut self, received: &mut u64) -> Result<Ended, FeedError> {
        // Normally a no-op: makes the cursor durable if a flush failed last time, so that
        // nothing past the durable cursor is ever asked for.
        let after = self.store.flush().await?;
        let stop = stopped(self.stop.clone());
        tokio::pin!(stop);
        let channel = tokio::select! {
            () = &mut stop => return Ok(Ended::Stopped),
            channel = self.endpoint.connect() => channel?,
        };
        let request = WatchSagasRequest {
            status: SagaStatus::Unspecified as i32,
            definition: self.definition.clone().unwrap_or_default(),
            after_cursor: after,
        };
        let mut client = SagaOrchestratorClient::new(channel);
        let mut stream = tokio::select! {
            () = &mut stop => return Ok(Ended::Stopped),
            response = client.watch_sagas(request) => response?.into_inner(),
        };
        info!(participant = LOG_NAME, orchestrator = %self.url, after_cursor = after, "feed connected");
        let mut last = after;
        loop {
            let first = tokio::select! {
                () = &mut stop => return Ok(Ended::Stopped),
                message = stream.message() => message?,
            };
            let Some(first) = first else {
                return Ok(Ended::Closed);
            };
            let mut batch = vec![first];
            let end = drain_ready(&mut stream, &mut batch);
            *received += batch.len() as u64;
            self.record(&batch, &mut last).await?;
            match end {
                Some(Ok(())) => return Ok(Ended::Closed),
                Some(Err(status)) => return Err(status.into()),
                None => {}
            }
        }
    }

    /// Records a batch of changes, one transaction each, then flushes once.
    async fn record(&self, batch: &[SagaChange], last: &mut u64) -> Result<(), FeedError> {
        let mut recorded = Vec::with_capacity(batch.len());
        for change in batch {
            // The store's transaction is the duplicate guard.
            let Some(notification) = self.store.record(change)? else {
                debug!(
                    participant = LOG_NAME,
                    cursor = change.cursor,
                    "duplicate change ignored"
                );
                continue;
            };
            if self.definition.is_none() && change.cursor != *last + 1 {
                // The unfiltered feed has no gaps; a filtered one skips the other sagas.
                warn!(
                    participant = LOG_NAME,
                    after = *last,
                    cursor = change.cursor,
                    "gap in the change feed"
                );
            }
            *last = change.cursor;
            recorded.push(notification);
        }
        self.store.flush().await?;
        for n in recorded {
            info!(
                participant = LOG_NAME,
                saga.id = %n.saga_id,
                cursor = n.cursor,
                status = %n.status,
                text = %n.text,
                "notified"
            );
        }
        Ok(())
    }
}

/// Moves the changes `stream` already holds into `batch` (up to [`MAX_BATCH`]) without
/// waiting; `Some` when the stream ended (`Ok`) or failed while doing so.
fn drain_ready(
    stream: &mut Streaming<SagaChange>,
    batch: &mut Vec<SagaChange>,
) -> Option<Result<(), Status>> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    while batch.len() < MAX_BATCH {
        match Pin::new(&mut *stream).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(change))) => batch.push(change),
            Poll::Ready(Some(Err(status))) => return Some(Err(status)),
            Poll::Ready(None) => return Some(Ok(())),
            Poll::Pending => break,
        }
    }
    None
}

/// Resolves once the notifier is told to stop (or its stop sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// A delay drawn uniformly from `[backoff / 2, backoff]`, so that notifiers (and attempts)
/// do not reconnect in lockstep.
fn jittered(backoff: Duration) -> Duration {
    let half = backoff / 2;
    let span = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    // std's randomly keyed hasher is random enough for jitter.
    let random = RandomState::new().hash_one(span);
    half + Duration::from_nanos(random % span.saturating_add(1))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn change(cursor: u64, saga_id: &str, status: SagaStatus, business: &str) -> SagaChange {
        SagaChange {
            cursor,
            saga_id: saga_id.to_owned(),
            definition: "order".to_owned(),
            version: 1,
            status: status as i32,
            business_status: business.to_owned(),
            at: None,
            seq: cursor,
        }
    }

    #[test]
    fn text_uses_the_business_status_or_the_status_name() {
        let n = notification(&change(3, "s-1", SagaStatus::Waiting, "cooking"));
        assert_eq!(n.text, "Order s-1: cooking");
        assert_eq!(n.status, "WAITING");
        assert_eq!(n.business_status, "cooking");
        assert_eq!(n.cursor, 3);
        let n = notification(&change(4, "s-1", SagaStatus::Completed, ""));
        assert_eq!(n.text, "Order s-1: COMPLETED");
        assert_eq!(status_name(42), "UNKNOWN_42");
    }

    #[test]
    fn jitter_stays_within_half_and_full_backoff() {
        for _ in 0..100 {
            let d = jittered(Duration::from_millis(100));
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_millis(100),
                "{d:?}"
            );
        }
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn orchestrator_url_must_be_http() {
        assert!(orchestrator_endpoint("http://127.0.0.1:50051").is_ok());
        for bad in [
            "127.0.0.1:50051",
            "https://127.0.0.1:50051",
            "http://",
            "not a url",
        ] {
            assert!(
                matches!(
                    orchestrator_endpoint(bad),
                    Err(ParticipantError::OrchestratorUrl { .. })
                ),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn the_store_ignores_changes_at_or_below_its_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _closed) = Store::open(dir.path()).unwrap();
        assert!(
            store
                .record(&change(1, "s-1", SagaStatus::Running, ""))
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .record(&change(2, "s-10", SagaStatus::Running, ""))
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .record(&change(2, "s-1", SagaStatus::Waiting, ""))
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .record(&change(1, "s-1", SagaStatus::Running, ""))
                .unwrap()
                .is_none()
        );
        // Written but not yet durable: not listed.
        assert_eq!(store.list("").unwrap(), (vec![], 0));
        assert_eq!(store.flush().await.unwrap(), 2);
        let (all, cursor) = store.list("").unwrap();
        assert_eq!(cursor, 2);
        assert_eq!(all.iter().map(|n| n.cursor).collect::<Vec<_>>(), [1, 2]);
        // "s-1" is not a prefix match of "s-10".
        let (one, _) = store.list("s-1").unwrap();
        assert_eq!(one.iter().map(|n| n.cursor).collect::<Vec<_>>(), [1]);
        assert!(store.list("s-").unwrap().0.is_empty());
    }

    #[tokio::test]
    async fn saga_ids_with_the_separator_do_not_leak_into_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _closed) = Store::open(dir.path()).unwrap();
        store
            .record(&change(1, "a", SagaStatus::Running, ""))
            .unwrap();
        store
            .record(&change(2, "a\0b", SagaStatus::Running, ""))
            .unwrap();
        store.flush().await.unwrap();
        let cursors = |id| {
            let (list, _) = store.list(id).unwrap();
            list.iter().map(|n| n.cursor).collect::<Vec<_>>()
        };
        assert_eq!(cursors("a"), [1]);
        assert_eq!(cursors("a\0b"), [2]);
    }
}
