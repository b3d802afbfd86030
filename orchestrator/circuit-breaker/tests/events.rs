//! Every transition is a `tracing` event: message `"from => to"`, structured fields.
//!
//! Alone in its own test binary: tracing caches each callsite's interest process-wide, and
//! tests running concurrently without a subscriber would make the cache skip these events.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use circuit_breaker::{CircuitBreaker, Config, Mode, Outcome, SlidingWindow};
use tokio::time::advance;

const WAIT: Duration = Duration::from_secs(10);

fn call(breaker: &CircuitBreaker, outcome: Outcome) {
    breaker.try_acquire().expect("admitted").record(outcome);
}

/// Collects the message and fields of every event.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for Events {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Visitor(String);
        impl tracing::field::Visit for Visitor {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0.insert_str(0, &format!("{value:?}"));
                } else {
                    self.0.push_str(&format!(" {}={value:?}", field.name()));
                }
            }
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                self.0.push_str(&format!(" {}={value}", field.name()));
            }
        }
        let mut visitor = Visitor(String::new());
        event.record(&mut visitor);
        self.0.lock().expect("not poisoned").push(visitor.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn every_transition_is_an_event() {
    let events = Events::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    tracing::subscriber::with_default(events.clone(), || {
        runtime.block_on(async {
            let b = CircuitBreaker::new(
                "payment",
                Config {
                    window: SlidingWindow::Count(4),
                    minimum_calls: 4,
                    wait_in_open: WAIT,
                    max_wait_in_open: WAIT,
                    permitted_calls_in_half_open: 2,
                    ..Config::default()
                },
            );
            for _ in 0..4 {
                call(&b, Outcome::Failure);
            }
            advance(WAIT).await;
            call(&b, Outcome::Failure);
            call(&b, Outcome::Failure);
            advance(WAIT).await;
            call(&b, Outcome::Success);
            call(&b, Outcome::Success);
            b.set_mode(Mode::ForcedOpen);
            b.set_mode(Mode::Disabled);
            b.set_mode(Mode::Normal);
            b.set_mode(Mode::Normal);
        })
    });
    let events = events.0.lock().unwrap().clone();
    let messages: Vec<&str> = events
        .iter()
        .map(|e| e.split(" breaker=").next().unwrap())
        .collect();
    assert_eq!(
        messages,
        [
            "closed => open",
            "open => half_open",
            "half_open => open",
            "open => half_open",
            "half_open => closed",
            "closed => forced_open",
            "forced_open => disabled",
            "disabled => closed",
            "reset",
        ],
        "{events:#?}"
    );
    assert!(events.iter().all(|e| e.contains(" breaker=payment")));
    assert!(
        events[0].contains("from=closed to=open calls=4 failure_rate=100.0"),
        "{}",
        events[0]
    );
    assert!(events[0].contains("wait_in_open=10s"), "{}", events[0]);
    assert!(
        events[4].contains("from=half_open to=closed calls=2 failure_rate=0.0"),
        "{}",
        events[4]
    );
    assert!(
        !events[1].contains("calls=") && !events[5].contains("calls="),
        "no rates where none decided: {events:#?}"
    );
}
