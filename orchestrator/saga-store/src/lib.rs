//! The saga store: each saga's append-only event log, its summary, and the indexes that
//! serve reads, behind the [`SagaStore`] trait.
//!
//! - [`SagaStore`]: what the runtime needs. Writes return a [`Pending`] future that
//!   resolves once the write is durable; reads are synchronous and see every write that
//!   resolved.
//! - [`sled_store::SledStore`]: the embedded default. One writer thread applies writes in
//!   batches and makes each batch durable with a single flush (group commit). After a
//!   failed write or flush the store refuses every later write: nothing is acknowledged
//!   after a failed flush.
//!
//! Durability: a write is durable when its [`Pending`] resolves to `Ok`; a write whose
//! `Pending` resolved to `Err` may or may not be on disk, and the caller must not
//! acknowledge it.

mod pending;
pub mod sled_store;

/// Ends the process at once, as a crash (or `kill -9`) at this instant would: no destructor
/// runs and nothing more is flushed. Called only by failpoints, which exist only when the
/// `failpoints` feature is on and the `FAILPOINTS` variable names them.
pub fn crash(point: &str) -> ! {
    eprintln!("failpoint {point}: crashing now");
    std::process::exit(CRASH_EXIT_CODE)
}

/// The exit status of a process ended by [`crash`].
pub const CRASH_EXIT_CODE: i32 = 86;

use std::collections::BTreeMap;

use saga_engine::{Event, SagaStatus};
use serde::{Deserialize, Serialize};

pub use pending::Pending;
pub use sled_store::SledStore;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Faults of the store itself, never business outcomes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A write or flush failed; the store accepts no more writes until it is reopened.
    #[error("storage fault: {0}")]
    Fault(String),
    #[error("corrupt record under key {key}: {cause}")]
    Corrupt { key: String, cause: String },
    #[error("the store's writer has stopped")]
    Closed,
    /// The data directory is locked by another process.
    #[error(
        "data directory {0} is in use by another process (is another orchestrator running on it?)"
    )]
    InUse(String),
    /// The data directory was written by a newer, unknown format.
    #[error(
        "data directory {dir} has storage format version {found}; this orchestrator reads up to version {supported}: refusing to misread it"
    )]
    NewerFormat {
        dir: String,
        found: u32,
        supported: u32,
    },
}

/// What the store keeps about a saga besides its events: enough to list and recover it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub saga_id: String,
    pub definition: String,
    pub version: u32,
    pub status: SagaStatus,
    pub idempotency_key: String,
    /// A digest of (definition, version, input) that the idempotency key was first used
    /// with, to refuse reuse of a key for a different request.
    pub request_digest: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub last_seq: u64,
}

/// A saga to create: its summary and first event.
#[derive(Debug, Clone)]
pub struct NewSaga {
    pub summary: Summary,
    pub first_event: Event,
}

/// The outcome of [`SagaStore::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    New,
    /// The idempotency key already names this saga; nothing was written.
    Existing(Summary),
}

/// The outcome of [`SagaStore::put_definition`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutDefinition {
    Created,
    /// The same name, version and text were already stored.
    Unchanged,
    /// The version exists with different text; versions are immutable.
    Conflict {
        existing: String,
    },
}

/// A stored definition version, with the protobuf descriptors it was compiled against, so
/// that it can be compiled again (at recovery, or by `orchestrator check`) without reaching
/// its participants, and exactly as it was when sagas were pinned to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDefinition {
    pub name: String,
    pub version: u32,
    pub yaml: String,
    /// Participant name → encoded `FileDescriptorSet`.
    pub descriptors: BTreeMap<String, Vec<u8>>,
}

/// Filters for [`SagaStore::list`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<SagaStatus>,
    pub definition: Option<String>,
}

/// Counters that show how writes were batched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Flushes to disk (fsyncs) made by the writer.
    pub flushes: u64,
    /// Write operations (creates, appends, definition puts) made durable.
    pub writes: u64,
    /// Events appended.
    pub events: u64,
}

/// The storage the runtime depends on.
pub trait SagaStore: Send + Sync + 'static {
    /// Creates a saga unless its idempotency key already names one.
    fn create(&self, saga: NewSaga) -> Pending<Created>;
    /// Appends events (consecutive `seq`s continuing the log) and replaces the summary.
    fn append(&self, events: Vec<Event>, summary: Summary) -> Pending<()>;
    /// Stores a definition version.
    fn put_definition(&self, definition: StoredDefinition) -> Pending<PutDefinition>;

    /// The saga's whole event log, `None` if there is no such saga.
    fn events(&self, saga_id: &str) -> Result<Option<Vec<Event>>>;
    fn summary(&self, saga_id: &str) -> Result<Option<Summary>>;
    /// Newest first, starting after `after` (a saga id from the previous page).
    fn list(&self, filter: &ListFilter, after: Option<&str>, limit: usize) -> Result<Vec<Summary>>;
    /// Every saga not in a terminal status, for recovery.
    fn unfinished(&self) -> Result<Vec<Summary>>;
    fn definitions(&self) -> Result<Vec<StoredDefinition>>;
    /// Every saga summary, oldest first (for checks and tools).
    fn summaries(&self) -> Result<Vec<Summary>>;
    /// Every entry of the status index, as (status, saga id), for checks.
    fn status_index(&self) -> Result<Vec<(SagaStatus, String)>>;

    /// `Err` with the cause once a storage fault has stopped writes.
    fn health(&self) -> Result<()>;
    fn stats(&self) -> StoreStats;
}
