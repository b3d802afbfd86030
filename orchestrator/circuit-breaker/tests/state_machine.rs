//! The breaker's state machine through its public API: `try_acquire`, `Permit::record`,
//! `set_mode`, `ready`, `snapshot`, `subscribe`. Time is tokio's paused clock.

use std::time::{Duration, SystemTime};

use circuit_breaker::{CallClock, CircuitBreaker, Config, Mode, Outcome, SlidingWindow, State};
use futures::FutureExt;
use tokio::time::{advance, timeout};

const WAIT: Duration = Duration::from_secs(10);
const SLOW: Duration = Duration::from_secs(2);

/// Count window of 10, judged from 4 calls, 50% thresholds, 10s in open, 2 probes.
fn config() -> Config {
    Config {
        window: SlidingWindow::Count(10),
        minimum_calls: 4,
        failure_rate_threshold: 50.0,
        slow_call_duration: SLOW,
        slow_call_rate_threshold: 50.0,
        wait_in_open: WAIT,
        wait_in_open_multiplier: 1.0,
        max_wait_in_open: WAIT,
        permitted_calls_in_half_open: 2,
        // Paused time moves tokio's clock, not the kernel's.
        call_clock: CallClock::Runtime,
    }
}

fn call(breaker: &CircuitBreaker, outcome: Outcome) {
    breaker
        .try_acquire()
        .expect("the call is admitted")
        .record(outcome);
}

fn calls(breaker: &CircuitBreaker, outcomes: &[Outcome]) {
    for &outcome in outcomes {
        call(breaker, outcome);
    }
}

use Outcome::{Failure, Success};

/// Opens `breaker` (with `config()`) by four failures.
fn open(breaker: &CircuitBreaker) {
    calls(breaker, &[Failure; 4]);
    assert_eq!(breaker.state(), State::Open);
}

fn assert_close(actual: Option<f64>, expected: f64) {
    let actual = actual.expect("a rate");
    assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
}

fn until_probe(breaker: &CircuitBreaker) -> Duration {
    breaker
        .snapshot()
        .next_probe_at
        .expect("open")
        .duration_since(SystemTime::now())
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn closed_to_open_by_failure_rate() {
    let b = CircuitBreaker::new("payment", config());
    calls(&b, &[Failure, Success, Failure]);
    let snapshot = b.snapshot();
    assert_eq!(snapshot.state, State::Closed);
    assert_eq!((snapshot.calls, snapshot.failures), (3, 2));
    assert_eq!(
        snapshot.failure_rate, None,
        "3 calls are fewer than the minimum"
    );
    assert_eq!(snapshot.slow_call_rate, None);

    call(&b, Success);
    let snapshot = b.snapshot();
    assert_eq!(snapshot.state, State::Open, "2 failures in 4 calls is 50%");
    assert_eq!(snapshot.name, "payment");
    assert_eq!(
        (snapshot.calls, snapshot.failures, snapshot.slow_calls),
        (4, 2, 0)
    );
    assert_close(snapshot.failure_rate, 50.0);
    assert_close(snapshot.slow_call_rate, 0.0);
    assert_eq!(snapshot.openings, 1);
    let wait = until_probe(&b);
    assert!(
        wait > WAIT - Duration::from_secs(1) && wait <= WAIT,
        "{wait:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn below_the_threshold_stays_closed() {
    let b = CircuitBreaker::new("payment", config());
    calls(&b, &[Failure, Success, Success, Success, Failure, Success]);
    let snapshot = b.snapshot();
    assert_eq!(snapshot.state, State::Closed);
    assert_close(snapshot.failure_rate, 100.0 / 3.0);
    assert_eq!(snapshot.next_probe_at, None);
}

#[tokio::test(start_paused = true)]
async fn minimum_calls_are_respected() {
    let b = CircuitBreaker::new(
        "payment",
        Config {
            minimum_calls: 5,
            ..config()
        },
    );
    calls(&b, &[Failure; 4]);
    let snapshot = b.snapshot();
    assert_eq!(
        snapshot.state,
        State::Closed,
        "100% failures, but only 4 of 5 calls"
    );
    assert_eq!(snapshot.failure_rate, None);
    call(&b, Failure);
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn closed_to_open_by_slow_call_rate() {
    let b = CircuitBreaker::new("payment", config());
    for slow in [true, false, true] {
        let permit = b.try_acquire().unwrap();
        if slow {
            advance(SLOW).await; // exactly the slow-call duration counts as slow
        } else {
            advance(SLOW - Duration::from_millis(1)).await;
        }
        permit.record(Success);
    }
    assert_eq!(b.state(), State::Closed);
    call(&b, Success);
    let snapshot = b.snapshot();
    assert_eq!(snapshot.state, State::Open, "2 slow calls in 4 is 50%");
    assert_eq!(
        (snapshot.calls, snapshot.failures, snapshot.slow_calls),
        (4, 0, 2)
    );
    assert_close(snapshot.failure_rate, 0.0);
    assert_close(snapshot.slow_call_rate, 50.0);
}

#[tokio::test(start_paused = true)]
async fn open_rejects_until_the_wait_elapses_then_half_opens() {
    let b = CircuitBreaker::new("payment", config());
    open(&b);
    let rejected = b.try_acquire().unwrap_err();
    assert_eq!(rejected.breaker, "payment");
    assert_eq!(rejected.state, State::Open);
    assert_eq!(rejected.retry_after, Some(WAIT));

    advance(Duration::from_secs(4)).await;
    let rejected = b.try_acquire().unwrap_err();
    assert_eq!(rejected.retry_after, Some(Duration::from_secs(6)));
    assert_eq!(
        rejected.to_string(),
        "circuit breaker `payment` is open; the call was not sent (retry after 6s)"
    );

    advance(Duration::from_secs(6) - Duration::from_nanos(1)).await;
    assert!(b.try_acquire().is_err());
    advance(Duration::from_nanos(1)).await;
    assert_eq!(b.state(), State::Open, "the move to half-open is lazy");
    let probe = b.try_acquire().expect("a probe may go");
    assert_eq!(b.state(), State::HalfOpen);
    let snapshot = b.snapshot();
    assert_eq!((snapshot.calls, snapshot.failure_rate), (0, None));
    assert_eq!(snapshot.next_probe_at, None);
    drop(probe);
}

#[tokio::test(start_paused = true)]
async fn half_open_to_closed_when_probes_succeed() {
    let b = CircuitBreaker::new("payment", config());
    open(&b);
    advance(WAIT).await;
    let first = b.try_acquire().unwrap();
    let second = b.try_acquire().unwrap();
    let rejected = b.try_acquire().unwrap_err();
    assert_eq!(
        (rejected.state, rejected.retry_after),
        (State::HalfOpen, None)
    );

    first.record(Success);
    assert_eq!(b.state(), State::HalfOpen, "waits for every probe");
    let snapshot = b.snapshot();
    assert_eq!((snapshot.calls, snapshot.failure_rate), (1, None));
    second.record(Failure);
    // 1 failure in 2 probes is 50%: at the threshold, so the breaker reopens...
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.snapshot().openings, 2);

    // ...and after another wait, two good probes close it with a fresh window.
    advance(WAIT).await;
    calls(&b, &[Success, Success]);
    let snapshot = b.snapshot();
    assert_eq!(snapshot.state, State::Closed);
    assert_eq!(
        (snapshot.calls, snapshot.failures, snapshot.openings),
        (0, 0, 0)
    );
    assert_eq!(snapshot.failure_rate, None);
}

#[tokio::test(start_paused = true)]
async fn half_open_to_open_on_slow_probes() {
    let b = CircuitBreaker::new("payment", config());
    open(&b);
    advance(WAIT).await;
    let first = b.try_acquire().unwrap();
    let second = b.try_acquire().unwrap();
    first.record(Success);
    advance(SLOW).await;
    second.record(Success);
    let snapshot = b.snapshot();
    assert_eq!(snapshot.state, State::Open, "one slow probe in two is 50%");
    assert_eq!((snapshot.calls, snapshot.slow_calls), (2, 1));
    assert_close(snapshot.slow_call_rate, 50.0);
}

#[tokio::test(start_paused = true)]
async fn the_wait_grows_exponentially_up_to_its_cap_and_resets_on_close() {
    let b = CircuitBreaker::new(
        "payment",
        Config {
            wait_in_open: Duration::from_secs(1),
            wait_in_open_multiplier: 2.0,
            max_wait_in_open: Duration::from_secs(5),
            permitted_calls_in_half_open: 1,
            ..config()
        },
    );
    open(&b);
    let mut waits = Vec::new();
    for _ in 0..5 {
        let wait = b.try_acquire().unwrap_err().retry_after.unwrap();
        waits.push(wait.as_secs());
        // `next_probe_at` is wall-clock time, which paused tokio time does not stop.
        assert!(wait - until_probe(&b) < Duration::from_millis(100));
        advance(wait).await;
        call(&b, Failure); // the probe fails: open again, for longer
    }
    assert_eq!(waits, [1, 2, 4, 5, 5]);
    assert_eq!(b.snapshot().openings, 6);

    advance(Duration::from_secs(5)).await;
    call(&b, Success);
    assert_eq!(b.state(), State::Closed);
    open(&b);
    assert_eq!(
        b.try_acquire().unwrap_err().retry_after,
        Some(Duration::from_secs(1)),
        "closing resets the consecutive openings"
    );
}

#[tokio::test(start_paused = true)]
async fn forced_open_rejects_everything_until_normal() {
    let b = CircuitBreaker::new("payment", config());
    b.set_mode(Mode::ForcedOpen);
    assert_eq!(b.state(), State::ForcedOpen);
    let rejected = b.try_acquire().unwrap_err();
    assert_eq!(
        (rejected.state, rejected.retry_after),
        (State::ForcedOpen, None)
    );
    advance(Duration::from_secs(3600)).await;
    assert!(b.try_acquire().is_err(), "no wait ends a forced opening");
    assert!(
        timeout(Duration::from_secs(60), b.ready()).await.is_err(),
        "never ready while forced open"
    );

    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.ready().await }
    });
    tokio::task::yield_now().await;
    b.set_mode(Mode::Normal);
    timeout(Duration::from_millis(1), waiter)
        .await
        .expect("the mode change wakes ready()")
        .unwrap();
    assert_eq!(b.state(), State::Closed);
    call(&b, Success);
}

#[tokio::test(start_paused = true)]
async fn disabled_admits_everything_and_records_nothing() {
    let b = CircuitBreaker::new("payment", config());
    calls(&b, &[Failure; 3]);
    b.set_mode(Mode::Disabled);
    for _ in 0..100 {
        call(&b, Failure);
    }
    // A half-open style permit does not exist while disabled: dropping permits is harmless.
    for _ in 0..100 {
        drop(b.try_acquire().unwrap());
    }
    assert_eq!(b.state(), State::Disabled);
    let snapshot = b.snapshot();
    assert_eq!(
        (snapshot.calls, snapshot.failures),
        (3, 3),
        "nothing was recorded"
    );
    timeout(Duration::from_millis(1), b.ready())
        .await
        .expect("ready while disabled");

    b.set_mode(Mode::Normal);
    let snapshot = b.snapshot();
    assert_eq!((snapshot.state, snapshot.calls), (State::Closed, 0));
}

#[tokio::test(start_paused = true)]
async fn normal_mode_resets_an_open_breaker() {
    let b = CircuitBreaker::new("payment", config());
    open(&b);
    b.set_mode(Mode::Normal);
    let snapshot = b.snapshot();
    assert_eq!(snapshot.state, State::Closed);
    assert_eq!(
        (snapshot.calls, snapshot.failures, snapshot.openings),
        (0, 0, 0)
    );
    assert_eq!(snapshot.next_probe_at, None);
    calls(&b, &[Failure; 3]);
    assert_eq!(b.state(), State::Closed, "the window starts empty");
}

#[tokio::test(start_paused = true)]
async fn count_window_forgets_old_calls() {
    let b = CircuitBreaker::new(
        "payment",
        Config {
            window: SlidingWindow::Count(4),
            ..config()
        },
    );
    calls(&b, &[Failure, Success, Success, Success]);
    calls(&b, &[Success]);
    let snapshot = b.snapshot();
    assert_eq!(
        (snapshot.calls, snapshot.failures),
        (4, 0),
        "the failure left the window"
    );
    calls(&b, &[Failure]);
    assert_eq!(b.state(), State::Closed, "1 failure in 4");
    calls(&b, &[Failure]);
    assert_eq!(b.state(), State::Open, "2 failures in the last 4");
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_old_calls() {
    let b = CircuitBreaker::new(
        "payment",
        Config {
            window: SlidingWindow::Time(Duration::from_secs(10)),
            minimum_calls: 4,
            ..config()
        },
    );
    calls(&b, &[Failure, Failure, Failure]);
    advance(Duration::from_secs(9)).await;
    assert_eq!(b.snapshot().calls, 3);
    advance(Duration::from_secs(1)).await;
    let snapshot = b.snapshot();
    assert_eq!(
        (snapshot.calls, snapshot.failures),
        (0, 0),
        "aged out after 10s"
    );

    calls(&b, &[Failure, Success, Success]);
    advance(Duration::from_secs(5)).await;
    assert_eq!(b.state(), State::Closed);
    call(&b, Failure);
    let snapshot = b.snapshot();
    assert_eq!(
        snapshot.state,
        State::Open,
        "2 failures among 4 calls within 10s"
    );
    assert_close(snapshot.failure_rate, 50.0);
}

#[tokio::test(start_paused = true)]
async fn time_window_needs_the_minimum_within_the_window() {
    let b = CircuitBreaker::new(
        "payment",
        Config {
            window: SlidingWindow::Time(Duration::from_secs(10)),
            minimum_calls: 4,
            ..config()
        },
    );
    for _ in 0..10 {
        call(&b, Failure);
        advance(Duration::from_secs(4)).await;
    }
    // Never more than 3 calls in any 10s: the breaker cannot judge.
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.snapshot().failure_rate, None);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_probe_frees_its_slot() {
    let b = CircuitBreaker::new("payment", config());
    open(&b);
    advance(WAIT).await;
    let first = b.try_acquire().unwrap();
    let second = b.try_acquire().unwrap();
    assert!(b.try_acquire().is_err());
    drop(second); // cancelled: nothing recorded
    let third = b.try_acquire().expect("the cancelled probe's slot");
    first.record(Success);
    third.record(Success);
    let snapshot = b.snapshot();
    assert_eq!(snapshot.state, State::Closed);
}

#[tokio::test(start_paused = true)]
async fn ready_resolves_when_a_probe_may_go() {
    let b = CircuitBreaker::new("payment", config());
    timeout(Duration::from_millis(1), b.ready())
        .await
        .expect("ready while closed");
    open(&b);

    let start = tokio::time::Instant::now();
    assert!(
        timeout(WAIT - Duration::from_millis(1), b.ready())
            .await
            .is_err(),
        "not ready while the wait lasts"
    );
    b.ready().await;
    assert_eq!(start.elapsed(), WAIT, "ready exactly when the wait ends");
    assert_eq!(
        b.state(),
        State::HalfOpen,
        "ready() noticed the elapsed wait"
    );

    // Half-open with every slot taken: ready once a slot is freed.
    let first = b.try_acquire().unwrap();
    let second = b.try_acquire().unwrap();
    let mut ready = Box::pin(b.ready());
    assert!((&mut ready).now_or_never().is_none());
    drop(second);
    timeout(Duration::from_millis(1), ready)
        .await
        .expect("a freed slot wakes ready()");

    // And when the probes reopen the breaker, ready waits for the next wait.
    let second = b.try_acquire().unwrap();
    let waiter = tokio::spawn({
        let b = b.clone();
        async move {
            let start = tokio::time::Instant::now();
            b.ready().await;
            start.elapsed()
        }
    });
    tokio::task::yield_now().await;
    first.record(Failure);
    second.record(Failure);
    assert_eq!(b.state(), State::Open);
    assert_eq!(waiter.await.unwrap(), WAIT);
}

#[tokio::test(start_paused = true)]
async fn many_ready_waiters_wake_together() {
    let b = CircuitBreaker::new("payment", config());
    b.set_mode(Mode::ForcedOpen);
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move { b.ready().await })
        })
        .collect();
    tokio::task::yield_now().await;
    b.set_mode(Mode::Disabled);
    for waiter in waiters {
        timeout(Duration::from_millis(1), waiter)
            .await
            .expect("woken")
            .unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_breaker() {
    let b = CircuitBreaker::new("payment", config());
    let clone = b.clone();
    calls(&clone, &[Failure; 4]);
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.config(), &config());
    assert_eq!(clone.name(), "payment");
}

#[tokio::test(start_paused = true)]
async fn subscribers_see_every_state() {
    let b = CircuitBreaker::new("payment", config());
    let mut states = b.subscribe();
    assert_eq!(*states.borrow_and_update(), State::Closed);
    open(&b);
    states.changed().await.unwrap();
    assert_eq!(*states.borrow_and_update(), State::Open);
    advance(WAIT).await;
    b.ready().await;
    states.changed().await.unwrap();
    assert_eq!(*states.borrow_and_update(), State::HalfOpen);
}

#[test]
fn try_new_refuses_a_bad_config() {
    let err = CircuitBreaker::try_new(
        "payment",
        Config {
            failure_rate_threshold: 0.0,
            ..config()
        },
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid config for circuit breaker `payment`: \
         failure_rate_threshold must be in (0, 100], got 0"
    );
    assert!(CircuitBreaker::try_new("payment", config()).is_ok());
}
