//! The saga orchestrator: the runtime that runs sagas, the dynamic invoker that calls
//! participants, and the gRPC API around them.
//!
//! - [`runtime`]: one driver task per active saga interprets the engine's decisions;
//!   events are durable before anything depends on them; recovery on start.
//! - [`invoker`]: dynamic unary gRPC calls from JSON and protobuf descriptors.
//! - [`descriptors`]: descriptors from server reflection or a descriptor set file.
//! - [`registry`]: loaded definitions by name and version.
//! - [`breakers`]: one circuit breaker per participant, from the definitions.
//! - [`api`]: the `saga.v1.SagaOrchestrator` service; [`error`] maps errors to statuses.
//! - [`app`]: assembles store, registry, runtime and server; used by the binaries and tests.
//! - [`check`]: replays every stored saga and reports where the store disagrees.
//! - [`cli`]: the `orchestrator` and `sagactl` command lines.

pub mod api;
pub mod app;
pub mod breakers;
pub mod check;
pub mod cli;
pub mod convert;
pub mod descriptors;
pub mod error;
pub mod invoker;
pub mod metrics;
pub mod registry;
pub mod runtime;

pub use app::{Config, Orchestrator};
pub use runtime::Runtime;
