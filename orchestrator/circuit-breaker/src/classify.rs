//! Outcome policy: which results count against a participant. The mechanism (reading
//! `grpc-status` from headers or trailers, timing calls) lives in the service, future and
//! body; what a status or an error *means* is decided here, by a [`Classify`] implementation.

use http::{HeaderMap, HeaderName};

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// How one call ended, as far as the breaker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Counts towards the window as a success (it may still be slow).
    Success,
    /// Counts towards the window as a failure.
    Failure,
    /// Not counted at all, as if the call had not been made (a half-open probe slot is freed).
    Ignored,
}

/// A policy that turns a call's result into an [`Outcome`]. It is cloned for every admitted
/// call (the call's future and body carry it), so keep it cheap to clone: a few plain fields,
/// or an `Arc` around anything bigger.
///
/// The layer calls exactly one method per admitted call:
/// - [`classify_status`](Self::classify_status) with the `grpc-status` of the response (from
///   the headers of a trailers-only response, else from the trailers), or with `None` when the
///   body ended without one;
/// - [`classify_error`](Self::classify_error) when the inner service failed (a transport error:
///   no connection, a reset stream, a timeout layer's error, ...).
///
/// Fixed by the mechanism, not the policy: an HTTP status other than 200, or a body that fails
/// while streaming, is a [`Outcome::Failure`]; a response or body dropped before its outcome
/// is known is a cancelled call (nothing recorded).
pub trait Classify: Clone {
    fn classify_status(&self, code: Option<tonic::Code>) -> Outcome;
    fn classify_error(&self, error: &(dyn std::error::Error + 'static)) -> Outcome;
}

/// gRPC's usual reading: codes that say the participant (or the way to it) is in trouble are
/// failures; codes that are an answer about the request itself (`FAILED_PRECONDITION`,
/// `INVALID_ARGUMENT`, `NOT_FOUND`, `ALREADY_EXISTS`, ...) are successes, since the participant
/// worked. Service errors (transport) are failures, and so is a response without a status.
///
/// The failure codes are a bit set: the classifier is `Copy`, and cloning it per call costs
/// nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcClassifier {
    /// Bit `n` set: code `n` is a failure.
    failures: u32,
}

impl GrpcClassifier {
    /// A classifier for which exactly `codes` are failures (plus transport errors and
    /// responses without a status).
    pub fn failing_on(codes: impl IntoIterator<Item = tonic::Code>) -> Self {
        let failures = codes
            .into_iter()
            .fold(0, |set, code| set | 1u32 << (code as i32 as u32 & 31));
        Self { failures }
    }

    /// The codes this classifier counts as failures, in code order.
    pub fn failure_codes(&self) -> Vec<tonic::Code> {
        (0..32)
            .filter(|bit| self.failures & (1 << bit) != 0)
            .map(tonic::Code::from_i32)
            .collect()
    }

    fn is_failure(&self, code: tonic::Code) -> bool {
        self.failures & (1u32 << (code as i32 as u32 & 31)) != 0
    }
}

impl Default for GrpcClassifier {
    /// Failures: `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `INTERNAL`.
    fn default() -> Self {
        Self::failing_on([
            tonic::Code::Unavailable,
            tonic::Code::DeadlineExceeded,
            tonic::Code::ResourceExhausted,
            tonic::Code::Internal,
        ])
    }
}

impl Classify for GrpcClassifier {
    fn classify_status(&self, code: Option<tonic::Code>) -> Outcome {
        match code {
            Some(code) if self.is_failure(code) => Outcome::Failure,
            Some(_) => Outcome::Success,
            None => Outcome::Failure,
        }
    }

    fn classify_error(&self, _error: &(dyn std::error::Error + 'static)) -> Outcome {
        Outcome::Failure
    }
}

/// The `grpc-status` carried by a header or trailer map, if any.
pub(crate) fn grpc_status(headers: &HeaderMap) -> Option<tonic::Code> {
    headers
        .get(&GRPC_STATUS)
        .map(|value| tonic::Code::from_bytes(value.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn grpc_classifier_defaults() {
        let c = GrpcClassifier::default();
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Internal,
        ] {
            assert_eq!(c.classify_status(Some(code)), Outcome::Failure, "{code:?}");
        }
        for code in [
            Code::Ok,
            Code::FailedPrecondition,
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::Aborted,
            Code::Cancelled,
        ] {
            assert_eq!(c.classify_status(Some(code)), Outcome::Success, "{code:?}");
        }
        assert_eq!(c.classify_status(None), Outcome::Failure);
        let io = std::io::Error::other("connection refused");
        assert_eq!(c.classify_error(&io), Outcome::Failure);
        assert_eq!(
            c.failure_codes(),
            [
                Code::DeadlineExceeded,
                Code::ResourceExhausted,
                Code::Internal,
                Code::Unavailable
            ]
        );
        let custom = GrpcClassifier::failing_on([Code::Aborted]);
        assert_eq!(
            custom.classify_status(Some(Code::Aborted)),
            Outcome::Failure
        );
        assert_eq!(
            custom.classify_status(Some(Code::Unavailable)),
            Outcome::Success
        );
        assert_eq!(custom.failure_codes(), [Code::Aborted]);
    }

    #[test]
    fn reads_grpc_status() {
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_status(&headers), None);
        headers.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(grpc_status(&headers), Some(Code::Unavailable));
        headers.insert("grpc-status", "0".parse().unwrap());
        assert_eq!(grpc_status(&headers), Some(Code::Ok));
        headers.insert("grpc-status", "garbage".parse().unwrap());
        assert_eq!(grpc_status(&headers), Some(Code::Unknown));
    }
}
