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
//! - Listing: [`SagaStore::list`] serves every [`ListFilter`] (status, definition, creation
//!   time, any combination) from one contiguous range of one index, newest first, and reads
//!   only the summaries it returns. Pages continue from an opaque [`page_token`].
//! - The change feed: every change of a saga's status or business status, in commit order,
//!   numbered 1, 2, 3, ... with no gaps ([`Change`], [`SagaStore::changes`],
//!   [`SagaStore::watch_changes`]). It is written in the same transaction as the summary
//!   and read only up to the last flush, so a change once read is read again after a
//!   restart, at the same cursor, and the next change takes the next cursor.
//!
//! Durability: a write is durable when its [`Pending`] resolves to `Ok`; a write whose
//! `Pending` resolved to `Err` may or may not be on disk, and the caller must not
//! acknowledge it. A change is returned by [`SagaStore::changes`] only once the flush that
//! made it durable has completed.

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

/// Faults of the store itself (and requests it cannot read), never business outcomes.
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
    /// A page token that [`page_token`] did not make.
    #[error("invalid page token {0:?}: it is not a page token from this API")]
    InvalidToken(String),
}

/// What the store keeps about a saga besides its events: enough to list and recover it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub saga_id: String,
    pub definition: String,
    pub version: u32,
    pub status: SagaStatus,
    /// The customer-facing status text the runtime computes ("waiting for the store",
    /// "cooking", ...). The store only keeps it; records written before it existed read as
    /// empty.
    #[serde(default)]
    pub business_status: String,
    pub idempotency_key: String,
    /// A digest of (definition, version, input) that the idempotency key was first used
    /// with, to refuse reuse of a key for a different request.
    pub request_digest: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub last_seq: u64,
}

/// Events to append, with the summary after them.
#[derive(Debug, Clone)]
pub struct Appended {
    pub events: Vec<Event>,
    pub summary: Summary,
    /// (status, business status) after each event, in order; empty: only the summary's
    /// counts, after the last event.
    pub statuses: Vec<(SagaStatus, String)>,
}

/// A saga to create: its summary and first events (`saga_started`, and whatever the saga
/// decided before its first call, such as that call's intent), written in one go.
#[derive(Debug, Clone)]
pub struct NewSaga {
    pub summary: Summary,
    /// From seq 1 on, in order.
    pub events: Vec<Event>,
    /// (status, business status) after each event, in order; empty: only the summary's,
    /// after the last event.
    pub statuses: Vec<(SagaStatus, String)>,
}

impl NewSaga {
    /// A saga created with its start event alone.
    pub fn started(summary: Summary, first_event: Event) -> NewSaga {
        NewSaga {
            summary,
            events: vec![first_event],
            statuses: Vec::new(),
        }
    }
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

/// Filters for [`SagaStore::list`]; every combination is served from one index range.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<SagaStatus>,
    pub definition: Option<String>,
    /// Created at or after this time (ms since the epoch).
    pub created_from_ms: Option<u64>,
    /// Created strictly before this time.
    pub created_to_ms: Option<u64>,
}

/// The token that continues a [`SagaStore::list`] after `summary` (the last one of a page).
/// Opaque to callers; valid for any filter.
pub fn page_token(summary: &Summary) -> String {
    format!("{}.{}", summary.created_at_ms, summary.saga_id)
}

/// The (created_at_ms, saga id) a [`page_token`] names.
pub(crate) fn parse_page_token(token: &str) -> Result<(u64, &str)> {
    let invalid = || StoreError::InvalidToken(token.to_owned());
    let (created, saga_id) = token.split_once('.').ok_or_else(invalid)?;
    if created.is_empty() || !created.bytes().all(|b| b.is_ascii_digit()) || saga_id.is_empty() {
        return Err(invalid());
    }
    let created = created.parse().map_err(|_| invalid())?;
    Ok((created, saga_id))
}

/// One change of a saga's status or business status, in commit order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Position in the feed: 1, 2, 3, ... with no gaps, in the order the changes became durable.
    pub cursor: u64,
    pub saga_id: String,
    pub definition: String,
    pub version: u32,
    pub status: SagaStatus,
    pub business_status: String,
    /// `seq` of the saga's last event when the change happened.
    pub seq: u64,
    /// The summary's `updated_at_ms`.
    pub at_ms: u64,
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
    /// Summaries read by [`SagaStore::list`].
    pub summaries_read: u64,
    /// Index entries visited by [`SagaStore::list`].
    pub index_entries_scanned: u64,
}

/// The storage the runtime depends on.
pub trait SagaStore: Send + Sync + 'static {
    /// Creates a saga unless its idempotency key already names one.
    fn create(&self, saga: NewSaga) -> Pending<Created>;
    /// Appends events (consecutive `seq`s continuing the log) and replaces the summary; the
    /// change feed gets the summary's status if it changed.
    fn append(&self, events: Vec<Event>, summary: Summary) -> Pending<()> {
        self.append_with_statuses(Appended {
            events,
            summary,
            statuses: Vec::new(),
        })
    }
    /// Appends events with the saga's status and business status after each of them: the
    /// change feed gets one change per event that changed them (so a status that lasted
    /// between two events of one append is still reported).
    fn append_with_statuses(&self, appended: Appended) -> Pending<()>;
    /// Stores a definition version.
    fn put_definition(&self, definition: StoredDefinition) -> Pending<PutDefinition>;

    /// The saga's whole event log, `None` if there is no such saga.
    fn events(&self, saga_id: &str) -> Result<Option<Vec<Event>>>;
    fn summary(&self, saga_id: &str) -> Result<Option<Summary>>;
    /// At most `limit` sagas matching `filter`, newest first (by creation time, then saga
    /// id), starting strictly after `after`: a [`page_token`] of the previous page's last
    /// summary. A token that does not parse is [`StoreError::InvalidToken`].
    fn list(&self, filter: &ListFilter, after: Option<&str>, limit: usize) -> Result<Vec<Summary>>;
    /// How many sagas are in `status` (from the status index; no summary is read).
    fn count_by_status(&self, status: SagaStatus) -> Result<u64>;
    /// Every saga not in a terminal status, for recovery.
    fn unfinished(&self) -> Result<Vec<Summary>>;
    fn definitions(&self) -> Result<Vec<StoredDefinition>>;
    /// Every saga summary, oldest first (for checks and tools).
    fn summaries(&self) -> Result<Vec<Summary>>;
    /// Every entry of the status index, as (status, saga id), for checks.
    fn status_index(&self) -> Result<Vec<(SagaStatus, String)>>;

    /// Changes with `cursor > after`, oldest first, at most `limit`. Only durable changes
    /// are returned (those whose batch was flushed).
    fn changes(&self, after: u64, limit: usize) -> Result<Vec<Change>>;
    /// The cursor of the last durable change; the receiver is notified after every flush
    /// that made new changes durable.
    fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64>;

    /// `Err` with the cause once a storage fault has stopped writes.
    fn health(&self) -> Result<()>;
    fn stats(&self) -> StoreStats;
}
