//! SIGTERM in the middle of a load: the orchestrator stops accepting, hands its in-flight
//! work back to the store (the intents are durable; the calls are made again, with the same
//! idempotency keys, by the next process), flushes, and exits 0 within its shutdown grace.
//! Nothing acknowledged is lost and no effect is doubled.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use participants::Kind;
use tests::invariants;
use tests::mixed_input;
use tests::process::{OrchestratorProcess, Participants, start_saga, wait_all_terminal};
use tokio::sync::watch;

const BIN: &str = env!("CARGO_BIN_EXE_crashable-orchestrator");
const SAGAS: usize = 120;
const WORKERS: usize = 12;
/// The orchestrator's default `--shutdown-grace`.
const GRACE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_load_drains_in_time_and_loses_nothing() -> anyhow::Result<()> {
    let participants = Participants::start().await?;
    // Slow riders: calls are in flight when the signal comes.
    participants
        .get(Kind::Rider)
        .faults
        .set_delay("RequestDelivery", Duration::from_millis(150));
    let data = participants.dir.path().join("orchestrator");
    let orchestrator = OrchestratorProcess::spawn(BIN, &data, &participants, None).await?;

    let (client_tx, client_rx) = watch::channel(orchestrator.client.clone());
    let next = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let answers: Arc<Mutex<Vec<Option<String>>>> = Arc::new(Mutex::new(vec![None; SAGAS]));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (next, answered, answers, mut rx) = (
            next.clone(),
            answered.clone(),
            answers.clone(),
            client_rx.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= SAGAS {
                    return Ok::<_, anyhow::Error>(());
                }
                loop {
                    let mut client = rx.borrow_and_update().clone();
                    match start_saga(&mut client, &mixed_input(i), &format!("drain-{i}")).await {
                        Ok(answer) => {
                            answers.lock().expect("lock")[i] = Some(answer.saga_id);
                            answered.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        // Draining or gone: retry the same key on the next process.
                        Err(_) => {
                            tokio::time::timeout(Duration::from_secs(60), rx.changed())
                                .await
                                .context("no new orchestrator within 60s")??;
                        }
                    }
                }
            }
        }));
    }

    // Mid-load: a third of the sagas answered, calls to the slow rider in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    while answered.load(Ordering::Relaxed) < SAGAS / 3 {
        anyhow::ensure!(Instant::now() < deadline, "the load did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut orchestrator = orchestrator;
    let signalled = Instant::now();
    orchestrator.terminate()?;
    let status = orchestrator
        .wait_exit(GRACE + Duration::from_secs(5))
        .await?;
    let drained_in = signalled.elapsed();
    assert!(
        status.success(),
        "exit status {status} after SIGTERM; log:\n{}",
        orchestrator.log()
    );
    assert!(drained_in < GRACE, "took {drained_in:?} to drain");

    let next_process = OrchestratorProcess::spawn(BIN, &data, &participants, None).await?;
    client_tx.send(next_process.client.clone())?;
    for worker in workers {
        worker.await??;
    }
    let ids: Vec<String> = answers
        .lock()
        .expect("lock")
        .iter()
        .map(|a| a.clone().expect("every saga answered"))
        .collect();
    let sagas = wait_all_terminal(&next_process.client, &ids, Duration::from_secs(120)).await?;
    let figures = invariants::check(&participants, &sagas).await?;
    let mut next_process = next_process;
    next_process.terminate()?;
    assert!(
        next_process
            .wait_exit(GRACE + Duration::from_secs(5))
            .await?
            .success()
    );
    let report = orchestrator::check::check_dir(&data)?;
    assert!(report.is_clean(), "{}", report.problems.join("\n"));
    println!("SIGTERM drain: exited 0 in {drained_in:?}; {figures}");
    participants.shutdown().await?;
    Ok(())
}
