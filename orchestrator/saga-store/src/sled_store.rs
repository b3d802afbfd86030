//! The embedded sled implementation of [`SagaStore`], with group commit.
//!
//! Trees (one per concern):
//! - `events`: `saga_id 0x00 seq(u64 BE)` → event JSON: the truth.
//! - `sagas`: `saga_id` → [`Summary`] JSON: the snapshot that serves reads and recovery.
//! - `idempotency`: StartSaga idempotency key → saga id.
//! - The indexes, each key → empty. There is one per combination of [`ListFilter`] fields
//!   other than time, and every key ends in `created_at_ms(u64 BE) saga_id`, so that every
//!   filter, time bounds included, is one contiguous key range walked backwards for newest
//!   first:
//!   - `by_created`: `created_at_ms saga_id`: no filter, or time bounds only.
//!   - `by_status`: `status(u8) created_at_ms saga_id`: status filters, and recovery.
//!   - `by_definition`: `definition 0x00 created_at_ms saga_id`.
//!   - `by_status_definition`: `status(u8) definition 0x00 created_at_ms saga_id`.
//!
//!   A saga's four entries are derived from its summary alone and written in the same
//!   transaction as it (create inserts them, append moves those whose key changed).
//! - `changes`: `cursor(u64 BE)` → [`Change`] JSON: the feed of status and business-status
//!   changes, cursors 1, 2, 3, ... with no gaps.
//! - `definitions`: `name 0x00 version(u32 BE)` → YAML text.
//! - `definition_descriptors`: `name 0x00 version(u32 BE) participant` → encoded
//!   `FileDescriptorSet` the version was compiled against.
//! - `meta`: `format_version` → u32 BE ([`FORMAT_VERSION`]).
//!
//! Every write goes to one writer thread. It takes every write queued at that moment
//! (up to [`MAX_BATCH`]), applies them all in one sled transaction, flushes once, and only
//! then answers them all. One transaction per batch, not per write: sled 0.34 writes its log
//! buffer out synchronously around every transaction, so that cost is paid once per batch.
//! Each write's own checks decide its own outcome inside the transaction; only a storage
//! error fails (and discards) the whole batch.
//!
//! The writer, being the only writer, also numbers the change feed: it holds the next
//! cursor, and a cursor is taken only by a transaction that committed. After each flush it
//! publishes the batch's highest cursor on a watch channel, before answering anyone;
//! [`SagaStore::changes`] reads no further than the published cursor, so it never returns
//! a change whose flush has not completed.
//!
//! Format history: version 1 had `by_status` = `status saga_id` and `by_definition` =
//! `definition 0x00 saga_id`, and no `by_created`, `by_status_definition` or `changes`.
//! Opening a version-1 directory rebuilds the four indexes from `sagas`, flushes, and only
//! then records version 2 (a crash in between rebuilds again at the next open). Its change
//! feed starts empty: nothing is made up for changes that happened before.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use saga_engine::{Event, SagaStatus};
use sled::transaction::{TransactionError, TransactionalTree, UnabortableTransactionError};
use sled::{Transactional, Tree};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    Appended, Change, Created, ListFilter, NewSaga, Pending, PutDefinition, Result, SagaStore,
    StoreError, StoreStats, StoredDefinition, Summary, parse_page_token,
};

/// The most writes made durable by one flush. A batch is one sled transaction, during which sled holds its process-wide lock and
/// readers wait: the cap bounds that wait (a batch at c64 is about 20 writes).
pub const MAX_BATCH: usize = 512;

/// Bytes of pages sled keeps in memory (its default is 1 GiB, which keeps every page
/// written: about 4.5 KiB per waiting saga, and hundreds of MB after a million sagas).
/// Reads after this are of finished sagas (GetSaga, lists) and of parked sagas when they
/// resume, both rare next to the writes.
pub const CACHE_CAPACITY: u64 = 16 << 20;

/// The storage format this code writes and reads. A directory with a higher version is
/// refused rather than misread.
pub const FORMAT_VERSION: u32 = 2;
const FORMAT_KEY: &[u8] = b"format_version";

#[derive(Clone)]
struct Trees {
    events: Tree,
    sagas: Tree,
    idempotency: Tree,
    by_created: Tree,
    by_status: Tree,
    by_definition: Tree,
    by_status_definition: Tree,
    changes: Tree,
    definitions: Tree,
    definition_descriptors: Tree,
}

enum Op {
    Create(NewSaga, oneshot::Sender<Result<Created>>),
    Append(Appended, oneshot::Sender<Result<()>>),
    PutDefinition(StoredDefinition, oneshot::Sender<Result<PutDefinition>>),
}

#[derive(Default)]
struct Shared {
    /// Set once a write or flush failed. A std Mutex: never held across an await.
    fault: Mutex<Option<String>>,
    flushes: AtomicU64,
    writes: AtomicU64,
    events: AtomicU64,
    summaries_read: AtomicU64,
    index_entries_scanned: AtomicU64,
    /// The cursor of the last durable change: set by the writer after each flush.
    durable_cursor: watch::Sender<u64>,
    /// Told about every flush (for metrics). A std RwLock: read once per flush.
    flush_observer: std::sync::RwLock<Option<FlushObserver>>,
}

/// Called after every successful flush with its duration and the number of writes it made
/// durable.
pub type FlushObserver = Arc<dyn Fn(std::time::Duration, usize) + Send + Sync>;

impl Shared {
    fn fault(&self) -> Option<String> {
        self.fault
            .lock()
            .map(|f| f.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn set_fault(&self, cause: String) {
        let mut guard = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        guard.get_or_insert(cause);
    }
}

/// Hooks that make the writer fail, for tests of the fault path.
#[derive(Debug, Default)]
pub struct FaultInjection {
    /// When set, the next flush fails with this message.
    pub fail_next_flush: Mutex<Option<String>>,
}

/// The sled-backed store. Cheap to clone; all clones share one writer. When the last
/// clone is dropped, the writer finishes the writes already queued and stops, and the
/// data directory is released (it can be reopened at once).
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    trees: Trees,
    tx: Option<mpsc::UnboundedSender<Op>>,
    writer: Option<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
    faults: Arc<FaultInjection>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer's loop; joining it releases its handle on
        // the database before ours goes.
        self.tx.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").finish_non_exhaustive()
    }
}

fn fault(e: impl std::fmt::Display) -> StoreError {
    StoreError::Fault(e.to_string())
}

fn status_byte(status: SagaStatus) -> u8 {
    match status {
        SagaStatus::Running => 1,
        SagaStatus::Waiting => 2,
        SagaStatus::Compensating => 3,
        SagaStatus::Completed => 4,
        SagaStatus::Compensated => 5,
        SagaStatus::Failed => 6,
    }
}

fn event_key(saga_id: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(saga_id.len() + 9);
    key.extend_from_slice(saga_id.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn status_from_byte(byte: u8) -> Option<SagaStatus> {
    SagaStatus::ALL
        .into_iter()
        .find(|s| status_byte(*s) == byte)
}

/// The part of an index key before the position: what a filter fixes.
fn status_prefix(status: SagaStatus) -> Vec<u8> {
    vec![status_byte(status)]
}

fn definition_prefix(definition: &str) -> Vec<u8> {
    let mut key = definition.as_bytes().to_vec();
    key.push(0);
    key
}

fn status_definition_prefix(status: SagaStatus, definition: &str) -> Vec<u8> {
    let mut key = status_prefix(status);
    key.extend_from_slice(&definition_prefix(definition));
    key
}

/// `prefix created_at_ms(u64 BE)`: where a saga created at `created_at_ms` starts.
fn time_key(prefix: &[u8], created_at_ms: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 8);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&created_at_ms.to_be_bytes());
    key
}

/// `prefix created_at_ms(u64 BE) saga_id`: an index entry.
fn index_key(prefix: &[u8], created_at_ms: u64, saga_id: &str) -> Vec<u8> {
    let mut key = time_key(prefix, created_at_ms);
    key.extend_from_slice(saga_id.as_bytes());
    key
}

/// The (created_at_ms, saga id) of an index entry whose prefix is `prefix_len` bytes.
fn split_index_key(key: &[u8], prefix_len: usize) -> Result<(u64, String)> {
    let corrupt = |cause: &str| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        cause: cause.to_owned(),
    };
    let time = key
        .get(prefix_len..prefix_len + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .ok_or_else(|| corrupt("index key too short for a creation time"))?;
    let saga_id = std::str::from_utf8(&key[prefix_len + 8..])
        .map_err(|_| corrupt("index key with a saga id that is not UTF-8"))?;
    Ok((u64::from_be_bytes(time), saga_id.to_owned()))
}

/// The least key greater than every key that starts with `prefix`; `None` if there is none
/// (the range is unbounded above).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A saga's entries in the four indexes, all derived from its summary.
struct IndexKeys {
    by_created: Vec<u8>,
    by_status: Vec<u8>,
    by_definition: Vec<u8>,
    by_status_definition: Vec<u8>,
}

impl IndexKeys {
    fn of(s: &Summary) -> IndexKeys {
        let key = |prefix: Vec<u8>| index_key(&prefix, s.created_at_ms, &s.saga_id);
        IndexKeys {
            by_created: key(Vec::new()),
            by_status: key(status_prefix(s.status)),
            by_definition: key(definition_prefix(&s.definition)),
            by_status_definition: key(status_definition_prefix(s.status, &s.definition)),
        }
    }
}

fn change_key(cursor: u64) -> [u8; 8] {
    cursor.to_be_bytes()
}

fn definition_key(name: &str, version: u32) -> Vec<u8> {
    let mut key = name.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        key: "<new record>".into(),
        cause: e.to_string(),
    })
}

fn from_json<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        cause: e.to_string(),
    })
}

/// How long [`SledStore::open`] keeps trying a directory whose lock is held: a store just
/// closed in this process can hold it a moment longer through sled's own background I/O.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn open_db(dir: &Path) -> Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        let opened = sled::Config::new()
            .path(dir)
            // Flushes are explicit (group commit); no background flush thread.
            .flush_every_ms(None)
            .cache_capacity(CACHE_CAPACITY)
            .open();
        match opened {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(io))
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("lock") =>
            {
                if std::time::Instant::now() >= deadline {
                    return Err(StoreError::InUse(dir.display().to_string()));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(fault(format!("cannot open {}: {e}", dir.display()))),
        }
    }
}

/// Makes everything written so far durable: sled's flush, then an fdatasync of its data
/// file. On Linux sled 0.34 ends a flush with `sync_file_range`, which survives a crash of
/// the process but neither flushes the drive's volatile cache nor the file's metadata; the
/// fdatasync makes an acknowledged write survive a power loss too.
fn sync_to_disk(db: &sled::Db, data_file: &std::fs::File) -> Result<()> {
    db.flush()
        .map_err(|e| fault(format!("flush failed: {e}")))?;
    data_file
        .sync_data()
        .map_err(|e| fault(format!("flush failed: fdatasync: {e}")))
}

/// Empties the four indexes and fills them again from `sagas`; returns how many sagas
/// there are. Not atomic: the caller records the format only after it and a flush.
fn rebuild_indexes(t: &Trees) -> Result<u64> {
    let indexes = [
        &t.by_created,
        &t.by_status,
        &t.by_definition,
        &t.by_status_definition,
    ];
    for index in indexes {
        index.clear().map_err(fault)?;
    }
    let mut sagas = 0;
    for item in t.sagas.iter() {
        let (key, value) = item.map_err(fault)?;
        let summary: Summary = from_json(&key, &value)?;
        let keys = IndexKeys::of(&summary);
        let entries = [
            keys.by_created,
            keys.by_status,
            keys.by_definition,
            keys.by_status_definition,
        ];
        for (index, entry) in indexes.into_iter().zip(entries) {
            index.insert(entry, &[]).map_err(fault)?;
        }
        sagas += 1;
    }
    Ok(sagas)
}

impl SledStore {
    /// Opens (or creates) the store in `dir` and starts its writer thread. A directory of
    /// an older format is brought up to [`FORMAT_VERSION`] (and flushed) first; one of a
    /// newer format is refused.
    pub fn open(dir: &Path) -> Result<SledStore> {
        let db = open_db(dir)?;
        let open = |name: &str| db.open_tree(name).map_err(fault);
        let meta = open("meta")?;
        let found = match meta.get(FORMAT_KEY).map_err(fault)? {
            Some(bytes) => Some(
                <[u8; 4]>::try_from(bytes.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        key: "meta/format_version".into(),
                        cause: "not a 4-byte version".into(),
                    })?,
            ),
            None => None,
        };
        if let Some(found) = found
            && found > FORMAT_VERSION
        {
            return Err(StoreError::NewerFormat {
                dir: dir.display().to_string(),
                found,
                supported: FORMAT_VERSION,
            });
        }
        let trees = Trees {
            events: open("events")?,
            sagas: open("sagas")?,
            idempotency: open("idempotency")?,
            by_created: open("by_created")?,
            by_status: open("by_status")?,
            by_definition: open("by_definition")?,
            by_status_definition: open("by_status_definition")?,
            changes: open("changes")?,
            definitions: open("definitions")?,
            definition_descriptors: open("definition_descriptors")?,
        };
        let data_file = std::fs::File::open(dir.join("db"))
            .map_err(|e| fault(format!("cannot open {}/db to sync it: {e}", dir.display())))?;
        // No format key but sagas: written before the key existed, by format 1.
        let older = match found {
            Some(found) => found < FORMAT_VERSION,
            None => !trees.sagas.is_empty(),
        };
        if older {
            let sagas = rebuild_indexes(&trees)?;
            // The indexes are durable before the version says they are there.
            sync_to_disk(&db, &data_file)?;
            tracing::info!(
                dir = %dir.display(),
                from = found.unwrap_or(1),
                to = FORMAT_VERSION,
                sagas,
                "storage format upgraded: indexes rebuilt"
            );
        }
        if found != Some(FORMAT_VERSION) {
            meta.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())
                .map_err(fault)?;
            sync_to_disk(&db, &data_file)?;
        }
        let last_cursor = match trees.changes.last().map_err(fault)? {
            Some((key, _)) => <[u8; 8]>::try_from(key.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    cause: "change key is not an 8-byte cursor".into(),
                })?,
            None => 0,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            durable_cursor: watch::Sender::new(last_cursor),
            ..Shared::default()
        });
        let faults = Arc::new(FaultInjection::default());
        let writer = Writer {
            data_file,
            db: db.clone(),
            trees: trees.clone(),
            shared: shared.clone(),
            faults: faults.clone(),
            next_cursor: last_cursor + 1,
        };
        let writer = std::thread::Builder::new()
            .name("saga-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| fault(format!("cannot start the writer thread: {e}")))?;
        Ok(SledStore {
            inner: Arc::new(Inner {
                db,
                trees,
                tx: Some(tx),
                writer: Some(writer),
                shared,
                faults,
            }),
        })
    }

    /// Tells `observer` about every flush from now on (its duration and batch size).
    pub fn observe_flushes(&self, observer: FlushObserver) {
        if let Ok(mut slot) = self.inner.shared.flush_observer.write() {
            *slot = Some(observer);
        }
    }

    /// Fault hooks for tests.
    pub fn fault_injection(&self) -> &FaultInjection {
        &self.inner.faults
    }

    fn submit<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Op) -> Pending<T> {
        if let Some(cause) = self.inner.shared.fault() {
            return Pending::failed(StoreError::Fault(cause));
        }
        let (reply, receiver) = oneshot::channel();
        let Some(tx) = &self.inner.tx else {
            return Pending::failed(StoreError::Closed);
        };
        if tx.send(make(reply)).is_err() {
            return Pending::failed(StoreError::Closed);
        }
        Pending::waiting(receiver)
    }

    /// Size of the data on disk, in bytes.
    pub fn size_on_disk(&self) -> Result<u64> {
        self.inner.db.size_on_disk().map_err(fault)
    }
}

struct Writer {
    db: sled::Db,
    /// sled's data file, for the fdatasync after each flush (see [`Writer::sync`]).
    data_file: std::fs::File,
    trees: Trees,
    shared: Arc<Shared>,
    faults: Arc<FaultInjection>,
    /// The cursor the next change will take. Advanced only after the transaction that
    /// wrote it committed, so cursors have no gaps.
    next_cursor: u64,
}

impl Writer {
    /// Makes everything written so far durable (see [`sync_to_disk`]).
    fn sync(&self) -> Result<()> {
        sync_to_disk(&self.db, &self.data_file)
    }

    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        let mut batch = Vec::new();
        while let Some(op) = rx.blocking_recv() {
            batch.push(op);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.commit(std::mem::take(&mut batch));
        }
    }

    fn commit(&mut self, batch: Vec<Op>) {
        // After a fault nothing more is written; every write is answered with the fault.
        let applied = match self.shared.fault() {
            Some(cause) => Err(StoreError::Fault(cause)),
            None => self.apply(&batch),
        };
        let mut failed = applied.as_ref().err().cloned();
        if let Ok(applied) = &applied
            && applied.wrote
        {
            // Crash point: the batch is written to sled but not flushed; nobody was answered.
            fail::fail_point!("store::before_flush", |_| crate::crash(
                "store::before_flush"
            ));
            let injected = self
                .faults
                .fail_next_flush
                .lock()
                .ok()
                .and_then(|mut f| f.take());
            let started = std::time::Instant::now();
            let flushed = match injected {
                Some(message) => Err(fault(format!("flush failed: {message}"))),
                None => self.sync(),
            };
            self.shared.flushes.fetch_add(1, Ordering::Relaxed);
            match flushed {
                Ok(()) => {
                    let observer = self
                        .shared
                        .flush_observer
                        .read()
                        .ok()
                        .and_then(|o| o.clone());
                    if let Some(observer) = observer {
                        observer(started.elapsed(), batch.len());
                    }
                    if applied.next_cursor > self.next_cursor {
                        // Before anyone is answered: a caller whose write resolved finds
                        // its change in the feed.
                        self.shared
                            .durable_cursor
                            .send_replace(applied.next_cursor - 1);
                    }
                }
                Err(e) => failed = Some(e),
            }
        }
        if let Some(StoreError::Fault(cause)) = &failed {
            tracing::error!(cause = %cause, "storage fault: the store stops accepting writes");
            self.shared.set_fault(cause.clone());
        }
        let outcomes = match applied {
            Ok(applied) if failed.is_none() => {
                self.next_cursor = applied.next_cursor;
                self.shared
                    .writes
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                self.shared
                    .events
                    .fetch_add(applied.events, Ordering::Relaxed);
                applied.outcomes
            }
            _ => Vec::new(),
        };
        let mut outcomes = outcomes.into_iter();
        for op in batch {
            let outcome = outcomes.next();
            let fault = failed.as_ref();
            // A caller that went away no longer needs the answer.
            match (op, outcome) {
                (Op::Create(_, tx), Some(Outcome::Create(r))) => drop(tx.send(r)),
                (Op::Append(_, tx), Some(Outcome::Append(r))) => drop(tx.send(r)),
                (Op::PutDefinition(_, tx), Some(Outcome::PutDefinition(r))) => drop(tx.send(r)),
                (Op::Create(_, tx), _) => drop(tx.send(Err(answer_fault(fault)))),
                (Op::Append(_, tx), _) => drop(tx.send(Err(answer_fault(fault)))),
                (Op::PutDefinition(_, tx), _) => drop(tx.send(Err(answer_fault(fault)))),
            }
        }
    }

    /// Applies every write of `batch` in one sled transaction: one log reservation and one
    /// atomic unit for the whole batch. Each write's own checks (an existing idempotency key,
    /// a sequence that does not follow, a terminal saga) decide its outcome alone; only a
    /// storage error fails the batch, and then nothing of it is applied.
    fn apply(&self, batch: &[Op]) -> Result<Applied> {
        let t = &self.trees;
        let trees: [&Tree; 10] = [
            &t.idempotency,
            &t.sagas,
            &t.events,
            &t.by_created,
            &t.by_status,
            &t.by_definition,
            &t.by_status_definition,
            &t.changes,
            &t.definitions,
            &t.definition_descriptors,
        ];
        let result = trees[..].transaction(|view: &Vec<TransactionalTree>| {
            let tx = TxTrees::of(view);
            let mut applied = Applied {
                outcomes: Vec::with_capacity(batch.len()),
                next_cursor: self.next_cursor,
                wrote: false,
                events: 0,
            };
            for (index, op) in batch.iter().enumerate() {
                if index > 0 {
                    // Crash point: between two writes of one batch, nothing flushed yet.
                    fail::fail_point!("store::between_writes", |_| crate::crash(
                        "store::between_writes"
                    ));
                }
                let outcome = match op {
                    Op::Create(new, _) => {
                        let r = create(&tx, new, &mut applied.next_cursor)?;
                        if matches!(r, Ok(Created::New)) {
                            applied.wrote = true;
                            applied.events += new.events.len() as u64;
                        }
                        Outcome::Create(r)
                    }
                    Op::Append(appended, _) => {
                        let r = append(&tx, appended, &mut applied.next_cursor)?;
                        if r.is_ok() {
                            applied.wrote = true;
                            applied.events += appended.events.len() as u64;
                        }
                        Outcome::Append(r)
                    }
                    Op::PutDefinition(definition, _) => {
                        let r = put_definition(&tx, definition)?;
                        applied.wrote |= matches!(r, Ok(PutDefinition::Created));
                        Outcome::PutDefinition(r)
                    }
                };
                applied.outcomes.push(outcome);
            }
            Ok(applied)
        });
        match result {
            Ok(applied) => Ok(applied),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(fault(e)),
        }
    }
}

/// The answer for a write of a batch that failed as a whole.
fn answer_fault(fault: Option<&StoreError>) -> StoreError {
    fault
        .cloned()
        .unwrap_or_else(|| StoreError::Fault("the batch was not applied".into()))
}

/// What one write of a batch came to, before the flush.
enum Outcome {
    Create(Result<Created>),
    Append(Result<()>),
    PutDefinition(Result<PutDefinition>),
}

/// What a batch's transaction did.
struct Applied {
    /// One per write, in order.
    outcomes: Vec<Outcome>,
    /// The cursor the next change will take once this batch is durable.
    next_cursor: u64,
    /// Whether anything was written: a batch that only found existing records (an
    /// idempotent create, an unchanged definition) needs no flush, since everything it
    /// read was flushed by an earlier batch before anyone was answered.
    wrote: bool,
    events: u64,
}

/// The transaction's view of every tree, by name.
struct TxTrees<'a> {
    idempotency: &'a TransactionalTree,
    sagas: &'a TransactionalTree,
    events: &'a TransactionalTree,
    by_created: &'a TransactionalTree,
    by_status: &'a TransactionalTree,
    by_definition: &'a TransactionalTree,
    by_status_definition: &'a TransactionalTree,
    changes: &'a TransactionalTree,
    definitions: &'a TransactionalTree,
    definition_descriptors: &'a TransactionalTree,
}

impl<'a> TxTrees<'a> {
    /// `view` in the order [`Writer::apply`] lists the trees.
    fn of(view: &'a [TransactionalTree]) -> TxTrees<'a> {
        TxTrees {
            idempotency: &view[0],
            sagas: &view[1],
            events: &view[2],
            by_created: &view[3],
            by_status: &view[4],
            by_definition: &view[5],
            by_status_definition: &view[6],
            changes: &view[7],
            definitions: &view[8],
            definition_descriptors: &view[9],
        }
    }
}

/// The change entries (key, JSON) of `events`: one per event after which (status, business
/// status) differs from `previous`, numbered from `cursor` on. Encoded before anything of the
/// write is inserted, so that a write refused here leaves nothing behind.
fn encode_changes(
    summary: &Summary,
    events: &[Event],
    statuses: &[(SagaStatus, String)],
    mut previous: Option<(SagaStatus, String)>,
    cursor: u64,
) -> Result<Vec<([u8; 8], Vec<u8>)>> {
    // The status after each event: given, or the summary's after the last one.
    let after: Vec<(&Event, SagaStatus, &str)> = if statuses.len() == events.len() {
        events
            .iter()
            .zip(statuses)
            .map(|(e, (s, b))| (e, *s, b.as_str()))
            .collect()
    } else {
        events
            .last()
            .map(|e| (e, summary.status, summary.business_status.as_str()))
            .into_iter()
            .collect()
    };
    let mut entries = Vec::new();
    for (event, status, business) in after {
        if previous
            .as_ref()
            .is_some_and(|(s, b)| (*s, b.as_str()) == (status, business))
        {
            continue;
        }
        previous = Some((status, business.to_owned()));
        let change = Change {
            cursor: cursor + entries.len() as u64,
            saga_id: summary.saga_id.clone(),
            definition: summary.definition.clone(),
            version: summary.version,
            status,
            business_status: business.to_owned(),
            seq: event.seq,
            at_ms: event.at_ms,
        };
        entries.push((change_key(change.cursor), to_json(&change)?));
    }
    Ok(entries)
}

/// Inserts change entries and advances `*cursor` past them.
fn insert_changes(
    tx: &TxTrees<'_>,
    entries: Vec<([u8; 8], Vec<u8>)>,
    cursor: &mut u64,
) -> std::result::Result<(), UnabortableTransactionError> {
    *cursor += entries.len() as u64;
    for (key, json) in entries {
        tx.changes.insert(&key, json)?;
    }
    Ok(())
}

/// The result of one write inside a batch's transaction: the outer error is sled's (it
/// fails the batch), the inner one this write's own.
type WriteResult<T> = std::result::Result<Result<T>, UnabortableTransactionError>;

/// Writes a new saga, with its changes numbered from `*cursor`, unless its idempotency key
/// already names one.
fn create(tx: &TxTrees<'_>, new: &NewSaga, cursor: &mut u64) -> WriteResult<Created> {
    let key = new.summary.idempotency_key.as_bytes();
    if let Some(existing) = tx.idempotency.get(key)? {
        return Ok(match tx.sagas.get(&existing)? {
            Some(bytes) => from_json::<Summary>(&existing, &bytes).map(Created::Existing),
            None => Err(StoreError::Corrupt {
                key: String::from_utf8_lossy(key).into_owned(),
                cause: "idempotency key names a saga that does not exist".into(),
            }),
        });
    }
    let id = new.summary.saga_id.as_str();
    let encoded = match encode_events(id, &new.events, &new.summary) {
        Ok(encoded) => encoded,
        Err(e) => return Ok(Err(e)),
    };
    if let Some(first) = new.events.first()
        && first.seq != 1
    {
        return Ok(Err(StoreError::Corrupt {
            key: id.to_owned(),
            cause: format!("a new saga starts at seq 1, not {}", first.seq),
        }));
    }
    let summary_json = match to_json(&new.summary) {
        Ok(json) => json,
        Err(e) => return Ok(Err(e)),
    };
    let changes = match encode_changes(&new.summary, &new.events, &new.statuses, None, *cursor) {
        Ok(changes) => changes,
        Err(e) => return Ok(Err(e)),
    };
    let keys = IndexKeys::of(&new.summary);
    tx.idempotency.insert(key, id.as_bytes())?;
    tx.sagas.insert(id.as_bytes(), summary_json)?;
    for (key, value) in encoded {
        tx.events.insert(key, value)?;
    }
    tx.by_created.insert(keys.by_created, &[])?;
    tx.by_status.insert(keys.by_status, &[])?;
    tx.by_definition.insert(keys.by_definition, &[])?;
    tx.by_status_definition
        .insert(keys.by_status_definition, &[])?;
    insert_changes(tx, changes, cursor)?;
    Ok(Ok(Created::New))
}

/// The events' keys and JSON; refuses a summary whose `last_seq` is not the last event's.
fn encode_events(id: &str, events: &[Event], summary: &Summary) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    if let Some(last) = events.last()
        && last.seq != summary.last_seq
    {
        return Err(StoreError::Corrupt {
            key: id.to_owned(),
            cause: format!(
                "the summary says seq {} but the last event is seq {}",
                summary.last_seq, last.seq
            ),
        });
    }
    events
        .iter()
        .map(|e| Ok((event_key(id, e.seq), to_json(e)?)))
        .collect()
}

/// Appends events and replaces the summary; writes a change, numbered from `*cursor`, for
/// every event after which the status or business status differs from the one before it.
fn append(tx: &TxTrees<'_>, appended: &Appended, cursor: &mut u64) -> WriteResult<()> {
    let new_events = appended.events.as_slice();
    let summary = &appended.summary;
    let id = summary.saga_id.as_str();
    let Some(old) = tx.sagas.get(id.as_bytes())? else {
        return Ok(Err(StoreError::Corrupt {
            key: id.to_owned(),
            cause: "append to a saga that does not exist".into(),
        }));
    };
    let old: Summary = match from_json(id.as_bytes(), &old) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let first = new_events.first().map_or(old.last_seq + 1, |e| e.seq);
    if first != old.last_seq + 1 || summary.last_seq != old.last_seq + new_events.len() as u64 {
        return Ok(Err(StoreError::Corrupt {
            key: id.to_owned(),
            cause: format!("append of seq {first} does not follow seq {}", old.last_seq),
        }));
    }
    if old.status.is_terminal() {
        return Ok(Err(StoreError::Corrupt {
            key: id.to_owned(),
            cause: format!("append to a saga that is already {}", old.status.as_str()),
        }));
    }
    let encoded = match encode_events(id, new_events, summary) {
        Ok(encoded) => encoded,
        Err(e) => return Ok(Err(e)),
    };
    let summary_json = match to_json(summary) {
        Ok(json) => json,
        Err(e) => return Ok(Err(e)),
    };
    let previous = Some((old.status, old.business_status.clone()));
    let changes = match encode_changes(summary, new_events, &appended.statuses, previous, *cursor) {
        Ok(changes) => changes,
        Err(e) => return Ok(Err(e)),
    };
    for (key, value) in encoded {
        tx.events.insert(key, value)?;
    }
    tx.sagas.insert(id.as_bytes(), summary_json)?;
    // Usually only the status moves; the indexes follow whatever the summary says, so they
    // never disagree with it.
    let old_keys = IndexKeys::of(&old);
    let new_keys = IndexKeys::of(summary);
    let moves = [
        (tx.by_created, old_keys.by_created, new_keys.by_created),
        (tx.by_status, old_keys.by_status, new_keys.by_status),
        (
            tx.by_definition,
            old_keys.by_definition,
            new_keys.by_definition,
        ),
        (
            tx.by_status_definition,
            old_keys.by_status_definition,
            new_keys.by_status_definition,
        ),
    ];
    for (index, old_key, new_key) in moves {
        if old_key != new_key {
            index.remove(old_key)?;
            index.insert(new_key, &[])?;
        }
    }
    insert_changes(tx, changes, cursor)?;
    Ok(Ok(()))
}

fn put_definition(tx: &TxTrees<'_>, d: &StoredDefinition) -> WriteResult<PutDefinition> {
    let key = definition_key(&d.name, d.version);
    if let Some(existing) = tx.definitions.get(&key)? {
        let existing = String::from_utf8_lossy(&existing).into_owned();
        // The descriptors first stored stay: the version is pinned as it was.
        return Ok(Ok(if existing == d.yaml {
            PutDefinition::Unchanged
        } else {
            PutDefinition::Conflict { existing }
        }));
    }
    tx.definitions.insert(key.as_slice(), d.yaml.as_bytes())?;
    for (participant, bytes) in &d.descriptors {
        let mut descriptor_key = key.clone();
        descriptor_key.extend_from_slice(participant.as_bytes());
        tx.definition_descriptors
            .insert(descriptor_key, bytes.as_slice())?;
    }
    Ok(Ok(PutDefinition::Created))
}

impl SagaStore for SledStore {
    fn create(&self, saga: NewSaga) -> Pending<Created> {
        self.submit(|reply| Op::Create(saga, reply))
    }

    fn append_with_statuses(&self, appended: Appended) -> Pending<()> {
        self.submit(|reply| Op::Append(appended, reply))
    }

    fn put_definition(&self, definition: StoredDefinition) -> Pending<PutDefinition> {
        self.submit(|reply| Op::PutDefinition(definition, reply))
    }

    fn events(&self, saga_id: &str) -> Result<Option<Vec<Event>>> {
        let mut prefix = saga_id.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.inner.trees.events.scan_prefix(&prefix) {
            let (key, value) = item.map_err(fault)?;
            out.push(from_json(&key, &value)?);
        }
        Ok(if out.is_empty() { None } else { Some(out) })
    }

    fn summary(&self, saga_id: &str) -> Result<Option<Summary>> {
        match self
            .inner
            .trees
            .sagas
            .get(saga_id.as_bytes())
            .map_err(fault)?
        {
            Some(bytes) => Ok(Some(from_json(saga_id.as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    fn list(&self, filter: &ListFilter, after: Option<&str>, limit: usize) -> Result<Vec<Summary>> {
        let after = after.map(parse_page_token).transpose()?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        // The one index whose prefix fixes exactly the filter's status and definition.
        let t = &self.inner.trees;
        let (tree, prefix) = match (filter.status, filter.definition.as_deref()) {
            (Some(status), Some(definition)) => (
                &t.by_status_definition,
                status_definition_prefix(status, definition),
            ),
            (Some(status), None) => (&t.by_status, status_prefix(status)),
            (None, Some(definition)) => (&t.by_definition, definition_prefix(definition)),
            (None, None) => (&t.by_created, Vec::new()),
        };
        // Within it, the time bounds and the page token make one range.
        let lower = time_key(&prefix, filter.created_from_ms.unwrap_or(0));
        let mut upper = prefix_end(&prefix);
        let ends = [
            filter.created_to_ms.map(|to| time_key(&prefix, to)),
            after.map(|(created, saga_id)| index_key(&prefix, created, saga_id)),
        ];
        for end in ends.into_iter().flatten() {
            upper = Some(match upper {
                Some(upper) => upper.min(end),
                None => end,
            });
        }
        if upper.as_ref().is_some_and(|upper| *upper <= lower) {
            return Ok(Vec::new());
        }
        let range = (
            Bound::Included(lower),
            upper.map_or(Bound::Unbounded, Bound::Excluded),
        );
        let shared = &self.inner.shared;
        let mut out = Vec::new();
        for item in tree.range(range).rev() {
            let (key, _) = item.map_err(fault)?;
            shared.index_entries_scanned.fetch_add(1, Ordering::Relaxed);
            let (_, saga_id) = split_index_key(&key, prefix.len())?;
            shared.summaries_read.fetch_add(1, Ordering::Relaxed);
            let Some(summary) = self.summary(&saga_id)? else {
                continue;
            };
            // Reads are not isolated from the writer: an append may have moved this saga
            // since its entry was read. Its summary is the truth.
            let matches = filter.status.is_none_or(|s| s == summary.status)
                && filter
                    .definition
                    .as_ref()
                    .is_none_or(|d| *d == summary.definition)
                && filter
                    .created_from_ms
                    .is_none_or(|from| summary.created_at_ms >= from)
                && filter
                    .created_to_ms
                    .is_none_or(|to| summary.created_at_ms < to);
            if !matches {
                continue;
            }
            out.push(summary);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn count_by_status(&self, status: SagaStatus) -> Result<u64> {
        let mut count = 0u64;
        for item in self
            .inner
            .trees
            .by_status
            .scan_prefix([status_byte(status)])
        {
            item.map_err(fault)?;
            count += 1;
        }
        Ok(count)
    }

    fn unfinished(&self) -> Result<Vec<Summary>> {
        let mut out = Vec::new();
        for status in SagaStatus::ALL.into_iter().filter(|s| !s.is_terminal()) {
            let prefix = status_prefix(status);
            for item in self.inner.trees.by_status.scan_prefix(&prefix) {
                let (key, _) = item.map_err(fault)?;
                let (_, saga_id) = split_index_key(&key, prefix.len())?;
                if let Some(summary) = self.summary(&saga_id)? {
                    out.push(summary);
                }
            }
        }
        out.sort_by(|a, b| a.saga_id.cmp(&b.saga_id));
        Ok(out)
    }

    fn definitions(&self) -> Result<Vec<StoredDefinition>> {
        let mut out = Vec::new();
        for item in self.inner.trees.definitions.iter() {
            let (key, value) = item.map_err(fault)?;
            let split = key
                .iter()
                .position(|b| *b == 0)
                .ok_or_else(|| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    cause: "definition key without version".into(),
                })?;
            let version_bytes: [u8; 4] =
                key[split + 1..]
                    .try_into()
                    .map_err(|_| StoreError::Corrupt {
                        key: String::from_utf8_lossy(&key).into_owned(),
                        cause: "definition key with a malformed version".into(),
                    })?;
            let mut descriptors = BTreeMap::new();
            for item in self.inner.trees.definition_descriptors.scan_prefix(&key) {
                let (descriptor_key, bytes) = item.map_err(fault)?;
                let participant =
                    String::from_utf8_lossy(&descriptor_key[key.len()..]).into_owned();
                descriptors.insert(participant, bytes.to_vec());
            }
            out.push(StoredDefinition {
                name: String::from_utf8_lossy(&key[..split]).into_owned(),
                version: u32::from_be_bytes(version_bytes),
                yaml: String::from_utf8_lossy(&value).into_owned(),
                descriptors,
            });
        }
        Ok(out)
    }

    fn status_index(&self) -> Result<Vec<(SagaStatus, String)>> {
        let mut out = Vec::new();
        for item in self.inner.trees.by_status.iter() {
            let (key, _) = item.map_err(fault)?;
            let status = key
                .first()
                .and_then(|b| status_from_byte(*b))
                .ok_or_else(|| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    cause: "unknown status byte in the status index".into(),
                })?;
            let (_, saga_id) = split_index_key(&key, 1)?;
            out.push((status, saga_id));
        }
        Ok(out)
    }

    fn changes(&self, after: u64, limit: usize) -> Result<Vec<Change>> {
        // No further than the last flushed change: later ones may be in sled's memory only.
        let durable = *self.inner.shared.durable_cursor.borrow();
        if after >= durable || limit == 0 {
            return Ok(Vec::new());
        }
        let range = (
            Bound::Excluded(change_key(after)),
            Bound::Included(change_key(durable)),
        );
        let mut out = Vec::new();
        for item in self.inner.trees.changes.range(range).take(limit) {
            let (key, value) = item.map_err(fault)?;
            let change: Change = from_json(&key, &value)?;
            out.push(change);
        }
        Ok(out)
    }

    fn watch_changes(&self) -> watch::Receiver<u64> {
        self.inner.shared.durable_cursor.subscribe()
    }

    fn summaries(&self) -> Result<Vec<Summary>> {
        let mut out = Vec::new();
        for item in self.inner.trees.sagas.iter() {
            let (key, value) = item.map_err(fault)?;
            out.push(from_json(&key, &value)?);
        }
        Ok(out)
    }

    fn health(&self) -> Result<()> {
        match self.inner.shared.fault() {
            Some(cause) => Err(StoreError::Fault(cause)),
            None => Ok(()),
        }
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            flushes: self.inner.shared.flushes.load(Ordering::Relaxed),
            writes: self.inner.shared.writes.load(Ordering::Relaxed),
            events: self.inner.shared.events.load(Ordering::Relaxed),
            summaries_read: self.inner.shared.summaries_read.load(Ordering::Relaxed),
            index_entries_scanned: self
                .inner
                .shared
                .index_entries_scanned
                .load(Ordering::Relaxed),
        }
    }
}
