//! Errors: [`Rejected`] (a call the breaker did not let through) and [`InvalidConfig`].
//!
//! Through the layer a rejection reaches the caller as a boxed [`tonic::Status`]
//! (`UNAVAILABLE`, with [`REJECTED_MARKER`] metadata and the [`Rejected`] as its source), so
//! a tonic client surfaces it as that exact status rather than `UNKNOWN`; test for it with
//! [`is_rejection`].

use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::MetadataValue;

use crate::breaker::State;

/// The error type of the layered service: whatever the inner service failed with, or a
/// boxed [`tonic::Status`] for a rejected call.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Metadata key marking a status produced by a breaker that rejected the call (value
/// `rejected`): the call was not sent, so it had no effect.
pub const REJECTED_MARKER: &str = "x-circuit-breaker";

const REJECTED_VALUE: &str = "rejected";

/// A call the breaker did not let through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "circuit breaker `{breaker}` is {state}; the call was not sent{}",
    RetryHint(*.retry_after)
)]
pub struct Rejected {
    pub breaker: String,
    pub state: State,
    /// When open: how long until a probe may go.
    pub retry_after: Option<Duration>,
}

impl Rejected {
    /// The status a client sees: `UNAVAILABLE`, this error's message, the
    /// [`REJECTED_MARKER`] metadata, and this error as the status's source.
    pub fn to_status(&self) -> tonic::Status {
        let mut status = tonic::Status::unavailable(self.to_string());
        status
            .metadata_mut()
            .insert(REJECTED_MARKER, MetadataValue::from_static(REJECTED_VALUE));
        status.set_source(Arc::new(self.clone()));
        status
    }
}

impl From<Rejected> for tonic::Status {
    fn from(rejected: Rejected) -> Self {
        rejected.to_status()
    }
}

/// True iff the status was produced by a breaker that rejected the call (it carries
/// [`REJECTED_MARKER`] metadata with the value `rejected`).
pub fn is_rejection(status: &tonic::Status) -> bool {
    status
        .metadata()
        .get(REJECTED_MARKER)
        .is_some_and(|value| value == REJECTED_VALUE)
}

/// A config that [`Config::validate`](crate::Config::validate) refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config for circuit breaker `{breaker}`: {}", errors.join("; "))]
pub struct InvalidConfig {
    pub breaker: String,
    pub errors: Vec<String>,
}

/// ` (retry after 1.2s)`, rounded up to the millisecond; nothing without a duration.
struct RetryHint(Option<Duration>);

impl std::fmt::Display for RetryHint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(d) => {
                let millis = d.as_nanos().div_ceil(1_000_000);
                let millis = u64::try_from(millis).unwrap_or(u64::MAX);
                write!(f, " (retry after {:?})", Duration::from_millis(millis))
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_and_status() {
        let rejected = Rejected {
            breaker: "payment".into(),
            state: State::Open,
            retry_after: Some(Duration::from_micros(1_199_001)),
        };
        assert_eq!(
            rejected.to_string(),
            "circuit breaker `payment` is open; the call was not sent (retry after 1.2s)"
        );
        let status = tonic::Status::from(rejected.clone());
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), rejected.to_string());
        assert!(is_rejection(&status));
        let source = std::error::Error::source(&status)
            .and_then(|s| s.downcast_ref::<Rejected>())
            .unwrap();
        assert_eq!(source, &rejected);

        let forced = Rejected {
            breaker: "rider".into(),
            state: State::ForcedOpen,
            retry_after: None,
        };
        assert_eq!(
            forced.to_string(),
            "circuit breaker `rider` is forced_open; the call was not sent"
        );
    }

    #[test]
    fn only_marked_statuses_are_rejections() {
        assert!(!is_rejection(&tonic::Status::unavailable(
            "connection refused"
        )));
        let mut other = tonic::Status::unavailable("x");
        other.metadata_mut().insert(
            REJECTED_MARKER,
            MetadataValue::from_static("something-else"),
        );
        assert!(!is_rejection(&other));
    }
}
