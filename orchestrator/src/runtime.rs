//! The runtime: runs sagas by interpreting the engine's decisions.
//!
//! Each active saga has one driver task that owns its state. The driver asks the engine
//! what to do next; events it records are made durable (through the store's group commit)
//! before anything that depends on them happens: a participant is called only after the
//! attempt's `step_started` event is durable, and a result is durable before the saga
//! moves on. Several events are stored together when nothing external happens between
//! them (a result and the next step's intent share one write).
//!
//! A driver keeps every call the engine wants in flight at once (a parallel group's calls
//! run concurrently), and wakes up for whatever comes first: a call's result, a timer (a
//! retry, an await's timeout, the saga's deadline: all derived from the durable log, so a
//! restart neither resets nor loses them), a circuit breaker that lets calls through
//! again, or a command (a cancellation, a signal).
//!
//! A saga that waits only for a signal, a cancellation or a timer at least
//! [`PARK_AFTER`] away, with no call in flight, is **parked**: its driver ends, and all that
//! stays in memory is an entry in the saga table (and one in the timer set, if it has a
//! timer). A signal, a cancellation or its timer loads it again from its log and starts a
//! new driver, whose run is a span of its own in the saga's trace ("(resumed)"), like a run
//! after a restart. So thousands of sagas waiting for days cost a few hundred bytes each.
//!
//! On start, [`Runtime::recover`] resumes every saga that is not terminal (parking those
//! that only wait). A call whose intent was stored but whose result was not is made again
//! with the same idempotency key.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use saga_engine::saga::{Call, CancelRefused, TraceRef};
use saga_engine::{
    CallError, Event, EventKind, Next, Phase, Plan, Saga, SagaStatus, SignalOutcome, SignalRefused,
};
use saga_store::{Appended, Created, ListFilter, NewSaga, SagaStore, Summary};
use serde_json::Value;
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};
use crate::invoker::Invoker;
use crate::metrics::Metrics;
use crate::registry::Registry;
use telemetry::attributes;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Largest saga input accepted, as JSON bytes.
pub const MAX_INPUT_BYTES: usize = 64 * 1024;

/// Largest signal payload accepted, as JSON bytes.
pub const MAX_SIGNAL_PAYLOAD_BYTES: usize = 16 * 1024;

/// What a delivered signal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalReply {
    /// The saga's status after the signal.
    pub status: SagaStatus,
    /// The await step the signal is for.
    pub step: String,
    /// Kept until the step starts.
    pub buffered: bool,
    /// The same signal and payload had already been delivered; nothing changed.
    pub duplicate: bool,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An event made durable, with the saga's status after it.
#[derive(Debug, Clone)]
pub struct Published {
    pub saga_id: Arc<str>,
    pub event: Event,
    pub status: SagaStatus,
}

enum Command {
    Cancel {
        reason: String,
        reply: oneshot::Sender<Result<SagaStatus>>,
    },
    Signal {
        signal: String,
        payload: Value,
        reply: oneshot::Sender<Result<SignalReply>>,
    },
}

struct Inner {
    store: Arc<dyn SagaStore>,
    registry: Arc<Registry>,
    invoker: Invoker,
    /// Every saga of this process that is not terminal: driven or parked. A std Mutex: held
    /// only to look up, insert or remove, never across an await.
    sagas: Mutex<Sagas>,
    /// Told when a parked saga's timer may be the earliest.
    timers_changed: Arc<Notify>,
    /// Whether the task that wakes parked sagas at their time runs.
    waker_started: AtomicBool,
    events: broadcast::Sender<Published>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    metrics: Arc<Metrics>,
}

/// How far away a wait's timer must be for its saga to be parked rather than keep its
/// driver: short waits (retry backoffs) keep it, long ones (awaits, deadlines) do not.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// Where a saga that is not terminal stands in this process.
enum Slot {
    /// A driver task runs it; its commands go here.
    Driving(mpsc::UnboundedSender<Command>),
    /// No task: it waits for a signal, a cancellation, or its timer. `epoch` numbers the
    /// parking: a resume that read the log under one epoch must not start a driver under
    /// another (the saga was resumed, moved on and parked again meanwhile).
    Parked { wake_at_ms: Option<u64>, epoch: u64 },
}

#[derive(Default)]
struct Sagas {
    slots: HashMap<String, Slot>,
    /// (wake time, saga id) of every parked saga with a timer.
    timers: BTreeSet<(u64, String)>,
    /// The epoch of the next parking.
    next_epoch: u64,
}

/// How long a parked saga whose resume failed at its timer waits before the next try.
const RESUME_RETRY: Duration = Duration::from_secs(5);

/// A handle on the runtime; cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

/// FNV-1a over the definition name and the canonical input: identifies a StartSaga
/// request so a reused idempotency key with another request can be refused.
fn request_digest(definition: &str, input: &Value) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in definition
        .bytes()
        .chain([0])
        .chain(input.to_string().into_bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

fn summary_of(plan: &Plan, saga: &Saga, digest: &str) -> Summary {
    Summary {
        saga_id: saga.id.clone(),
        definition: saga.definition.clone(),
        version: saga.version,
        status: saga.status(),
        business_status: saga.business_status(plan),
        idempotency_key: saga.idempotency_key.clone(),
        request_digest: digest.to_owned(),
        created_at_ms: saga.created_at_ms,
        updated_at_ms: saga.updated_at_ms,
        last_seq: saga.last_seq,
    }
}

/// Why a driver stopped before its saga was terminal.
#[derive(Debug, thiserror::Error)]
enum Stop {
    #[error("storage: {0}")]
    Store(#[from] saga_store::StoreError),
    #[error("engine: {0}")]
    Engine(#[from] saga_engine::saga::EngineError),
    #[error("shutting down")]
    Shutdown,
    /// Parked: nothing to do until a signal, a cancellation or a timer (not an error).
    #[error("parked")]
    Parked,
}

impl Runtime {
    pub fn new(
        store: Arc<dyn SagaStore>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Runtime {
        let (events, _) = broadcast::channel(4096);
        Runtime {
            inner: Arc::new(Inner {
                store,
                registry,
                invoker: Invoker::new(),
                sagas: Mutex::new(Sagas::default()),
                timers_changed: Arc::new(Notify::new()),
                waker_started: AtomicBool::new(false),
                events,
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
                metrics,
            }),
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    pub fn store(&self) -> &Arc<dyn SagaStore> {
        &self.inner.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Starts a saga; returns `(saga_id, created, version)`. Acknowledged only once the
    /// saga is durably stored.
    pub async fn start_saga(
        &self,
        definition: &str,
        version: Option<u32>,
        input: Value,
        idempotency_key: &str,
    ) -> Result<(String, bool, u32)> {
        if self.inner.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        if definition.trim().is_empty() {
            return Err(Error::InvalidArgument(
                "definition: a definition name is required".into(),
            ));
        }
        let plan = self.inner.registry.get(definition, version)?;
        let size = input.to_string().len();
        if size > MAX_INPUT_BYTES {
            return Err(Error::InvalidArgument(format!(
                "input is {size} bytes; the limit is {MAX_INPUT_BYTES}"
            )));
        }
        if let Some(schema) = &plan.input {
            schema
                .check(&input)
                .map_err(|errors| Error::InvalidArgument(errors.join("; ")))?;
        }
        if plan.reject_when_open {
            self.admit(&plan)?;
        }
        if idempotency_key.len() > 256 {
            return Err(Error::InvalidArgument(
                "idempotency_key: longer than 256 bytes".into(),
            ));
        }
        let saga_id = uuid::Uuid::now_v7().to_string();
        let key = if idempotency_key.is_empty() {
            saga_id.clone()
        } else {
            idempotency_key.to_owned()
        };
        let digest = request_digest(&plan.name, &input);
        // The saga's root span: its trace id and span id are stored with the saga, so runs
        // after a restart join the same trace.
        let span = saga_span(&plan, &saga_id, false);
        let trace = trace_ref(&span);
        let now = now_ms();
        let first = Saga::start_event_traced(&plan, &saga_id, input, &key, now, trace);
        let internal = |e: saga_engine::saga::EngineError| Error::Internal(e.to_string());
        let mut saga = Saga::from_events(&plan, [&first]).map_err(internal)?;
        // What the saga decides before its first call (that call's intent, steps skipped by
        // their condition) is stored with it: one durable write per saga fewer, and the
        // intent is still durable before its call.
        let mut statuses = vec![(saga.status(), saga.business_status(&plan))];
        let mut events = vec![first];
        while let Next::Record(event) = saga.next(&plan, now) {
            saga.apply(&plan, &event).map_err(internal)?;
            statuses.push((saga.status(), saga.business_status(&plan)));
            events.push(event);
        }
        let created = self
            .inner
            .store
            .create(NewSaga {
                summary: summary_of(&plan, &saga, &digest),
                events: events.clone(),
                statuses: statuses.clone(),
            })
            .await?;
        match created {
            Created::New => {
                tracing::info!(parent: &span, saga.id = %saga_id, saga.name = %plan.name, saga.version = plan.version, "saga started");
                self.inner.metrics.saga_started(&plan.name);
                for event in &events[1..] {
                    log_event(&saga_id, event);
                    measure(&self.inner.metrics, &plan, &saga, &span, event);
                }
                self.publish(
                    &saga_id,
                    events.into_iter().zip(statuses).map(|(e, (s, _))| (e, s)),
                );
                self.spawn_driver(plan.clone(), saga, digest, span);
                Ok((saga_id, true, plan.version))
            }
            Created::Existing(existing) => {
                if existing.request_digest != digest {
                    return Err(Error::IdempotencyConflict {
                        key,
                        saga_id: existing.saga_id,
                    });
                }
                Ok((existing.saga_id, false, existing.version))
            }
        }
    }

    /// For `admission: reject_when_open`: refuses a new saga while the first step's
    /// breaker is open (nothing would be sent anyway), with the time until its next probe.
    fn admit(&self, plan: &Plan) -> Result<()> {
        let Some(first) = plan.steps.first() else {
            return Ok(());
        };
        let Some(breaker) = self.inner.registry.breakers().get(first.participant()) else {
            return Ok(());
        };
        let snapshot = breaker.snapshot();
        let open = matches!(
            snapshot.state,
            circuit_breaker::State::Open | circuit_breaker::State::ForcedOpen
        );
        let retry_after = snapshot
            .next_probe_at
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or_default();
        if open && (snapshot.state == circuit_breaker::State::ForcedOpen || !retry_after.is_zero())
        {
            return Err(Error::BreakerOpen {
                definition: plan.name.clone(),
                participant: first.participant().to_owned(),
                retry_after: if retry_after.is_zero() {
                    Duration::from_secs(1)
                } else {
                    retry_after
                },
            });
        }
        Ok(())
    }

    fn publish(&self, saga_id: &str, events: impl IntoIterator<Item = (Event, SagaStatus)>) {
        let saga_id: Arc<str> = Arc::from(saga_id);
        for (event, status) in events {
            // No watcher is not an error.
            let _ = self.inner.events.send(Published {
                saga_id: saga_id.clone(),
                event,
                status,
            });
        }
    }

    fn sagas(&self) -> MutexGuard<'_, Sagas> {
        self.inner.sagas.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn_driver(&self, plan: Arc<Plan>, saga: Saga, digest: String, span: tracing::Span) {
        let mut sagas = self.sagas();
        self.start_driver(&mut sagas, plan, saga, digest, span, None);
    }

    /// Starts the driver of `saga` and enters it in the saga table (`sagas`, locked).
    /// `first`: a command queued before the driver starts, so that it sees it on its first
    /// turn (and does not park before it).
    fn start_driver(
        &self,
        sagas: &mut Sagas,
        plan: Arc<Plan>,
        saga: Saga,
        digest: String,
        span: tracing::Span,
        first: Option<Command>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(command) = first {
            // The receiver is in hand: this send cannot fail.
            let _ = tx.send(command);
        }
        sagas.slots.insert(saga.id.clone(), Slot::Driving(tx));
        let driver = Driver {
            runtime: self.clone(),
            plan,
            saga,
            digest,
            pending: Vec::new(),
            span: span.clone(),
        };
        self.inner.tasks.spawn(driver.run(rx).instrument(span));
    }

    /// Parks `saga_id` (no driver) until a signal, a cancellation or `wake_at_ms`. Called by
    /// its driver, which ends, or by recovery instead of starting one. `queue`: the driver's
    /// command queue; with a command in it the saga is not parked (returns false).
    fn park(
        &self,
        saga_id: &str,
        wake_at_ms: Option<u64>,
        queue: Option<&mpsc::UnboundedReceiver<Command>>,
    ) -> bool {
        let mut sagas = self.sagas();
        if queue.is_some_and(|q| !q.is_empty()) {
            return false;
        }
        let epoch = sagas.next_epoch;
        sagas.next_epoch += 1;
        sagas
            .slots
            .insert(saga_id.to_owned(), Slot::Parked { wake_at_ms, epoch });
        if let Some(at) = wake_at_ms {
            sagas.timers.insert((at, saga_id.to_owned()));
            if sagas.timers.first().is_some_and(|(first, _)| *first == at) {
                self.inner.timers_changed.notify_one();
            }
            drop(sagas);
            self.start_waker();
        }
        true
    }

    /// Hands `command` to `saga_id`'s driver, first starting one from its log if the saga is
    /// parked (the command is queued before the new driver runs, so it cannot park again
    /// before seeing it). `None` (a timer's resume) just starts the driver. Returns the
    /// command back if the saga has no driver here (it is terminal, unknown, or was not
    /// resumed at start); then the durable state decides.
    fn deliver(&self, saga_id: &str, command: Option<Command>) -> Result<Option<Command>> {
        let mut command = command;
        // Each round follows a driver that ended (finished or parked) or a parking that
        // changed while the log was read.
        for _ in 0..16 {
            let seen = match self.sagas().slots.get(saga_id) {
                Some(Slot::Driving(tx)) => match command {
                    None => return Ok(None),
                    Some(c) => match tx.send(c) {
                        Ok(()) => return Ok(None),
                        // Its driver ended: look again.
                        Err(mpsc::error::SendError(c)) => {
                            command = Some(c);
                            continue;
                        }
                    },
                },
                Some(Slot::Parked { epoch, .. }) => *epoch,
                None => return Ok(command),
            };
            // Read outside the lock; the epoch check below catches a log that moved on.
            let (summary, plan, saga) = self.load(saga_id)?;
            // Test hook: a resume that read the log, stalled before it could start a driver.
            fail::fail_point!("runtime::resume_after_load");
            let mut sagas = self.sagas();
            match sagas.slots.get(saga_id) {
                Some(Slot::Parked { wake_at_ms, epoch }) if *epoch == seen => {
                    if let Some(at) = *wake_at_ms {
                        sagas.timers.remove(&(at, saga_id.to_owned()));
                    }
                }
                // Resumed by someone else meanwhile (and perhaps parked again): look again.
                Some(_) => continue,
                None => return Ok(command),
            }
            let span = saga_span(&plan, &saga.id, true);
            if let Some(trace) = &saga.trace {
                join_trace(&span, trace);
            }
            tracing::debug!(parent: &span, saga.id = %saga.id, "resuming parked saga");
            self.start_driver(
                &mut sagas,
                plan,
                saga,
                summary.request_digest,
                span,
                command,
            );
            return Ok(None);
        }
        Err(Error::Internal(format!(
            "saga {saga_id} kept changing hands; try again"
        )))
    }

    /// Starts (once) the task that resumes parked sagas when their timer falls due. It holds
    /// the runtime only while it resumes them, so it keeps nothing alive.
    fn start_waker(&self) {
        if self.inner.waker_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let runtime: Weak<Inner> = Arc::downgrade(&self.inner);
        let changed = self.inner.timers_changed.clone();
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            loop {
                let next = {
                    let Some(inner) = runtime.upgrade() else {
                        return;
                    };
                    Runtime { inner }.wake_due(now_ms())
                };
                let sleep = async {
                    match next {
                        Some(at) => {
                            tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms())))
                                .await
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = sleep => {}
                    () = changed.notified() => {}
                    () = shutdown.cancelled() => return,
                }
            }
        });
    }

    /// Resumes every parked saga whose timer is due at `now`; returns the next timer.
    fn wake_due(&self, now: u64) -> Option<u64> {
        let due: Vec<String> = {
            let mut sagas = self.sagas();
            let mut due = Vec::new();
            while let Some((at, _)) = sagas.timers.first()
                && *at <= now
            {
                if let Some((_, id)) = sagas.timers.pop_first() {
                    due.push(id);
                }
            }
            due
        };
        for id in due {
            if let Err(e) = self.deliver(&id, None) {
                let retry_at = now_ms().saturating_add(RESUME_RETRY.as_millis() as u64);
                tracing::error!(saga.id = %id, cause = %e, retry_in = ?RESUME_RETRY, "cannot resume a parked saga at its timer");
                let mut sagas = self.sagas();
                if let Some(Slot::Parked { wake_at_ms, .. }) = sagas.slots.get_mut(&id) {
                    *wake_at_ms = Some(retry_at);
                    sagas.timers.insert((retry_at, id));
                }
            }
        }
        self.sagas().timers.first().map(|(at, _)| *at)
    }

    /// Resumes every saga that is not terminal; returns how many.
    pub async fn recover(&self) -> Result<usize> {
        let mut resumed = 0;
        for summary in self.inner.store.unfinished()? {
            let plan = match self
                .inner
                .registry
                .get(&summary.definition, Some(summary.version))
            {
                Ok(plan) => plan,
                Err(e) => {
                    tracing::error!(saga.id = %summary.saga_id, cause = %e, "cannot resume saga: its definition is not loaded");
                    continue;
                }
            };
            let Some(events) = self.inner.store.events(&summary.saga_id)? else {
                continue;
            };
            let saga = match Saga::from_events(&plan, &events) {
                Ok(saga) => saga,
                Err(e) => {
                    tracing::error!(saga.id = %summary.saga_id, cause = %e, "cannot resume saga: its log does not replay");
                    continue;
                }
            };
            resumed += 1;
            if let Some(wake_at_ms) = parks(&saga, &plan, now_ms()) {
                tracing::debug!(saga.id = %saga.id, "saga parked: it waits for a signal or a timer");
                self.park(&saga.id, wake_at_ms, None);
                continue;
            }
            let span = saga_span(&plan, &saga.id, true);
            if let Some(trace) = &saga.trace {
                join_trace(&span, trace);
            }
            tracing::info!(parent: &span, saga.id = %saga.id, status = saga.status().as_str(), "resuming saga");
            self.spawn_driver(plan, saga, summary.request_digest, span);
        }
        Ok(resumed)
    }

    /// The saga's state and the plan it runs, rebuilt from its durable log.
    pub fn get(&self, saga_id: &str) -> Result<(Arc<Plan>, Saga)> {
        let (_, plan, saga) = self.load(saga_id)?;
        Ok((plan, saga))
    }

    /// The saga's summary, plan and state, rebuilt from its durable log.
    fn load(&self, saga_id: &str) -> Result<(Summary, Arc<Plan>, Saga)> {
        // After a storage fault the store may hold writes that never became durable.
        self.inner.store.health()?;
        let summary = self
            .inner
            .store
            .summary(saga_id)?
            .ok_or_else(|| Error::UnknownSaga(saga_id.to_owned()))?;
        let plan = self
            .inner
            .registry
            .get(&summary.definition, Some(summary.version))?;
        let events = self
            .inner
            .store
            .events(saga_id)?
            .ok_or_else(|| Error::UnknownSaga(saga_id.to_owned()))?;
        let saga = Saga::from_events(&plan, &events)
            .map_err(|e| Error::Internal(format!("saga {saga_id}: {e}")))?;
        Ok((summary, plan, saga))
    }

    pub fn list(
        &self,
        filter: &ListFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Summary>> {
        self.inner.store.health()?;
        Ok(self.inner.store.list(filter, after, limit)?)
    }

    /// Asks a saga to stop and compensate. Returns its status once the request is durable.
    pub async fn cancel(&self, saga_id: &str, reason: &str) -> Result<SagaStatus> {
        let reason = if reason.trim().is_empty() {
            "cancelled by request"
        } else {
            reason.trim()
        };
        let asked = self
            .command(saga_id, |reply| Command::Cancel {
                reason: reason.to_owned(),
                reply,
            })
            .await?;
        if let Some(result) = asked {
            return result;
        }
        // No driver (or it finished meanwhile): the durable state decides.
        let (plan, saga) = self.get(saga_id)?;
        match saga.cancel(&plan, reason, now_ms()) {
            Err(refused) => Err(Error::CancelRefused {
                saga_id: saga_id.to_owned(),
                reason: refused.to_string(),
            }),
            Ok(None) => Ok(saga.status()),
            Ok(Some(_)) => Err(Error::Internal(format!(
                "saga {saga_id} is not terminal but has no driver"
            ))),
        }
    }

    /// Delivers a signal to a saga. Returns once what it changed is durable.
    pub async fn signal(&self, saga_id: &str, signal: &str, payload: Value) -> Result<SignalReply> {
        let signal = signal.trim();
        if signal.is_empty() {
            return Err(Error::InvalidArgument(
                "signal: a signal name is required, e.g. store.accepted".into(),
            ));
        }
        let size = payload.to_string().len();
        if size > MAX_SIGNAL_PAYLOAD_BYTES {
            return Err(Error::InvalidArgument(format!(
                "payload is {size} bytes; the limit is {MAX_SIGNAL_PAYLOAD_BYTES}"
            )));
        }
        let asked = self
            .command(saga_id, |reply| Command::Signal {
                signal: signal.to_owned(),
                payload: payload.clone(),
                reply,
            })
            .await?;
        if let Some(result) = asked {
            return result;
        }
        // No driver (the saga is terminal, or finished meanwhile): the durable state decides.
        let (plan, saga) = self.get(saga_id)?;
        match saga.signal(&plan, signal, &payload, now_ms()) {
            Ok(SignalOutcome::Duplicate { step }) => Ok(SignalReply {
                status: saga.status(),
                step,
                buffered: false,
                duplicate: true,
            }),
            Ok(SignalOutcome::Record { .. }) => Err(Error::Internal(format!(
                "saga {saga_id} is not terminal but has no driver"
            ))),
            Err(refused) => Err(signal_refused(saga_id, refused)),
        }
    }

    /// Sends a command to the saga's driver (resuming a parked saga) and waits for its
    /// answer; `None` if the saga has no driver to answer (terminal, or unknown here).
    async fn command<T>(
        &self,
        saga_id: &str,
        make: impl Fn(oneshot::Sender<Result<T>>) -> Command,
    ) -> Result<Option<Result<T>>> {
        // A driver can end (finish or park) after the command reached its queue, dropping it
        // unanswered; then deliver it again. Each round needs a driver to have ended.
        for _ in 0..8 {
            if self.inner.shutdown.is_cancelled() {
                return Err(Error::ShuttingDown);
            }
            let (reply, answer) = oneshot::channel();
            if self.deliver(saga_id, Some(make(reply)))?.is_some() {
                return Ok(None);
            }
            if let Ok(result) = answer.await {
                return Ok(Some(result));
            }
        }
        if self.inner.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        Ok(None)
    }

    /// Live events of every saga; see [`Published`].
    pub fn subscribe(&self) -> broadcast::Receiver<Published> {
        self.inner.events.subscribe()
    }

    /// The shutdown signal and the task tracker that [`Runtime::shutdown`] waits for, for
    /// background tasks that must not hold the runtime itself.
    pub fn background(&self) -> (CancellationToken, TaskTracker) {
        (self.inner.shutdown.clone(), self.inner.tasks.clone())
    }

    /// Whether the runtime is shutting down.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Resolves when the runtime starts shutting down.
    pub fn shutting_down(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.inner.shutdown.cancelled()
    }

    /// Number of sagas with a running driver.
    pub fn active(&self) -> usize {
        self.sagas()
            .slots
            .values()
            .filter(|s| matches!(s, Slot::Driving(_)))
            .count()
    }

    /// Number of parked sagas (waiting with no driver).
    pub fn parked(&self) -> usize {
        self.sagas()
            .slots
            .values()
            .filter(|s| matches!(s, Slot::Parked { .. }))
            .count()
    }

    /// Stops every driver at its next safe point (what is durable stays; in-flight calls are
    /// abandoned and made again on recovery) and waits for them.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

/// The test-only failpoint `runtime::skip_compensation` (see the chaos suite): whether the
/// next compensation call is to be skipped.
#[cfg(feature = "failpoints")]
fn skip_compensation() -> bool {
    fail::eval("runtime::skip_compensation", |_| ()).is_some()
}

#[cfg(not(feature = "failpoints"))]
fn skip_compensation() -> bool {
    false
}

/// The root span of one run of a saga (its first, or one after a restart).
fn saga_span(plan: &Plan, saga_id: &str, resumed: bool) -> tracing::Span {
    let name = if resumed {
        format!("saga {} (resumed)", plan.name)
    } else {
        format!("saga {}", plan.name)
    };
    tracing::info_span!(
        parent: None,
        "saga",
        otel.name = %name,
        { attributes::SAGA_ID } = %saga_id,
        { attributes::SAGA_NAME } = %plan.name,
        { attributes::SAGA_VERSION } = plan.version,
        { attributes::SAGA_STATUS } = tracing::field::Empty,
    )
}

/// The trace id and span id of `span`, when traces are exported.
fn trace_ref(span: &tracing::Span) -> Option<TraceRef> {
    use opentelemetry::trace::TraceContextExt;
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| TraceRef {
        trace_id: span_context.trace_id().to_string(),
        span_id: span_context.span_id().to_string(),
    })
}

/// Makes `span` a child of the saga's first root span (which may be gone: it was in another
/// process), so a resumed run stays in the saga's trace.
fn join_trace(span: &tracing::Span, trace: &TraceRef) {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    let (Ok(trace_id), Ok(span_id)) = (
        TraceId::from_hex(&trace.trace_id),
        SpanId::from_hex(&trace.span_id),
    ) else {
        return;
    };
    let parent = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
}

fn signal_refused(saga_id: &str, refused: SignalRefused) -> Error {
    match refused {
        SignalRefused::Unknown { .. } => Error::InvalidArgument(format!("signal: {refused}")),
        other => Error::SignalRefused {
            saga_id: saga_id.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// A call in flight: it resolves to the call and its outcome.
type CallFuture = BoxFuture<'static, (Call, std::result::Result<Value, CallError>)>;

/// Identifies one attempt of one call.
fn attempt_key(call: &Call) -> String {
    format!("{}#{}", call.idempotency_key, call.attempt)
}

struct Driver {
    runtime: Runtime,
    plan: Arc<Plan>,
    saga: Saga,
    digest: String,
    /// Recorded and applied, not yet durable, with the status and business status after
    /// each.
    pending: Vec<(Event, SagaStatus, String)>,
    /// The root span of this run.
    span: tracing::Span,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let result = self.drive(&mut rx).await;
        let id = self.saga.id.clone();
        if !matches!(result, Err(Stop::Parked)) {
            let mut sagas = self.runtime.sagas();
            if matches!(sagas.slots.get(&id), Some(Slot::Driving(_))) {
                sagas.slots.remove(&id);
            }
        }
        // Refuse what is still queued; the callers look again (and resume a parked saga)
        // or re-read the durable state.
        rx.close();
        match result {
            Err(Stop::Parked) => {
                tracing::debug!(saga.id = %id, "saga parked: it waits for a signal or a timer")
            }
            Ok(()) => {
                tracing::info!(saga.id = %id, status = self.saga.status().as_str(), "saga finished")
            }
            Err(Stop::Shutdown) => {
                tracing::debug!(saga.id = %id, "saga driver stopped for shutdown")
            }
            Err(e) => {
                tracing::error!(saga.id = %id, cause = %e, "saga driver stopped; the saga resumes from its durable state on restart")
            }
        }
    }

    fn record(&mut self, event: Event) -> Result<(), Stop> {
        self.saga.apply(&self.plan, &event)?;
        log_event(&self.saga.id, &event);
        measure(
            &self.runtime.inner.metrics,
            &self.plan,
            &self.saga,
            &self.span,
            &event,
        );
        let business = self.saga.business_status(&self.plan);
        self.pending.push((event, self.saga.status(), business));
        Ok(())
    }

    /// Makes every pending event durable, then publishes it.
    async fn persist(&mut self) -> Result<(), Stop> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let mut events = Vec::with_capacity(pending.len());
        let mut statuses = Vec::with_capacity(pending.len());
        let mut published = Vec::with_capacity(pending.len());
        for (event, status, business) in pending {
            events.push(event.clone());
            statuses.push((status, business));
            published.push((event, status));
        }
        self.runtime
            .inner
            .store
            .append_with_statuses(Appended {
                events,
                summary: summary_of(&self.plan, &self.saga, &self.digest),
                statuses,
            })
            .await?;
        self.runtime.publish(&self.saga.id, published);
        Ok(())
    }

    async fn handle(&mut self, command: Command) -> Result<(), Stop> {
        match command {
            Command::Cancel { reason, reply } => {
                let answer = match self.saga.cancel(&self.plan, &reason, now_ms()) {
                    Ok(Some(event)) => {
                        self.record(event)?;
                        self.persist().await?;
                        Ok(self.saga.status())
                    }
                    Ok(None) => Ok(self.saga.status()),
                    Err(
                        refused @ (CancelRefused::Terminal(_)
                        | CancelRefused::PastPivot(_)
                        | CancelRefused::PastPoint(_)
                        | CancelRefused::Compensating(_)),
                    ) => Err(Error::CancelRefused {
                        saga_id: self.saga.id.clone(),
                        reason: refused.to_string(),
                    }),
                };
                let _ = reply.send(answer);
            }
            Command::Signal {
                signal,
                payload,
                reply,
            } => {
                let answer = match self.saga.signal(&self.plan, &signal, &payload, now_ms()) {
                    Ok(SignalOutcome::Record {
                        event,
                        step,
                        buffered,
                    }) => {
                        self.record(event)?;
                        self.persist().await?;
                        tracing::info!(saga.id = %self.saga.id, saga.step = %step, signal = %signal, buffered, "signal received");
                        Ok(SignalReply {
                            status: self.saga.status(),
                            step,
                            buffered,
                            duplicate: false,
                        })
                    }
                    Ok(SignalOutcome::Duplicate { step }) => Ok(SignalReply {
                        status: self.saga.status(),
                        step,
                        buffered: false,
                        duplicate: true,
                    }),
                    Err(refused) => Err(signal_refused(&self.saga.id, refused)),
                };
                let _ = reply.send(answer);
            }
        }
        Ok(())
    }

    /// The span of a wait without calls: what it waits for, as `saga.wait`.
    fn wait_span(&self, wait: &saga_engine::Wait) -> tracing::Span {
        let what = if !wait.signals.is_empty() {
            format!("signal {}", wait.signals.join(" | "))
        } else if !wait.breakers.is_empty() {
            let participants: Vec<&str> = wait.breakers.iter().map(|(_, p)| p.as_str()).collect();
            format!("breaker {}", participants.join(", "))
        } else {
            "timer".to_owned()
        };
        tracing::info_span!(
            parent: &self.span,
            "wait",
            otel.name = %format!("wait {what}"),
            { attributes::SAGA_ID } = %self.saga.id,
            { attributes::SAGA_WAIT } = %what,
        )
    }

    /// The future of one call, owning everything it needs.
    fn start_call(&self, call: Call) -> CallFuture {
        let runtime = self.runtime.clone();
        let plan = self.plan.clone();
        let spec = self
            .saga
            .route(&plan, call.step_index)
            .map(|(_, action, compensation, _)| match call.phase {
                Phase::Action => action.clone(),
                Phase::Compensation => compensation.unwrap_or(action).clone(),
            });
        let endpoint = runtime.inner.registry.endpoint(&plan, &call.participant);
        let breaker = runtime.inner.registry.breakers().get(&call.participant);
        let step_span = tracing::info_span!(
            parent: &self.span,
            "step",
            otel.name = %format!("{} {}", call.step, call.phase.as_str()),
            { attributes::SAGA_ID } = %self.saga.id,
            { attributes::SAGA_STEP } = %call.step,
            { attributes::SAGA_PHASE } = call.phase.as_str(),
            { attributes::SAGA_ATTEMPT } = call.attempt,
            { attributes::PARTICIPANT } = %call.participant,
            { attributes::SAGA_COMPENSATES } = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        if call.phase == Phase::Compensation {
            step_span.record(attributes::SAGA_COMPENSATES, call.step.as_str());
        }
        let future_span = step_span.clone();
        Box::pin(
            async move {
                let Some(spec) = spec else {
                    let error = CallError {
                        code: "INTERNAL".into(),
                        message: format!("step `{}` has no call", call.step),
                        retryable: false,
                        rejected: false,
                    };
                    return (call, Err(error));
                };
                let timeout = Duration::from_millis(call.timeout_ms);
                let started = std::time::Instant::now();
                let result = runtime
                    .inner
                    .invoker
                    .call(
                        &endpoint,
                        &spec,
                        &call.request,
                        &call.idempotency_key,
                        timeout,
                        breaker.as_ref(),
                    )
                    .await;
                let outcome = match &result {
                    Ok(_) => "ok",
                    Err(e) if e.rejected => CallError::CIRCUIT_OPEN,
                    Err(e) => e.code.as_str(),
                };
                if result.is_err() {
                    step_span.record("otel.status_code", "ERROR");
                }
                runtime.inner.metrics.step_attempt(
                    &call.participant,
                    &call.step,
                    call.phase.as_str(),
                    outcome,
                    started.elapsed(),
                );
                (call, result)
            }
            .instrument(future_span),
        )
    }

    async fn drive(&mut self, rx: &mut mpsc::UnboundedReceiver<Command>) -> Result<(), Stop> {
        let shutdown = self.runtime.inner.shutdown.clone();
        // Calls in flight (abandoned on shutdown: made again on recovery, same keys).
        let mut running: FuturesUnordered<CallFuture> = FuturesUnordered::new();
        let mut in_flight: HashSet<String> = HashSet::new();
        loop {
            if shutdown.is_cancelled() {
                self.persist().await?;
                return Err(Stop::Shutdown);
            }
            let mut wait = match self.saga.next(&self.plan, now_ms()) {
                Next::Record(event) => {
                    self.record(event)?;
                    continue;
                }
                Next::Done => return self.persist().await,
                Next::Wait(wait) => wait,
            };
            // Every intent (and everything before it) is durable before its call.
            self.persist().await?;
            let mut skipped = false;
            for call in std::mem::take(&mut wait.calls) {
                if !in_flight.insert(attempt_key(&call)) {
                    continue;
                }
                if call.phase == Phase::Compensation && skip_compensation() {
                    // A deliberately broken build (test-only failpoint): the compensation is
                    // recorded as done without calling the participant, so the chaos
                    // checker has a real violation to find.
                    in_flight.remove(&attempt_key(&call));
                    let event = self.saga.on_result(
                        &self.plan,
                        &call,
                        Ok(Value::Object(Default::default())),
                        now_ms(),
                        0.0,
                    )?;
                    tracing::error!(saga.id = %self.saga.id, saga.step = %call.step, "failpoint runtime::skip_compensation: compensation skipped");
                    self.record(event)?;
                    skipped = true;
                    continue;
                }
                // Crash point: the intent is durable, the participant not yet called.
                fail::fail_point!("runtime::after_intent_before_call", |_| saga_store::crash(
                    "runtime::after_intent_before_call"
                ));
                if call.phase == Phase::Compensation {
                    // Crash point in a compensation chain: hit at every compensation call,
                    // so `1*off->return` crashes after the first one's result is durable.
                    fail::fail_point!("runtime::before_compensation_call", |_| {
                        saga_store::crash("runtime::before_compensation_call")
                    });
                }
                running.push(self.start_call(call));
            }
            if skipped {
                continue;
            }
            if running.is_empty()
                && wait.breakers.is_empty()
                && parkable(wait.wake_at_ms, now_ms())
                && self.runtime.park(&self.saga.id, wait.wake_at_ms, Some(rx))
            {
                return Err(Stop::Parked);
            }
            // Deferred steps wait for their breakers; without a breaker nothing can refuse
            // the call, so such a step goes at once.
            let breakers: Vec<BoxFuture<'static, usize>> = wait
                .breakers
                .iter()
                .map(|(index, participant)| {
                    let index = *index;
                    let breaker = self.runtime.inner.registry.breakers().get(participant);
                    Box::pin(async move {
                        if let Some(breaker) = breaker {
                            breaker.ready().await;
                        }
                        index
                    }) as BoxFuture<'static, usize>
                })
                .collect();
            let breaker_ready = async {
                if breakers.is_empty() {
                    std::future::pending().await
                } else {
                    futures::future::select_all(breakers).await.0
                }
            };
            // A wait with no call in flight is a span of its own (a signal, a timer, an
            // open breaker), closed when the wait ends.
            let _wait_span = (running.is_empty()).then(|| self.wait_span(&wait));
            let timer = async {
                match wait.wake_at_ms {
                    Some(at) => {
                        tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms())))
                            .await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some((call, result)) = running.next(), if !running.is_empty() => {
                    in_flight.remove(&attempt_key(&call));
                    // Crash point: the participant answered; its result is not stored.
                    fail::fail_point!("runtime::after_call_before_result", |_| saga_store::crash(
                        "runtime::after_call_before_result"
                    ));
                    let event =
                        self.saga
                            .on_result(&self.plan, &call, result, now_ms(), fastrand::f64())?;
                    self.record(event)?;
                }
                index = breaker_ready => {
                    tracing::info!(breaker.state = "closed", saga.step = %self.plan.steps.get(index).map_or("", |s| s.name.as_str()), "circuit breaker lets calls through again");
                    if let Some(event) = self.saga.resume(&self.plan, index, now_ms()) {
                        self.record(event)?;
                    }
                }
                // The engine decides what is due on the next turn.
                () = timer => {}
                Some(command) = rx.recv() => self.handle(command).await?,
                () = shutdown.cancelled() => return Err(Stop::Shutdown),
            }
        }
    }
}

/// Whether a wait with no call in flight and no breaker, ending at `wake_at_ms`, is long
/// enough to park its saga.
fn parkable(wake_at_ms: Option<u64>, now: u64) -> bool {
    wake_at_ms.is_none_or(|at| at >= now.saturating_add(PARK_AFTER.as_millis() as u64))
}

/// `Some(wake time)` if `saga` (rebuilt from its log) would park right away: it only waits.
fn parks(saga: &Saga, plan: &Plan, now: u64) -> Option<Option<u64>> {
    match saga.next(plan, now) {
        Next::Wait(wait)
            if wait.calls.is_empty()
                && wait.breakers.is_empty()
                && parkable(wait.wake_at_ms, now) =>
        {
            Some(wait.wake_at_ms)
        }
        _ => None,
    }
}

/// Counts what `event` (just applied to `saga`) says in the metrics.
fn measure(metrics: &Metrics, plan: &Plan, saga: &Saga, span: &tracing::Span, event: &Event) {
    let definition = plan.name.as_str();
    match &event.kind {
        EventKind::StepFailed {
            step,
            phase,
            retry_at_ms: Some(_),
            ..
        } => metrics.retry(definition, step, phase.as_str()),
        EventKind::StepSucceeded {
            step,
            phase: Phase::Compensation,
            ..
        } => metrics.compensated(definition, step),
        EventKind::SagaCompleted | EventKind::SagaCompensated | EventKind::SagaFailed { .. } => {
            let status = saga.status();
            let took = Duration::from_millis(event.at_ms.saturating_sub(saga.created_at_ms));
            metrics.saga_finished(definition, status, took);
            span.record(attributes::SAGA_STATUS, status.as_str());
        }
        _ => {}
    }
}

fn log_event(saga_id: &str, event: &Event) {
    match &event.kind {
        EventKind::StepFailed {
            step,
            phase,
            attempt,
            error,
            retry_at_ms,
        } => tracing::warn!(
            saga.id = %saga_id, saga.step = %step, saga.phase = phase.as_str(), saga.attempt = attempt,
            code = %error.code, cause = %error.message, retry = retry_at_ms.is_some(), "step attempt failed"
        ),
        EventKind::StepStarted {
            step,
            phase,
            attempt,
        } => tracing::debug!(
            saga.id = %saga_id, saga.step = %step, saga.phase = phase.as_str(), saga.attempt = attempt, "step started"
        ),
        EventKind::StepSucceeded {
            step,
            phase,
            attempt,
            ..
        } => tracing::debug!(
            saga.id = %saga_id, saga.step = %step, saga.phase = phase.as_str(), saga.attempt = attempt, "step succeeded"
        ),
        EventKind::CompensationStarted { reason } => {
            tracing::warn!(saga.id = %saga_id, reason = %reason, "compensation started");
        }
        EventKind::SagaFailed { reason } => {
            tracing::error!(saga.id = %saga_id, reason = %reason, "saga FAILED: needs an operator");
        }
        _ => {}
    }
}
