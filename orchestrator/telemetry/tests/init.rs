//! `init` installs the global subscriber once; a second call is an error, not a panic.
//! (Its own test binary: it sets process-wide state.)

#![allow(clippy::unwrap_used)]

use telemetry::{TelemetryConfig, TelemetryError};

#[test]
fn a_second_init_is_a_clear_error() {
    let first = telemetry::init(TelemetryConfig::new("init-test")).expect("first init");
    let second = telemetry::init(TelemetryConfig::new("init-test"));
    assert!(matches!(second, Err(TelemetryError::AlreadyInitialized)));
    assert_eq!(
        second.unwrap_err().to_string(),
        "telemetry is already initialized: a global tracing subscriber is already set"
    );
    tracing::info!("still logging through the first subscriber");
    first.shutdown();
    first.shutdown();
}
