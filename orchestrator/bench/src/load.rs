//! Driving sagas through the public gRPC API and observing their ends.
//!
//! [`Feed`] consumes `WatchSagas` (every status change of every saga, in commit order) once
//! per orchestrator process and settles the saga each change is about; [`drive`] runs
//! `concurrency` workers, each starting a saga, waiting for the feed to settle it, and
//! taking the next. A saga's latency runs from just before its `StartSaga` is sent to the
//! moment the feed delivers the change that settles it; nothing polls per saga.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use proto::saga::v1 as pb;
use proto::saga::v1::saga_orchestrator_client::SagaOrchestratorClient;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tonic::transport::Channel;

pub type Client = SagaOrchestratorClient<Channel>;

/// How long one saga may take, from StartSaga to settled, before it counts as an error.
pub const SAGA_DEADLINE: Duration = Duration::from_secs(60);

/// What settles a saga besides a terminal status (which always does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Until {
    /// COMPLETED, COMPENSATED or FAILED.
    Terminal,
    /// WAITING with this business status (e.g. "waiting for the store"): parked at an
    /// await step.
    Parked(String),
}

impl Until {
    fn settles(&self, change: &pb::SagaChange) -> bool {
        let status = pb::SagaStatus::try_from(change.status).unwrap_or_default();
        is_terminal(status)
            || matches!(self, Until::Parked(business)
                if status == pb::SagaStatus::Waiting && change.business_status == *business)
    }
}

fn is_terminal(status: pb::SagaStatus) -> bool {
    matches!(
        status,
        pb::SagaStatus::Completed | pb::SagaStatus::Compensated | pb::SagaStatus::Failed
    )
}

/// A saga's settling change, as the feed delivered it.
#[derive(Debug, Clone, Copy)]
pub struct Settled {
    pub at: Instant,
    pub status: pb::SagaStatus,
}

enum Slot {
    /// A worker waits for this saga.
    Waiting(oneshot::Sender<Settled>),
    /// Settled before its worker had the saga id (the StartSaga reply can arrive after the
    /// saga ended).
    Settled(Settled),
}

#[derive(Default)]
struct Slots {
    /// A std Mutex: held only to insert or take a slot, never across an await.
    map: Mutex<HashMap<String, Slot>>,
    /// Why the feed stopped, once it has.
    closed: Mutex<Option<String>>,
    settled: AtomicUsize,
}

/// The change feed of one orchestrator process, followed from a cursor.
pub struct Feed {
    slots: Arc<Slots>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Feed {
    /// Follows every change after `after_cursor` (0: from the first change ever stored).
    pub async fn open(client: &Client, after_cursor: u64, until: Until) -> anyhow::Result<Feed> {
        let mut stream = client
            .clone()
            .watch_sagas(pb::WatchSagasRequest {
                status: pb::SagaStatus::Unspecified as i32,
                definition: String::new(),
                after_cursor,
            })
            .await
            .context("WatchSagas")?
            .into_inner();
        let slots = Arc::new(Slots::default());
        let feed_slots = slots.clone();
        let task = tokio::spawn(async move {
            let why = loop {
                match stream.message().await {
                    Ok(Some(change)) => {
                        if !until.settles(&change) {
                            continue;
                        }
                        let settled = Settled {
                            at: Instant::now(),
                            status: pb::SagaStatus::try_from(change.status).unwrap_or_default(),
                        };
                        feed_slots.settled.fetch_add(1, Ordering::Relaxed);
                        let mut map = lock(&feed_slots.map);
                        match map.remove(&change.saga_id) {
                            Some(Slot::Waiting(tx)) => {
                                let _ = tx.send(settled);
                            }
                            Some(Slot::Settled(first)) => {
                                map.insert(change.saga_id, Slot::Settled(first));
                            }
                            None => {
                                map.insert(change.saga_id, Slot::Settled(settled));
                            }
                        }
                    }
                    Ok(None) => break "the change feed ended".to_owned(),
                    Err(status) => break format!("the change feed failed: {status}"),
                }
            };
            *lock(&feed_slots.closed) = Some(why);
            // Wake every waiting worker: its receiver sees the sender dropped.
            lock(&feed_slots.map).retain(|_, slot| matches!(slot, Slot::Settled(_)));
        });
        Ok(Feed { slots, task })
    }

    /// How many changes have settled a saga so far.
    pub fn settled(&self) -> usize {
        self.slots.settled.load(Ordering::Relaxed)
    }

    /// Waits (at most until `deadline`) for the change that settles `saga_id`.
    async fn wait(&self, saga_id: &str, deadline: Instant) -> anyhow::Result<Settled> {
        let rx = {
            let mut map = lock(&self.slots.map);
            if let Some(Slot::Settled(settled)) = map.remove(saga_id) {
                return Ok(settled);
            }
            if let Some(why) = lock(&self.slots.closed).as_ref() {
                bail!("{why}");
            }
            let (tx, rx) = oneshot::channel();
            map.insert(saga_id.to_owned(), Slot::Waiting(tx));
            rx
        };
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(settled)) => Ok(settled),
            Ok(Err(_)) => bail!(
                "{}",
                lock(&self.slots.closed)
                    .clone()
                    .unwrap_or_else(|| "the change feed stopped".to_owned())
            ),
            Err(_) => {
                lock(&self.slots.map).remove(saga_id);
                bail!("saga {saga_id} not settled within {SAGA_DEADLINE:?}")
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A batch of sagas to run.
#[derive(Debug, Clone)]
pub struct Load {
    pub definition: String,
    pub count: usize,
    pub concurrency: usize,
    /// Percent of sagas that fail at the rider step (`"zone": "nowhere"`), spread evenly.
    pub fail_pct: u32,
    /// Order ids are `<prefix>-<i>`; unique per batch.
    pub prefix: String,
}

/// Whether the `i`-th saga of a batch with `pct` % failing sagas fails: exactly `pct` of
/// every 100 consecutive sagas do, spread evenly.
pub fn fails(i: usize, pct: u32) -> bool {
    let pct = u64::from(pct.min(100));
    let i = i as u64;
    (i + 1) * pct / 100 > i * pct / 100
}

/// The order-placement (and food-delivery) input of `tests::order_input`, with the rider
/// zone that has no riders when `fail`.
pub fn order_input(order_id: &str, fail: bool) -> Value {
    json!({
        "order_id": order_id,
        "customer_id": "c-1",
        "amount_cents": 2599,
        "card": "tok_visa",
        "store_id": "s-1",
        "items": ["bibimbap"],
        "zone": if fail { "nowhere" } else { "gangnam" },
    })
}

/// What a batch did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Per settled saga, StartSaga sent → settling change received.
    pub latencies: Vec<Duration>,
    pub completed: usize,
    pub compensated: usize,
    /// Parked (WAITING at the awaited step).
    pub parked: usize,
    /// StartSaga refused, not settled in time, FAILED, or ended where it should park.
    pub errors: usize,
    pub first_error: Option<String>,
    /// First StartSaga sent → last saga settled.
    pub wall: Duration,
    /// The ids of the sagas started, in no particular order.
    pub saga_ids: Vec<String>,
}

impl Outcome {
    pub fn settled(&self) -> usize {
        self.completed + self.compensated + self.parked
    }
}

/// Runs `load` with `load.concurrency` workers; `feed` must follow the orchestrator that
/// `client` talks to.
pub async fn drive(client: &Client, feed: &Arc<Feed>, load: &Load, until: &Until) -> Outcome {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..load.concurrency.clamp(1, load.count.max(1)) {
        let mut client = client.clone();
        let feed = feed.clone();
        let next = next.clone();
        let load = load.clone();
        let parks = matches!(until, Until::Parked(_));
        workers.spawn(async move {
            let mut out = Outcome::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= load.count {
                    break;
                }
                let input = order_input(&format!("{}-{i}", load.prefix), fails(i, load.fail_pct));
                match run_one(&mut client, &feed, &load.definition, &input).await {
                    Ok((saga_id, latency, status)) => {
                        out.saga_ids.push(saga_id);
                        let expected = if parks {
                            status == pb::SagaStatus::Waiting
                        } else {
                            matches!(
                                status,
                                pb::SagaStatus::Completed | pb::SagaStatus::Compensated
                            )
                        };
                        if expected {
                            out.latencies.push(latency);
                            match status {
                                pb::SagaStatus::Completed => out.completed += 1,
                                pb::SagaStatus::Compensated => out.compensated += 1,
                                _ => out.parked += 1,
                            }
                        } else {
                            out.errors += 1;
                            out.first_error.get_or_insert_with(|| {
                                format!("a saga ended {}", status.as_str_name())
                            });
                        }
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            out
        });
    }
    let mut total = Outcome::default();
    while let Some(joined) = workers.join_next().await {
        let out = joined.unwrap_or_else(|e| Outcome {
            errors: 1,
            first_error: Some(format!("a worker panicked: {e}")),
            ..Outcome::default()
        });
        total.latencies.extend(out.latencies);
        total.completed += out.completed;
        total.compensated += out.compensated;
        total.parked += out.parked;
        total.errors += out.errors;
        total.saga_ids.extend(out.saga_ids);
        if total.first_error.is_none() {
            total.first_error = out.first_error;
        }
    }
    total.wall = started.elapsed();
    total
}

/// Starts one saga and waits for the feed to settle it: (saga id, latency, status).
async fn run_one(
    client: &mut Client,
    feed: &Feed,
    definition: &str,
    input: &Value,
) -> anyhow::Result<(String, Duration, pb::SagaStatus)> {
    let request = pb::StartSagaRequest {
        definition: definition.to_owned(),
        version: None,
        input: Some(orchestrator::convert::json_to_struct(input)),
        idempotency_key: String::new(),
    };
    let sent = Instant::now();
    let deadline = sent + SAGA_DEADLINE;
    let saga_id = tokio::time::timeout_at(deadline.into(), client.start_saga(request))
        .await
        .context("StartSaga timed out")?
        .context("StartSaga")?
        .into_inner()
        .saga_id;
    let settled = feed.wait(&saga_id, deadline).await?;
    Ok((
        saga_id,
        settled.at.saturating_duration_since(sent),
        settled.status,
    ))
}

/// Latency percentiles (nearest rank) in milliseconds: p50, p90, p99, max.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn percentiles(latencies: &[Duration]) -> Option<Percentiles> {
    if latencies.is_empty() {
        return None;
    }
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    let rank = |p: f64| {
        let n = sorted.len();
        let index = ((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1;
        sorted[index].as_secs_f64() * 1000.0
    };
    Some(Percentiles {
        p50: rank(50.0),
        p90: rank(90.0),
        p99: rank(99.0),
        max: rank(100.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_sagas_are_exactly_the_percentage_spread_evenly() {
        for pct in [0, 1, 10, 33, 50, 100] {
            let failing: Vec<usize> = (0..1000).filter(|i| fails(*i, pct)).collect();
            assert_eq!(failing.len(), pct as usize * 10, "{pct} %");
            // Evenly: never more than one in any run of 100 / pct.
            if pct == 10 {
                assert!(failing.windows(2).all(|w| w[1] - w[0] == 10));
            }
        }
    }

    #[test]
    fn the_input_fails_at_the_rider_only_when_asked() {
        assert_eq!(order_input("o-1", false)["zone"], "gangnam");
        assert_eq!(order_input("o-1", true)["zone"], "nowhere");
        assert_eq!(order_input("o-1", true)["order_id"], "o-1");
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let ms: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let p = percentiles(&ms).unwrap();
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        let one = percentiles(&[Duration::from_millis(7)]).unwrap();
        assert_eq!((one.p50, one.max), (7.0, 7.0));
        assert_eq!(percentiles(&[]), None);
    }

    #[test]
    fn terminal_changes_always_settle_and_parked_ones_only_when_asked() {
        let change = |status: pb::SagaStatus, business: &str| pb::SagaChange {
            status: status as i32,
            business_status: business.to_owned(),
            ..Default::default()
        };
        let parked = Until::Parked("waiting for the store".into());
        assert!(Until::Terminal.settles(&change(pb::SagaStatus::Compensated, "")));
        assert!(parked.settles(&change(pb::SagaStatus::Completed, "delivered")));
        assert!(
            !Until::Terminal.settles(&change(pb::SagaStatus::Waiting, "waiting for the store"))
        );
        assert!(parked.settles(&change(pb::SagaStatus::Waiting, "waiting for the store")));
        assert!(!parked.settles(&change(pb::SagaStatus::Waiting, "paying")));
        assert!(!parked.settles(&change(pb::SagaStatus::Running, "waiting for the store")));
    }
}
