//! A circuit breaker as a generic tower [`Layer`](tower::Layer), modelled on Resilience4j's:
//! a count- or time-based sliding window, a minimum number of calls, failure-rate and
//! slow-call-rate thresholds, a wait in open (fixed or growing with each consecutive
//! opening, up to a cap), a limited number of half-open probes, forced-open and disabled
//! modes, and a `tracing` event (`"closed => open"`) on every transition. It knows nothing
//! about sagas; one breaker per participant is shared by every clone of its channel.
//!
//! - [`config`]: [`Config`] and [`SlidingWindow`], with Resilience4j's defaults and
//!   [`Config::validate`].
//! - [`breaker`]: the shared state machine, [`CircuitBreaker`]: admission
//!   ([`CircuitBreaker::try_acquire`] giving a [`Permit`]), recording, [`CircuitBreaker::ready`],
//!   [`Snapshot`]s and [`Mode`]s. Admission in closed is one atomic load.
//! - [`layer`] and [`service`]: [`CircuitBreakerLayer`] and [`CircuitBreakerService`], which
//!   decide in `call` (never in `poll_ready`) and reject with a boxed `UNAVAILABLE`
//!   [`tonic::Status`] marked with [`REJECTED_MARKER`] (see [`is_rejection`]).
//! - [`future`] and [`body`]: the response future and [`ClassifiedBody`], which find the
//!   call's `grpc-status` in the response headers (trailers-only responses) or in the
//!   trailers, and treat a dropped future or body as a cancelled call.
//! - [`classify`]: the outcome policy, [`Classify`], and its gRPC default, [`GrpcClassifier`].
//! - [`error`]: [`Rejected`], [`InvalidConfig`] and the [`BoxError`] alias.
//!
//! ```
//! use circuit_breaker::{CircuitBreaker, Config, GrpcClassifier, State};
//! use tower::ServiceBuilder;
//!
//! let breaker = CircuitBreaker::new("payment", Config::default());
//! # let channel = tower::service_fn(|_: http::Request<()>| async {
//! #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//! # });
//! let channel = ServiceBuilder::new()
//!     .layer(breaker.layer(GrpcClassifier::default()))
//!     .service(channel);
//! // Clones of `channel` (and of `breaker`) share the one breaker.
//! assert_eq!(breaker.state(), State::Closed);
//! # drop(channel);
//! ```

pub mod body;
pub mod breaker;
pub mod classify;
pub mod config;
pub mod error;
pub mod future;
pub mod layer;
pub mod service;
mod window;

pub use body::ClassifiedBody;
pub use breaker::{CircuitBreaker, Mode, Permit, Snapshot, State};
pub use classify::{Classify, GrpcClassifier, Outcome};
pub use config::{COARSE_CLOCK_FROM, CallClock, Config, SlidingWindow};
pub use error::{BoxError, InvalidConfig, REJECTED_MARKER, Rejected, is_rejection};
pub use future::ResponseFuture;
pub use layer::CircuitBreakerLayer;
pub use service::CircuitBreakerService;
