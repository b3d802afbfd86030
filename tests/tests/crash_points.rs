//! One test per named crash point: the orchestrator process runs with that failpoint set to
//! crash (exit at once: no destructor, no flush), is restarted on the same data directory
//! without it, and the durability invariants are checked: every acknowledged saga exists and
//! is terminal, repeated idempotency keys give the same saga, no effect is doubled, completed
//! sagas keep their effects, compensated sagas undo theirs in reverse order, and replaying
//! every log gives exactly the stored state.

use std::time::Duration;

use tests::invariants;
use tests::mixed_input;
use tests::process::{OrchestratorProcess, Participants, start_saga, wait_all_terminal};

const BIN: &str = env!("CARGO_BIN_EXE_crashable-orchestrator");
const SAGAS: usize = 12;

/// What a scenario observed, for point-specific assertions.
struct Outcome {
    /// Sagas whose StartSaga was answered before the crash.
    acked_before: usize,
    /// Keys retried after the restart that named a saga created before the crash.
    found_after: usize,
}

async fn crash_at(point: &str, config: &str) -> anyhow::Result<Outcome> {
    let participants = Participants::start().await?;
    let data = participants.dir.path().join("orchestrator");
    // A first start stores the definitions, so the crash lands on saga traffic.
    OrchestratorProcess::spawn(BIN, &data, &participants, None)
        .await?
        .kill()
        .await?;
    let mut orchestrator = OrchestratorProcess::spawn(
        BIN,
        &data,
        &participants,
        Some(&format!("{point}={config}")),
    )
    .await?;

    // Start the sagas concurrently; some are answered before the crash, some not.
    let mut calls = Vec::new();
    for i in 0..SAGAS {
        let mut client = orchestrator.client.clone();
        calls.push(tokio::spawn(async move {
            start_saga(&mut client, &mixed_input(i), &format!("key-{i}")).await
        }));
    }
    let mut acked = vec![None; SAGAS];
    for (i, call) in calls.into_iter().enumerate() {
        if let Ok(started) = call.await? {
            acked[i] = Some(started.saga_id);
        }
    }
    let status = orchestrator.wait_exit(Duration::from_secs(30)).await?;
    assert_eq!(
        status.code(),
        Some(saga_store::CRASH_EXIT_CODE),
        "failpoint {point} was never hit:\n{}",
        orchestrator.log()
    );
    let acked_before = acked.iter().flatten().count();

    // Restart without failpoints; every key again: answered ones must name the same saga.
    let mut orchestrator = OrchestratorProcess::spawn(BIN, &data, &participants, None).await?;
    let mut ids = Vec::new();
    let mut found_after = 0;
    for (i, before) in acked.iter().enumerate() {
        let again = start_saga(
            &mut orchestrator.client,
            &mixed_input(i),
            &format!("key-{i}"),
        )
        .await?;
        if let Some(before) = before {
            assert_eq!(
                &again.saga_id, before,
                "key-{i} named another saga after the crash"
            );
            assert!(!again.created, "key-{i} created a second saga");
        } else if !again.created {
            found_after += 1;
        }
        ids.push(again.saga_id);
    }
    let sagas = wait_all_terminal(&orchestrator.client, &ids, Duration::from_secs(60)).await?;
    let figures = invariants::check(&participants, &sagas).await?;
    println!("{point}: {acked_before} answered before the crash; {figures}");

    orchestrator.kill().await?;
    let report = orchestrator::check::check_dir(&data)?;
    assert!(
        report.is_clean(),
        "replay disagrees with the store:\n{}",
        report.problems.join("\n")
    );
    assert_eq!(report.sagas, SAGAS);
    participants.shutdown().await?;
    Ok(Outcome {
        acked_before,
        found_after,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_the_saga_is_written_before_the_flush() -> anyhow::Result<()> {
    let outcome = crash_at("store::before_flush", "return").await?;
    assert_eq!(
        outcome.acked_before, 0,
        "nothing may be answered before its flush"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_the_flush_before_the_client_is_answered() -> anyhow::Result<()> {
    let outcome = crash_at("api::after_start_before_reply", "return").await?;
    assert_eq!(outcome.acked_before, 0);
    assert!(
        outcome.found_after >= 1,
        "the durable, unanswered saga must be found again by its key"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_a_step_intent_is_stored_before_the_call() -> anyhow::Result<()> {
    crash_at("runtime::after_intent_before_call", "3*off->return").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_the_call_returns_before_its_result_is_stored() -> anyhow::Result<()> {
    crash_at("runtime::after_call_before_result", "5*off->return").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_in_the_middle_of_a_compensation_chain() -> anyhow::Result<()> {
    crash_at("runtime::before_compensation_call", "1*off->return").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_two_writes_of_one_batch() -> anyhow::Result<()> {
    crash_at("store::between_writes", "return").await?;
    Ok(())
}
