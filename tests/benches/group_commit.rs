//! Group commit under load: order-placement sagas run to completion against a real
//! [`Cluster`] (participants and orchestrator in-process on loopback, temporary data), with
//! 1 and with 64 sagas in flight.
//!
//! One criterion iteration is one saga's share of a batch: a batch of `iters` sagas is run by
//! `concurrency` workers (each starts a saga, watches it to its end, and takes the next), and
//! the batch's wall time is reported. So criterion's time per iteration is the inverse of the
//! throughput. After each concurrency level a summary line gives the throughput and how well
//! the orchestrator's writer batched: flushes (fsyncs) per saga and events per flush, from
//! the store's counters over every saga run at that level (warm-up included).
//!
//! `cargo bench -p tests --bench group_commit`

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use proto::saga::v1 as pb;
use proto::saga::v1::saga_orchestrator_client::SagaOrchestratorClient;
use saga_store::SagaStore;
use tests::{Cluster, DEADLINE, order_input};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use tonic::transport::Channel;

const DEFINITION: &str = "order-placement";
const CONCURRENCY: [u64; 2] = [1, 64];

/// What was run at one concurrency level, over all of criterion's batches.
#[derive(Default)]
struct Totals {
    sagas: u64,
    wall: Duration,
    flushes: u64,
    events: u64,
}

impl Totals {
    fn report(&self, concurrency: u64) {
        let per_second = self.sagas as f64 / self.wall.as_secs_f64().max(f64::EPSILON);
        let flushes_per_saga = self.flushes as f64 / self.sagas.max(1) as f64;
        let events_per_flush = self.events as f64 / self.flushes.max(1) as f64;
        println!(
            "group_commit: concurrency {concurrency:>3}: {} sagas in {:.2?}, {per_second:.1} sagas/s (wall), \
             {flushes_per_saga:.2} orchestrator flushes/saga, {events_per_flush:.2} events/flush",
            self.sagas, self.wall
        );
    }
}

fn group_commit(c: &mut Criterion) {
    let runtime = match Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => fail(format_args!("cannot start the tokio runtime: {e}")),
    };
    let cluster = match runtime.block_on(Cluster::start()) {
        Ok(cluster) => cluster,
        Err(e) => fail(format_args!("cannot start the cluster: {e:#}")),
    };
    // Order ids stay unique over every batch of every level.
    let next_order = Arc::new(AtomicU64::new(0));

    let mut group = c.benchmark_group("group_commit");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        // Every sample runs the same number of sagas, so that 64 workers all have work.
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(1));
    for concurrency in CONCURRENCY {
        let totals = RefCell::new(Totals::default());
        group.bench_with_input(
            BenchmarkId::new("order_placement", concurrency),
            &concurrency,
            |b, &concurrency| {
                b.to_async(&runtime).iter_custom(|iters| {
                    let client = cluster.client.clone();
                    let next_order = Arc::clone(&next_order);
                    let cluster = &cluster;
                    let totals = &totals;
                    async move {
                        let before = cluster.orchestrator().store().stats();
                        let wall = match run_batch(client, next_order, iters, concurrency).await {
                            Ok(wall) => wall,
                            Err(e) => fail(format_args!("batch of {iters} sagas failed: {e:#}")),
                        };
                        let after = cluster.orchestrator().store().stats();
                        let mut totals = totals.borrow_mut();
                        totals.sagas += iters;
                        totals.wall += wall;
                        totals.flushes += after.flushes - before.flushes;
                        totals.events += after.events - before.events;
                        wall
                    }
                });
            },
        );
        totals.borrow().report(concurrency);
    }
    group.finish();

    if let Err(e) = runtime.block_on(cluster.shutdown()) {
        fail(format_args!("cannot shut the cluster down: {e:#}"));
    }
}

/// Ends the bench at once: a panic would unwind into dropping the runtime, which waits for
/// every blocking task, possibly forever if the cluster is stuck.
fn fail(message: std::fmt::Arguments<'_>) -> ! {
    eprintln!("group_commit: {message}");
    std::process::exit(1)
}

/// Runs `count` sagas with `concurrency` workers; returns the wall time until the last one
/// completed.
async fn run_batch(
    client: SagaOrchestratorClient<Channel>,
    next_order: Arc<AtomicU64>,
    count: u64,
    concurrency: u64,
) -> anyhow::Result<Duration> {
    let remaining = Arc::new(AtomicU64::new(count));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.min(count) {
        let mut client = client.clone();
        let remaining = Arc::clone(&remaining);
        let next_order = Arc::clone(&next_order);
        workers.spawn(async move {
            while take_one(&remaining) {
                let order = next_order.fetch_add(1, Ordering::Relaxed);
                run_saga(&mut client, &format!("bench-{order}")).await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined.context("worker panicked")??;
    }
    Ok(started.elapsed())
}

/// Takes one saga from the batch, if any is left.
fn take_one(remaining: &AtomicU64) -> bool {
    remaining
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// Starts one order-placement saga and watches it (under [`DEADLINE`]) until it completes.
async fn run_saga(
    client: &mut SagaOrchestratorClient<Channel>,
    order_id: &str,
) -> anyhow::Result<()> {
    let input = order_input(order_id, serde_json::json!({}));
    let saga_id = client
        .start_saga(pb::StartSagaRequest {
            definition: DEFINITION.to_owned(),
            version: None,
            input: Some(orchestrator::convert::json_to_struct(&input)),
            idempotency_key: String::new(),
        })
        .await
        .with_context(|| format!("start saga for {order_id}"))?
        .into_inner()
        .saga_id;
    let last = tokio::time::timeout(DEADLINE, async {
        let mut stream = client
            .watch_saga(pb::WatchSagaRequest {
                saga_id: saga_id.clone(),
            })
            .await?
            .into_inner();
        let mut last = None;
        while let Some(event) = stream.message().await? {
            last = Some(event);
        }
        Ok::<_, tonic::Status>(last)
    })
    .await
    .with_context(|| format!("saga {saga_id} not terminal within {DEADLINE:?}"))?
    .with_context(|| format!("watch saga {saga_id}"))?;
    let status = last.map(|event| event.status);
    if status != Some(pb::SagaStatus::Completed as i32) {
        bail!("saga {saga_id} ended with status {status:?}, not COMPLETED");
    }
    Ok(())
}

criterion_group!(benches, group_commit);
criterion_main!(benches);
