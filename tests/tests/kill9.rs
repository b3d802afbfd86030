//! `kill -9` of the orchestrator process at random moments while a few hundred sagas of
//! mixed outcomes run; each time it is restarted on the same data directory. Clients retry
//! StartSaga with the same idempotency key until answered. At the end every acknowledged
//! saga must exist and be terminal, and the ledgers must show no doubled, missing or
//! misordered effect. The seed is printed; `SAGA_KILL_SEED=N` replays a schedule.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tests::invariants;
use tests::mixed_input;
use tests::process::{OrchestratorProcess, Participants, start_saga, wait_all_terminal};
use tokio::sync::watch;

const BIN: &str = env!("CARGO_BIN_EXE_crashable-orchestrator");
const SAGAS: usize = 300;
const WORKERS: usize = 16;
const KILLS: usize = 6;

/// A StartSaga answer: the saga id, and whether the call had to be retried after a kill.
type Answer = (String, bool);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_and_doubles_nothing() -> anyhow::Result<()> {
    let seed = std::env::var("SAGA_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(7, |d| d.as_nanos() as u64)
        });
    let mut rng = fastrand::Rng::with_seed(seed);
    let participants = Participants::start().await?;
    let data = participants.dir.path().join("orchestrator");
    let mut orchestrator = OrchestratorProcess::spawn(BIN, &data, &participants, None).await?;
    let started = Instant::now();

    // Clients: each takes the next saga and retries it, with the same key, until answered.
    let (client_tx, client_rx) = watch::channel(orchestrator.client.clone());
    let next = Arc::new(AtomicUsize::new(0));
    let answers: Arc<Mutex<Vec<Option<Answer>>>> = Arc::new(Mutex::new(vec![None; SAGAS]));
    let retries = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (next, answers, retries, mut rx) = (
            next.clone(),
            answers.clone(),
            retries.clone(),
            client_rx.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= SAGAS {
                    return Ok::<_, anyhow::Error>(());
                }
                let mut tried = false;
                loop {
                    let mut client = rx.borrow_and_update().clone();
                    match start_saga(&mut client, &mixed_input(i), &format!("key-{i}")).await {
                        Ok(answer) => {
                            answers.lock().expect("lock")[i] = Some((answer.saga_id, tried));
                            break;
                        }
                        Err(_) => {
                            // The orchestrator is down: wait for the next one.
                            tried = true;
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::timeout(Duration::from_secs(30), rx.changed())
                                .await
                                .context("no new orchestrator within 30s")??;
                        }
                    }
                }
            }
        }));
    }

    // The killer: kill -9 after a random pause, restart, again.
    for _ in 0..KILLS {
        // The pause is the random moment of the crash, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(rng.u64(50..400))).await;
        orchestrator.kill().await?;
        orchestrator = OrchestratorProcess::spawn(BIN, &data, &participants, None).await?;
        client_tx.send(orchestrator.client.clone())?;
    }
    for worker in workers {
        worker.await??;
    }
    let answers: Vec<Answer> = answers
        .lock()
        .expect("lock")
        .iter()
        .map(|a| a.clone().expect("every saga answered"))
        .collect();
    let ids: Vec<String> = answers.iter().map(|(id, _)| id.clone()).collect();
    let heal = Instant::now();
    let sagas = wait_all_terminal(&orchestrator.client, &ids, Duration::from_secs(120)).await?;
    let to_terminal = heal.elapsed();

    // The same keys again: the same sagas, none created.
    let mut client = orchestrator.client.clone();
    for (i, id) in ids.iter().enumerate() {
        let again = start_saga(&mut client, &mixed_input(i), &format!("key-{i}")).await?;
        assert_eq!((&again.saga_id, again.created), (id, false), "key-{i}");
    }
    let figures = invariants::check(&participants, &sagas).await?;
    orchestrator.kill().await?;
    let report = orchestrator::check::check_dir(&data)?;
    assert!(
        report.is_clean(),
        "replay disagrees with the store:\n{}",
        report.problems.join("\n")
    );
    println!(
        "kill -9 test (seed {seed}): {SAGAS} sagas started, {} answered, {KILLS} kills, {} StartSaga calls retried after a kill; \
         {figures}; replay check clean for {} sagas; all terminal {:?} after the last restart; {:?} in all",
        answers.len(),
        retries.load(Ordering::Relaxed),
        report.sagas,
        to_terminal,
        started.elapsed()
    );
    participants.shutdown().await?;
    Ok(())
}
