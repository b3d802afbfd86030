//! The food-delivery participant services the saga orchestrator calls over gRPC: payment,
//! store and rider, each with a persisted (sled), idempotent ledger of the effects it
//! applied, gRPC health and server reflection; and the notifier, which tells customers
//! about their orders by following the orchestrator's change feed.
//!
//! - [`spawn`] / [`serve`] (module `server`): run one participant ([`Kind`]) on a bound
//!   listener; [`ParticipantHandle`] stops it and waits until its database is closed.
//!   [`spawn_with`] / [`serve_with`] also take [`ParticipantOptions`]: a tracer for server
//!   spans and a listener for the admin endpoints (`/metrics`, `/healthz`, `/readyz`).
//! - [`observability`]: those server spans (W3C `traceparent` honoured) and the metrics.
//! - `core`: what every participant shares: the `idempotency-key` convention (the first
//!   result of a key is replayed, nothing is applied twice), actions and their
//!   compensations (`<scope>/action`, `<scope>/compensation`, with tombstones for
//!   compensations that arrive first), the ledger, and durability (every mutating call is
//!   flushed before it returns).
//! - [`payment`], [`store`], [`rider`]: the business rules of each participant.
//! - [`cli`]: the `participant` command line, in the library so tests can parse real
//!   deployment commands with it.
//! - [`faults`]: [`Faults`], injected failures and delays for tests, and call counts.
//! - [`notifier`]: not a saga participant but a client of the orchestrator: it follows the
//!   orchestrator's change feed (`WatchSagas`) and records exactly one notification per saga
//!   status change, across disconnects and restarts; [`spawn_notifier`] / [`serve_notifier`]
//!   (and their `_with` forms, taking [`ParticipantOptions`]) run it, [`NotifierHandle`]
//!   stops it.

pub mod cli;
pub mod faults;
pub mod notifier;
pub mod observability;
pub mod payment;
pub mod rider;
pub mod server;
pub mod store;

mod core;

use std::fmt;
use std::str::FromStr;

pub use faults::Faults;
pub use notifier::{
    NotifierConfig, NotifierHandle, serve_notifier, serve_notifier_with, spawn_notifier,
    spawn_notifier_with,
};
pub use observability::ParticipantOptions;
pub use server::{ParticipantHandle, serve, serve_with, spawn, spawn_with};

/// Which participant to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Kind {
    Payment,
    Store,
    Rider,
}

impl Kind {
    /// Every kind, in saga order.
    pub const ALL: [Kind; 3] = [Kind::Payment, Kind::Store, Kind::Rider];

    /// The lowercase name: "payment", "store" or "rider".
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Payment => "payment",
            Kind::Store => "store",
            Kind::Rider => "rider",
        }
    }

    /// The fully-qualified gRPC service name, e.g. "payment.v1.Payment".
    pub fn service_name(self) -> &'static str {
        match self {
            Kind::Payment => proto::payment::v1::payment_server::SERVICE_NAME,
            Kind::Store => proto::store::v1::store_server::SERVICE_NAME,
            Kind::Rider => proto::rider::v1::rider_server::SERVICE_NAME,
        }
    }

    /// The default listen address of the `participant` binary.
    pub fn default_listen(self) -> &'static str {
        match self {
            Kind::Payment => "127.0.0.1:50061",
            Kind::Store => "127.0.0.1:50062",
            Kind::Rider => "127.0.0.1:50063",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = ParticipantError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParticipantError::UnknownKind(s.to_owned()))
    }
}

/// Why a participant (or the notifier) could not start, serve or close. Business outcomes
/// are gRPC statuses, never these.
#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    #[error("unknown participant kind {0:?} (expected payment, store or rider)")]
    UnknownKind(String),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("storage: {0}")]
    Storage(#[from] sled::Error),
    #[error("invalid orchestrator URL {url:?}: {reason}")]
    OrchestratorUrl { url: String, reason: String },
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}
