//! The load: clients starting `order-placement` sagas with mixed inputs
//! ([`crate::mixed_input`]), each with its own idempotency key, retried with that same key
//! until the orchestrator acknowledges it, through the crashes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::saga::v1::saga_orchestrator_client::SagaOrchestratorClient;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use crate::mixed_input;
use crate::process::start_saga;

/// An acknowledged StartSaga.
#[derive(Debug, Clone)]
pub struct Ack {
    pub index: usize,
    pub key: String,
    pub saga_id: String,
    /// StartSaga calls it took (1: answered at once).
    pub calls: u32,
}

/// A key that was never acknowledged: refused, or still failing when the load gave up.
#[derive(Debug, Clone)]
pub struct NotAcknowledged {
    pub index: usize,
    pub key: String,
    /// The last error, and whether it was a refusal (not worth retrying).
    pub error: String,
    pub refused: bool,
}

/// Live counts, read by the progress line.
#[derive(Debug, Default)]
pub struct Progress {
    pub started: AtomicUsize,
    pub acknowledged: AtomicUsize,
    pub retried_calls: AtomicUsize,
}

/// What the load did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub acks: Vec<Ack>,
    pub not_acknowledged: Vec<NotAcknowledged>,
    pub retried_calls: usize,
}

/// The idempotency key of the `i`-th saga.
pub fn key(i: usize) -> String {
    format!("chaos-{i}")
}

/// When to give up on a key that is still not acknowledged: set at the heal.
#[derive(Debug, Default)]
pub struct GiveUp(Mutex<Option<Instant>>);

impl GiveUp {
    pub fn set(&self, at: Instant) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(at);
    }

    fn passed(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|at| Instant::now() > at)
    }
}

/// Codes that say the request itself is wrong: retrying the same key cannot help.
fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::AlreadyExists | Code::PermissionDenied | Code::Unimplemented
    )
}

/// Runs `sagas` StartSagas over `concurrency` clients, the `i`-th not before
/// `start + i * spread / sagas`, each retried (backoff with jitter from `seed`) until
/// acknowledged, refused, or past `give_up`.
pub async fn run(
    client: SagaOrchestratorClient<Channel>,
    sagas: usize,
    concurrency: usize,
    spread: Duration,
    seed: u64,
    give_up: Arc<GiveUp>,
    progress: Arc<Progress>,
) -> Outcome {
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..concurrency.max(1) {
        let (mut client, next, give_up, progress) = (
            client.clone(),
            next.clone(),
            give_up.clone(),
            progress.clone(),
        );
        let mut rng = fastrand::Rng::with_seed(seed ^ (worker as u64).wrapping_mul(0x9e37_79b9));
        workers.spawn(async move {
            let mut outcome = Outcome::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= sagas {
                    return outcome;
                }
                // The load is spread over the run: this is the saga's moment, not a wait
                // for a condition.
                tokio::time::sleep_until(start + spread.mul_f64(i as f64 / sagas as f64)).await;
                progress.started.fetch_add(1, Ordering::Relaxed);
                let (input, key) = (mixed_input(i), key(i));
                let mut calls = 0u32;
                let mut backoff = Duration::from_millis(20);
                loop {
                    calls += 1;
                    match start_saga(&mut client, &input, &key).await {
                        Ok(answer) => {
                            progress.acknowledged.fetch_add(1, Ordering::Relaxed);
                            outcome.acks.push(Ack {
                                index: i,
                                key: key.clone(),
                                saga_id: answer.saga_id,
                                calls,
                            });
                            break;
                        }
                        Err(status) => {
                            let refused = is_refusal(status.code());
                            if refused || give_up.passed() {
                                outcome.not_acknowledged.push(NotAcknowledged {
                                    index: i,
                                    key: key.clone(),
                                    error: format!("{:?}: {}", status.code(), status.message()),
                                    refused,
                                });
                                break;
                            }
                            outcome.retried_calls += 1;
                            progress.retried_calls.fetch_add(1, Ordering::Relaxed);
                            // The orchestrator is down, paused or failing: back off (with
                            // jitter, so the clients do not come back in step).
                            tokio::time::sleep(backoff.mul_f64(0.5 + rng.f64() / 2.0)).await;
                            backoff = (backoff * 2).min(Duration::from_millis(500));
                        }
                    }
                }
            }
        });
    }
    let mut all = Outcome::default();
    while let Some(result) = workers.join_next().await {
        match result {
            Ok(outcome) => {
                all.acks.extend(outcome.acks);
                all.not_acknowledged.extend(outcome.not_acknowledged);
                all.retried_calls += outcome.retried_calls;
            }
            Err(e) => tracing::error!(error = %e, "a load client panicked"),
        }
    }
    all.acks.sort_by_key(|a| a.index);
    all.not_acknowledged.sort_by_key(|a| a.index);
    all
}
