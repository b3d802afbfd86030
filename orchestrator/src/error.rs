//! The orchestrator's errors, and the one place they become gRPC statuses.

use saga_engine::DefinitionErrors;
use saga_store::StoreError;
use tonic::{Code, Status};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("definition `{0}` not found")]
    UnknownDefinition(String),
    #[error("definition `{name}` has no version {version} (versions: {known})")]
    UnknownVersion {
        name: String,
        version: u32,
        known: String,
    },
    #[error("saga `{0}` not found")]
    UnknownSaga(String),
    #[error("{0}")]
    NotFound(String),
    /// Bad input from the caller; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Definition(#[from] DefinitionErrors),
    #[error("idempotency key `{key}` was already used for saga {saga_id} with a different request")]
    IdempotencyConflict { key: String, saga_id: String },
    #[error(
        "definition `{name}` version {version} already exists with different content; versions are immutable, so give the change a new version"
    )]
    VersionConflict { name: String, version: u32 },
    #[error("saga {saga_id} cannot be cancelled: {reason}")]
    CancelRefused { saga_id: String, reason: String },
    #[error("saga {saga_id} refused the signal: {reason}")]
    SignalRefused { saga_id: String, reason: String },
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the orchestrator is shutting down")]
    ShuttingDown,
    #[error("definition `{definition}` does not start sagas while the circuit breaker of `{participant}` is open; retry after {} ms", retry_after.as_millis())]
    BreakerOpen {
        definition: String,
        participant: String,
        retry_after: std::time::Duration,
    },
    /// A fault inside the orchestrator; details are logged, not sent to clients.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let code = match &error {
            Error::UnknownDefinition(_)
            | Error::UnknownVersion { .. }
            | Error::UnknownSaga(_)
            | Error::NotFound(_) => Code::NotFound,
            Error::InvalidArgument(_)
            | Error::Definition(_)
            | Error::Store(StoreError::InvalidToken(_)) => Code::InvalidArgument,
            Error::IdempotencyConflict { .. } | Error::VersionConflict { .. } => {
                Code::AlreadyExists
            }
            Error::CancelRefused { .. } | Error::SignalRefused { .. } => Code::FailedPrecondition,
            Error::BreakerOpen { .. } => Code::ResourceExhausted,
            Error::Store(StoreError::Fault(_) | StoreError::Closed) | Error::ShuttingDown => {
                Code::Unavailable
            }
            Error::Store(
                StoreError::Corrupt { .. } | StoreError::InUse(_) | StoreError::NewerFormat { .. },
            )
            | Error::Internal(_) => Code::Internal,
        };
        match code {
            Code::Internal => {
                tracing::error!(cause = %error, "internal error");
                Status::internal("internal error; see the orchestrator's log")
            }
            Code::Unavailable => {
                tracing::warn!(cause = %error, "request refused: orchestrator unavailable");
                Status::unavailable(error.to_string())
            }
            Code::ResourceExhausted => {
                let mut status = Status::new(code, error.to_string());
                if let Error::BreakerOpen { retry_after, .. } = &error
                    && let Ok(value) = retry_after.as_millis().to_string().parse()
                {
                    status.metadata_mut().insert("retry-after-ms", value);
                }
                status
            }
            _ => Status::new(code, error.to_string()),
        }
    }
}
