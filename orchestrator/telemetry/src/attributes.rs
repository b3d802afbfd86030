//! Span and log field names, in one place. Saga fields (`saga.*`) are ours; `rpc.*` follow the
//! OpenTelemetry semantic conventions for gRPC.

/// The saga instance id.
pub const SAGA_ID: &str = "saga.id";
/// The saga definition's name.
pub const SAGA_NAME: &str = "saga.name";
/// The saga definition's version.
pub const SAGA_VERSION: &str = "saga.version";
/// The step's name.
pub const SAGA_STEP: &str = "saga.step";
/// The phase of a step call: action or compensation.
pub const SAGA_PHASE: &str = "saga.phase";
/// The attempt number of a step call, from 1.
pub const SAGA_ATTEMPT: &str = "saga.attempt";
/// The step a compensation undoes.
pub const SAGA_COMPENSATES: &str = "saga.compensates";
/// The saga's status.
pub const SAGA_STATUS: &str = "saga.status";
/// What a saga waits for (a timer, a retry backoff, an open breaker).
pub const SAGA_WAIT: &str = "saga.wait";
/// The participant a call goes to, or that serves it.
pub const PARTICIPANT: &str = "saga.participant";
/// The RPC system: "grpc".
pub const RPC_SYSTEM: &str = "rpc.system";
/// The full gRPC service name, e.g. "payment.v1.Payment".
pub const RPC_SERVICE: &str = "rpc.service";
/// The gRPC method name, e.g. "Authorize".
pub const RPC_METHOD: &str = "rpc.method";
/// The numeric gRPC status code of a call.
pub const RPC_GRPC_STATUS_CODE: &str = "rpc.grpc.status_code";
/// A circuit breaker's state: closed, open, half_open, forced_open, ...
pub const BREAKER_STATE: &str = "breaker.state";
