//! The notifier against a fake orchestrator whose change feed (`WatchSagas`) serves a
//! scripted, growing list of changes, and can be told to cut its streams, to replay changes
//! already delivered, to refuse calls, or to stop and start again on the same port.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use participants::{NotifierConfig, NotifierHandle};
use proto::notifier::v1::notifier_client::NotifierClient;
use proto::notifier::v1::{ListNotificationsRequest, ListNotificationsResponse, Notification};
use proto::saga::v1::saga_orchestrator_server::{SagaOrchestrator, SagaOrchestratorServer};
use proto::saga::v1::{
    CancelSagaRequest, CancelSagaResponse, CircuitBreaker, Definition, GetDefinitionRequest,
    GetSagaRequest, ListCircuitBreakersRequest, ListCircuitBreakersResponse,
    ListDefinitionsRequest, ListDefinitionsResponse, ListSagasRequest, ListSagasResponse,
    PutDefinitionRequest, PutDefinitionResponse, Saga, SagaChange, SagaEvent, SagaStatus,
    SetCircuitBreakerRequest, SignalSagaRequest, SignalSagaResponse, StartSagaRequest,
    StartSagaResponse, WatchSagaRequest, WatchSagasRequest,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// How long a test waits for something before failing.
const DEADLINE: Duration = Duration::from_secs(30);
/// How often a test polls while it waits.
const POLL: Duration = Duration::from_millis(10);

// ---- the script: what the fake orchestrator's feed holds and how it misbehaves ----

/// How a fake stream is cut.
#[derive(Debug, Clone, Copy)]
struct Cut {
    /// After this many changes sent on one stream...
    after: usize,
    /// ...the stream fails with UNAVAILABLE (true) or just ends (false).
    fail: bool,
}

/// The orchestrator's side: its changes (which survive its restarts) and its behaviour.
struct Script {
    changes: watch::Sender<Vec<SagaChange>>,
    cut: Mutex<Option<Cut>>,
    /// Each stream starts this many changes before `after_cursor`: a feed that repeats
    /// itself, which the notifier's duplicate guard must absorb. The repeats are altered
    /// (business status "replayed"), so that one that got through would show.
    overlap: AtomicU64,
    /// WatchSagas fails at once with UNAVAILABLE.
    refuse: AtomicBool,
    /// Every WatchSagas request received, refused ones included.
    requests: Mutex<Vec<WatchSagasRequest>>,
}

impl Script {
    fn new() -> Arc<Script> {
        Arc::new(Script {
            changes: watch::channel(Vec::new()).0,
            cut: Mutex::new(None),
            overlap: AtomicU64::new(0),
            refuse: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
        })
    }

    /// Appends `count` changes of the standard script; returns the last cursor.
    fn append(&self, count: u64) -> u64 {
        let first = self.last() + 1;
        self.push((first..first + count).map(order_change).collect())
    }

    /// Appends `changes`, whose cursors must continue the feed; returns the last cursor.
    fn push(&self, changes: Vec<SagaChange>) -> u64 {
        self.changes.send_modify(|all| {
            for change in changes {
                assert_eq!(change.cursor, all.len() as u64 + 1, "a gap in the script");
                all.push(change);
            }
        });
        self.last()
    }

    fn last(&self) -> u64 {
        self.changes.borrow().len() as u64
    }

    fn all(&self) -> Vec<SagaChange> {
        self.changes.borrow().clone()
    }

    fn set_cut(&self, cut: Option<Cut>) {
        *self.cut.lock().unwrap() = cut;
    }

    fn requests(&self) -> Vec<WatchSagasRequest> {
        self.requests.lock().unwrap().clone()
    }
}

/// The `cursor`-th change of the standard script: three orders, interleaved, each going
/// through placed, waiting for the store, cooking, on the way, completed (then again).
fn order_change(cursor: u64) -> SagaChange {
    const STEPS: [(SagaStatus, &str); 5] = [
        (SagaStatus::Running, "order placed"),
        (SagaStatus::Waiting, "waiting for the store"),
        (SagaStatus::Running, "cooking"),
        (SagaStatus::Running, "on the way"),
        (SagaStatus::Completed, ""),
    ];
    let saga = (cursor - 1) % 3 + 1;
    let step = (cursor - 1) / 3;
    let (status, business_status) = STEPS[(step % 5) as usize];
    change(
        cursor,
        &format!("s-{saga}"),
        "order",
        status,
        business_status,
    )
}

fn change(
    cursor: u64,
    saga_id: &str,
    definition: &str,
    status: SagaStatus,
    business_status: &str,
) -> SagaChange {
    SagaChange {
        cursor,
        saga_id: saga_id.to_owned(),
        definition: definition.to_owned(),
        version: 1,
        status: status as i32,
        business_status: business_status.to_owned(),
        at: Some(prost_types::Timestamp {
            seconds: 1_750_000_000 + i64::try_from(cursor).unwrap(),
            nanos: 0,
        }),
        seq: cursor * 10,
    }
}

/// The notification a change must become (written out here, not taken from the crate).
fn expected(change: &SagaChange) -> Notification {
    let status = match SagaStatus::try_from(change.status).unwrap() {
        SagaStatus::Running => "RUNNING",
        SagaStatus::Waiting => "WAITING",
        SagaStatus::Completed => "COMPLETED",
        SagaStatus::Compensated => "COMPENSATED",
        other => panic!("not in the script: {other:?}"),
    };
    let what = if change.business_status.is_empty() {
        status
    } else {
        &change.business_status
    };
    Notification {
        cursor: change.cursor,
        saga_id: change.saga_id.clone(),
        definition: change.definition.clone(),
        status: status.to_owned(),
        business_status: change.business_status.clone(),
        at: change.at,
        text: format!("Order {}: {what}", change.saga_id),
    }
}

// ---- the fake orchestrator ----

struct FakeOrchestrator {
    script: Arc<Script>,
    /// Set when the server stops: its open streams end with UNAVAILABLE.
    stopping: watch::Receiver<bool>,
}

fn unimplemented() -> Status {
    Status::unimplemented("not in the fake orchestrator")
}

#[tonic::async_trait]
impl SagaOrchestrator for FakeOrchestrator {
    type WatchSagaStream = tokio_stream::Empty<Result<SagaEvent, Status>>;
    type WatchSagasStream = ReceiverStream<Result<SagaChange, Status>>;

    async fn start_saga(
        &self,
        _: Request<StartSagaRequest>,
    ) -> Result<Response<StartSagaResponse>, Status> {
        Err(unimplemented())
    }

    async fn get_saga(&self, _: Request<GetSagaRequest>) -> Result<Response<Saga>, Status> {
        Err(unimplemented())
    }

    async fn list_sagas(
        &self,
        _: Request<ListSagasRequest>,
    ) -> Result<Response<ListSagasResponse>, Status> {
        Err(unimplemented())
    }

    async fn watch_saga(
        &self,
        _: Request<WatchSagaRequest>,
    ) -> Result<Response<Self::WatchSagaStream>, Status> {
        Err(unimplemented())
    }

    async fn cancel_saga(
        &self,
        _: Request<CancelSagaRequest>,
    ) -> Result<Response<CancelSagaResponse>, Status> {
        Err(unimplemented())
    }

    async fn signal_saga(
        &self,
        _: Request<SignalSagaRequest>,
    ) -> Result<Response<SignalSagaResponse>, Status> {
        Err(unimplemented())
    }

    async fn watch_sagas(
        &self,
        request: Request<WatchSagasRequest>,
    ) -> Result<Response<Self::WatchSagasStream>, Status> {
        let request = request.into_inner();
        self.script.requests.lock().unwrap().push(request.clone());
        if self.script.refuse.load(Ordering::SeqCst) {
            return Err(Status::unavailable("refused (scripted)"));
        }
        let (tx, rx) = mpsc::channel(16);
        let script = Arc::clone(&self.script);
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let mut changes = script.changes.subscribe();
            let cut = *script.cut.lock().unwrap();
            let overlap = script.overlap.load(Ordering::SeqCst);
            let mut position = request.after_cursor.saturating_sub(overlap);
            let mut sent = 0;
            loop {
                let pending: Vec<SagaChange> = changes
                    .borrow_and_update()
                    .iter()
                    .filter(|c| c.cursor > position)
                    .cloned()
                    .collect();
                for change in pending {
                    position = change.cursor;
                    let wanted = (request.definition.is_empty()
                        || request.definition == change.definition)
                        && (request.status == 0 || request.status == change.status);
                    if !wanted {
                        continue;
                    }
                    if let Some(cut) = cut
                        && sent == cut.after
                    {
                        if cut.fail {
                            let _ = tx.send(Err(Status::unavailable("cut (scripted)"))).await;
                        }
                        return;
                    }
                    let mut change = change;
                    if change.cursor <= request.after_cursor {
                        // A replay, altered so that one that got through would show.
                        change.business_status = "replayed".to_owned();
                    }
                    if tx.send(Ok(change)).await.is_err() {
                        return;
                    }
                    sent += 1;
                }
                let stop = async {
                    let _ = stopping.wait_for(|stop| *stop).await;
                };
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    () = stop => {
                        let _ = tx.send(Err(Status::unavailable("the orchestrator is stopping"))).await;
                        return;
                    }
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn put_definition(
        &self,
        _: Request<PutDefinitionRequest>,
    ) -> Result<Response<PutDefinitionResponse>, Status> {
        Err(unimplemented())
    }

    async fn get_definition(
        &self,
        _: Request<GetDefinitionRequest>,
    ) -> Result<Response<Definition>, Status> {
        Err(unimplemented())
    }

    async fn list_definitions(
        &self,
        _: Request<ListDefinitionsRequest>,
    ) -> Result<Response<ListDefinitionsResponse>, Status> {
        Err(unimplemented())
    }

    async fn list_circuit_breakers(
        &self,
        _: Request<ListCircuitBreakersRequest>,
    ) -> Result<Response<ListCircuitBreakersResponse>, Status> {
        Err(unimplemented())
    }

    async fn set_circuit_breaker(
        &self,
        _: Request<SetCircuitBreakerRequest>,
    ) -> Result<Response<CircuitBreaker>, Status> {
        Err(unimplemented())
    }
}

/// A running fake orchestrator.
struct Orchestrator {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Orchestrator {
    /// Serves `script` on `addr` (127.0.0.1:0 for any port).
    async fn start(script: &Arc<Script>, addr: SocketAddr) -> Orchestrator {
        let listener = bind(addr).await;
        let addr = listener.local_addr().unwrap();
        let (stop, stopping) = watch::channel(false);
        let service = SagaOrchestratorServer::new(FakeOrchestrator {
            script: Arc::clone(script),
            stopping: stopping.clone(),
        });
        let mut signal = stopping;
        let task = tokio::spawn(async move {
            Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async move {
                    let _ = signal.wait_for(|stop| *stop).await;
                })
                .await
                .unwrap();
        });
        Orchestrator { addr, stop, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Ends its streams (UNAVAILABLE), drains its connections and closes its port.
    async fn stop(self) {
        self.stop.send_replace(true);
        self.task.await.unwrap();
    }
}

/// Binds `addr`, retrying while a just-closed listener still holds a fixed port.
async fn bind(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(e) if Instant::now() < deadline && addr.port() != 0 => {
                eprintln!("cannot bind {addr} yet: {e}");
                tokio::time::sleep(POLL).await;
            }
            Err(e) => panic!("cannot bind {addr}: {e}"),
        }
    }
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

// ---- the notifier side ----

async fn start_notifier(url: &str, dir: &Path, definition: Option<&str>) -> NotifierHandle {
    let config = NotifierConfig {
        orchestrator: url.to_owned(),
        data: dir.to_path_buf(),
        definition: definition.map(str::to_owned),
    };
    let listener = TcpListener::bind(any_port()).await.unwrap();
    participants::spawn_notifier(config, listener)
        .await
        .unwrap()
}

async fn channel(handle: &NotifierHandle) -> Channel {
    Channel::from_shared(format!("http://{}", handle.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn list(handle: &NotifierHandle, saga_id: &str) -> ListNotificationsResponse {
    NotifierClient::new(channel(handle).await)
        .list_notifications(ListNotificationsRequest {
            saga_id: saga_id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Polls `check` until it holds; fails the test after [`DEADLINE`].
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

async fn wait_for_cursor(handle: &NotifierHandle, cursor: u64) {
    eventually(&format!("cursor {cursor}"), || handle.cursor() >= cursor).await;
    assert_eq!(handle.cursor(), cursor, "consumed past the end of the feed");
}

/// Checks that the notifier holds exactly one notification per change of the script, in
/// order, and reports the script's last cursor.
async fn assert_all_notified(handle: &NotifierHandle, script: &Script) {
    let reply = list(handle, "").await;
    let want: Vec<Notification> = script.all().iter().map(expected).collect();
    for (got, want) in reply.notifications.iter().zip(&want) {
        assert_eq!(got, want);
    }
    assert_eq!(reply.notifications.len(), want.len());
    assert_eq!(reply.cursor, script.last());
}

// ---- the tests ----

#[tokio::test]
async fn every_change_becomes_one_notification_in_order() {
    let script = Script::new();
    let orchestrator = Orchestrator::start(&script, any_port()).await;
    let dir = tempfile::tempdir().unwrap();
    // Some history before the notifier starts, then live changes in several bursts.
    script.append(10);
    let notifier = start_notifier(&orchestrator.url(), dir.path(), None).await;
    wait_for_cursor(&notifier, 10).await;
    for _ in 0..5 {
        script.append(4);
    }
    let last = script.append(1);
    wait_for_cursor(&notifier, last).await;
    assert_all_notified(&notifier, &script).await;

    // One connection, from the start of the feed, with no filter.
    let requests = script.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].after_cursor, 0);
    assert_eq!(requests[0].definition, "");
    assert_eq!(requests[0].status, SagaStatus::Unspecified as i32);

    let texts: Vec<String> = list(&notifier, "s-1")
        .await
        .notifications
        .into_iter()
        .map(|n| n.text)
        .collect();
    assert_eq!(
        texts[..5],
        [
            "Order s-1: order placed",
            "Order s-1: waiting for the store",
            "Order s-1: cooking",
            "Order s-1: on the way",
            "Order s-1: COMPLETED",
        ]
    );

    notifier.shutdown().await.unwrap();
    orchestrator.stop().await;
}

#[tokio::test]
async fn cut_and_repeating_streams_lose_and_repeat_nothing() {
    let script = Script::new();
    let orchestrator = Orchestrator::start(&script, any_port()).await;
    let dir = tempfile::tempdir().unwrap();
    // Each stream replays the last change already delivered, then sends three new ones,
    // then fails.
    script.overlap.store(1, Ordering::SeqCst);
    script.set_cut(Some(Cut {
        after: 4,
        fail: true,
    }));
    script.append(30);
    let notifier = start_notifier(&orchestrator.url(), dir.path(), None).await;
    wait_for_cursor(&notifier, 30).await;
    assert_all_notified(&notifier, &script).await;

    // Now the streams end cleanly instead, while changes keep coming.
    script.set_cut(Some(Cut {
        after: 2,
        fail: false,
    }));
    script.overlap.store(0, Ordering::SeqCst);
    for _ in 0..10 {
        script.append(3);
    }
    wait_for_cursor(&notifier, 60).await;
    assert_all_notified(&notifier, &script).await;

    let requests = script.requests();
    assert!(requests.len() >= 20, "{} streams", requests.len());
    // Every reconnection resumed from the last cursor consumed, never from an older one.
    for pair in requests.windows(2) {
        assert!(
            pair[0].after_cursor < pair[1].after_cursor,
            "{:?}",
            requests.iter().map(|r| r.after_cursor).collect::<Vec<_>>()
        );
    }

    notifier.shutdown().await.unwrap();
    orchestrator.stop().await;
}

#[tokio::test]
async fn a_restarted_notifier_continues_from_its_cursor() {
    let script = Script::new();
    let orchestrator = Orchestrator::start(&script, any_port()).await;
    let dir = tempfile::tempdir().unwrap();
    script.append(10);
    let notifier = start_notifier(&orchestrator.url(), dir.path(), None).await;
    wait_for_cursor(&notifier, 10).await;
    notifier.shutdown().await.unwrap();

    // Changes made while the notifier is down are picked up when it is back.
    script.append(10);
    let seen = script.requests().len();
    let notifier = start_notifier(&orchestrator.url(), dir.path(), None).await;
    wait_for_cursor(&notifier, 20).await;
    assert_eq!(script.requests()[seen].after_cursor, 10);
    assert_all_notified(&notifier, &script).await;

    // Stopped in the middle of a long feed, several times.
    script.set_cut(Some(Cut {
        after: 7,
        fail: true,
    }));
    let last = script.append(300);
    let mut notifier = notifier;
    for _ in 0..3 {
        let before = notifier.cursor();
        notifier.shutdown().await.unwrap();
        let seen = script.requests().len();
        notifier = start_notifier(&orchestrator.url(), dir.path(), None).await;
        assert!(notifier.cursor() >= before);
        eventually("the restarted notifier to reconnect", || {
            script.requests().len() > seen
        })
        .await;
        assert!(script.requests()[seen].after_cursor >= before);
    }
    wait_for_cursor(&notifier, last).await;
    assert_all_notified(&notifier, &script).await;

    notifier.shutdown().await.unwrap();
    orchestrator.stop().await;
}

#[tokio::test]
async fn the_notifier_reconnects_after_the_orchestrator_restarts() {
    let script = Script::new();
    let orchestrator = Orchestrator::start(&script, any_port()).await;
    let addr = orchestrator.addr;
    let dir = tempfile::tempdir().unwrap();
    script.append(5);
    let notifier = start_notifier(&orchestrator.url(), dir.path(), None).await;
    wait_for_cursor(&notifier, 5).await;

    // The orchestrator goes away; changes are committed while it comes back.
    orchestrator.stop().await;
    script.append(5);
    // While it restarts, its port accepts connections and drops them: the notifier must
    // keep trying.
    let flaky = bind(addr).await;
    for _ in 0..3 {
        let (connection, _) = flaky.accept().await.unwrap();
        drop(connection);
    }
    drop(flaky);
    // Back, but refusing the feed for a while.
    script.refuse.store(true, Ordering::SeqCst);
    let seen = script.requests().len();
    let orchestrator = Orchestrator::start(&script, addr).await;
    eventually("refused attempts", || script.requests().len() >= seen + 3).await;
    assert_eq!(notifier.cursor(), 5);
    script.refuse.store(false, Ordering::SeqCst);
    wait_for_cursor(&notifier, 10).await;

    // And once more without a pause.
    orchestrator.stop().await;
    let orchestrator = Orchestrator::start(&script, addr).await;
    let last = script.append(5);
    wait_for_cursor(&notifier, last).await;
    assert_all_notified(&notifier, &script).await;

    notifier.shutdown().await.unwrap();
    orchestrator.stop().await;
}

#[tokio::test]
async fn list_notifications_filters_by_saga() {
    let script = Script::new();
    let orchestrator = Orchestrator::start(&script, any_port()).await;
    let dir = tempfile::tempdir().unwrap();
    let last = script.push(vec![
        change(1, "s-1", "order", SagaStatus::Running, "order placed"),
        change(2, "s-10", "order", SagaStatus::Running, "order placed"),
        change(
            3,
            "s-1",
            "order",
            SagaStatus::Waiting,
            "waiting for the store",
        ),
        change(4, "s-2", "order", SagaStatus::Running, "order placed"),
        change(5, "s-10", "order", SagaStatus::Compensated, ""),
        change(6, "s-1", "order", SagaStatus::Running, "cooking"),
    ]);
    let notifier = start_notifier(&orchestrator.url(), dir.path(), None).await;
    wait_for_cursor(&notifier, last).await;

    let of = |reply: ListNotificationsResponse| {
        assert_eq!(reply.cursor, last);
        reply
            .notifications
            .iter()
            .map(|n| (n.cursor, n.saga_id.clone(), n.text.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        of(list(&notifier, "s-1").await),
        [
            (1, "s-1".to_owned(), "Order s-1: order placed".to_owned()),
            (
                3,
                "s-1".to_owned(),
                "Order s-1: waiting for the store".to_owned()
            ),
            (6, "s-1".to_owned(), "Order s-1: cooking".to_owned()),
        ]
    );
    assert_eq!(
        of(list(&notifier, "s-10").await),
        [
            (2, "s-10".to_owned(), "Order s-10: order placed".to_owned()),
            (5, "s-10".to_owned(), "Order s-10: COMPENSATED".to_owned()),
        ]
    );
    assert!(of(list(&notifier, "s-").await).is_empty());
    assert!(of(list(&notifier, "nope").await).is_empty());
    assert_eq!(of(list(&notifier, "").await).len(), 6);

    notifier.shutdown().await.unwrap();
    orchestrator.stop().await;
}

#[tokio::test]
async fn the_definition_filter_is_passed_to_the_feed() {
    let script = Script::new();
    let orchestrator = Orchestrator::start(&script, any_port()).await;
    let dir = tempfile::tempdir().unwrap();
    script.push(vec![
        change(1, "o-1", "order", SagaStatus::Running, "order placed"),
        change(2, "g-1", "grocery", SagaStatus::Running, "basket received"),
        change(3, "o-1", "order", SagaStatus::Completed, "delivered"),
        change(4, "g-1", "grocery", SagaStatus::Completed, ""),
    ]);
    let notifier = start_notifier(&orchestrator.url(), dir.path(), Some("order")).await;
    wait_for_cursor(&notifier, 3).await;
    let reply = list(&notifier, "").await;
    let cursors: Vec<u64> = reply.notifications.iter().map(|n| n.cursor).collect();
    assert_eq!(cursors, [1, 3]);
    assert!(reply.notifications.iter().all(|n| n.definition == "order"));
    assert!(script.requests().iter().all(|r| r.definition == "order"));

    notifier.shutdown().await.unwrap();
    orchestrator.stop().await;
}

#[tokio::test]
async fn shutdown_is_prompt_while_the_orchestrator_is_unreachable() {
    // A port nobody listens on.
    let addr = TcpListener::bind(any_port())
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let notifier = start_notifier(&format!("http://{addr}"), dir.path(), None).await;
        assert_eq!(notifier.cursor(), 0);
        assert!(list(&notifier, "").await.notifications.is_empty());
        tokio::time::timeout(Duration::from_secs(10), notifier.shutdown())
            .await
            .expect("shutdown hangs")
            .unwrap();
    }
}

#[tokio::test]
async fn a_bad_orchestrator_url_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = NotifierConfig {
        orchestrator: "127.0.0.1:50051".to_owned(),
        data: dir.path().to_path_buf(),
        definition: None,
    };
    let listener = TcpListener::bind(any_port()).await.unwrap();
    let err = participants::spawn_notifier(config, listener)
        .await
        .unwrap_err();
    assert!(
        matches!(err, participants::ParticipantError::OrchestratorUrl { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn the_notifier_serves_health_and_reflection() {
    let script = Script::new();
    let orchestrator = Orchestrator::start(&script, any_port()).await;
    let dir = tempfile::tempdir().unwrap();
    let notifier = start_notifier(&orchestrator.url(), dir.path(), None).await;

    let mut health = HealthClient::new(channel(&notifier).await);
    for service in ["", participants::notifier::SERVICE_NAME] {
        let reply = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel(&notifier).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let reply = reflection
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let Some(MessageResponse::ListServicesResponse(services)) = reply.message_response else {
        panic!("unexpected reply {reply:?}");
    };
    let names: Vec<String> = services.service.into_iter().map(|s| s.name).collect();
    for name in [
        "notifier.v1.Notifier",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.contains(&name.to_owned()), "{names:?}");
    }

    drop((health, reflection));
    notifier.shutdown().await.unwrap();
    orchestrator.stop().await;
}
