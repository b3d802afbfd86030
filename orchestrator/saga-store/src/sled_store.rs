//! The embedded sled implementation of [`SagaStore`], with group commit.
//!
//! Trees (one per concern):
//! - `events`: `saga_id 0x00 seq(u64 BE)` → event JSON: the truth.
//! - `sagas`: `saga_id` → [`Summary`] JSON: the snapshot that serves reads and recovery.
//! - `idempotency`: StartSaga idempotency key → saga id.
//! - `by_status`: `status(u8) saga_id` → empty: the index behind status filters and recovery.
//! - `by_definition`: `definition 0x00 saga_id` → empty.
//! - `definitions`: `name 0x00 version(u32 BE)` → YAML text.
//! - `definition_descriptors`: `name 0x00 version(u32 BE) participant` → encoded
//!   `FileDescriptorSet` the version was compiled against.
//! - `meta`: `format_version` → u32 BE ([`FORMAT_VERSION`]).
//!
//! Every write goes to one writer thread. It takes every write queued at that moment
//! (up to [`MAX_BATCH`]), applies each in its own sled transaction, flushes once, and only
//! then answers them all. Saga ids are UUIDv7 strings, so key order is creation order.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use saga_engine::{Event, SagaStatus};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Transactional, Tree};
use tokio::sync::{mpsc, oneshot};

use crate::{
    Created, ListFilter, NewSaga, Pending, PutDefinition, Result, SagaStore, StoreError,
    StoreStats, StoredDefinition, Summary,
};

/// The most writes made durable by one flush.
pub const MAX_BATCH: usize = 4096;

/// The storage format this code writes and reads. A directory with a higher version is
/// refused rather than misread.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_KEY: &[u8] = b"format_version";

#[derive(Clone)]
struct Trees {
    events: Tree,
    sagas: Tree,
    idempotency: Tree,
    by_status: Tree,
    by_definition: Tree,
    definitions: Tree,
    definition_descriptors: Tree,
}

enum Op {
    Create(NewSaga, oneshot::Sender<Result<Created>>),
    Append(Vec<Event>, Summary, oneshot::Sender<Result<()>>),
    PutDefinition(StoredDefinition, oneshot::Sender<Result<PutDefinition>>),
}

/// A reply waiting for the batch's flush.
enum Reply {
    Create(oneshot::Sender<Result<Created>>, Result<Created>),
    Append(oneshot::Sender<Result<()>>, Result<()>),
    PutDefinition(
        oneshot::Sender<Result<PutDefinition>>,
        Result<PutDefinition>,
    ),
}

impl Reply {
    fn send(self, fault: Option<&StoreError>) {
        // A caller that went away no longer needs the answer.
        match self {
            Reply::Create(tx, r) => drop(tx.send(fault.cloned().map_or(r, Err))),
            Reply::Append(tx, r) => drop(tx.send(fault.cloned().map_or(r, Err))),
            Reply::PutDefinition(tx, r) => drop(tx.send(fault.cloned().map_or(r, Err))),
        }
    }
}

#[derive(Default)]
struct Shared {
    /// Set once a write or flush failed. A std Mutex: never held across an await.
    fault: Mutex<Option<String>>,
    flushes: AtomicU64,
    writes: AtomicU64,
    events: AtomicU64,
}

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

fn status_key(status: SagaStatus, saga_id: &str) -> Vec<u8> {
    let mut key = vec![status_byte(status)];
    key.extend_from_slice(saga_id.as_bytes());
    key
}

fn definition_index_key(definition: &str, saga_id: &str) -> Vec<u8> {
    let mut key = definition.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(saga_id.as_bytes());
    key
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

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<StoreError>>;

fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn tx_result<T>(r: std::result::Result<T, TransactionError<StoreError>>) -> (Result<T>, bool) {
    match r {
        Ok(v) => (Ok(v), false),
        Err(TransactionError::Abort(e)) => (Err(e), false),
        Err(TransactionError::Storage(e)) => (Err(fault(e)), true),
    }
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

impl SledStore {
    /// Opens (or creates) the store in `dir` and starts its writer thread.
    pub fn open(dir: &Path) -> Result<SledStore> {
        let db = open_db(dir)?;
        let open = |name: &str| db.open_tree(name).map_err(fault);
        let meta = open("meta")?;
        match meta.get(FORMAT_KEY).map_err(fault)? {
            Some(bytes) => {
                let found = <[u8; 4]>::try_from(bytes.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        key: "meta/format_version".into(),
                        cause: "not a 4-byte version".into(),
                    })?;
                if found > FORMAT_VERSION {
                    return Err(StoreError::NewerFormat {
                        dir: dir.display().to_string(),
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
            }
            None => {
                meta.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())
                    .map_err(fault)?;
                db.flush().map_err(fault)?;
            }
        }
        let trees = Trees {
            events: open("events")?,
            sagas: open("sagas")?,
            idempotency: open("idempotency")?,
            by_status: open("by_status")?,
            by_definition: open("by_definition")?,
            definitions: open("definitions")?,
            definition_descriptors: open("definition_descriptors")?,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let faults = Arc::new(FaultInjection::default());
        let data_file = std::fs::File::open(dir.join("db"))
            .map_err(|e| fault(format!("cannot open {}/db to sync it: {e}", dir.display())))?;
        let writer = Writer {
            data_file,
            db: db.clone(),
            trees: trees.clone(),
            shared: shared.clone(),
            faults: faults.clone(),
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
}

impl Writer {
    /// Makes everything written so far durable: sled's flush, then an fdatasync of its data
    /// file. On Linux sled 0.34 ends a flush with `sync_file_range`, which survives a crash
    /// of the process but neither flushes the drive's volatile cache nor the file's metadata;
    /// the fdatasync makes an acknowledged write survive a power loss too.
    fn sync(&self) -> Result<()> {
        self.db
            .flush()
            .map_err(|e| fault(format!("flush failed: {e}")))?;
        self.data_file
            .sync_data()
            .map_err(|e| fault(format!("flush failed: fdatasync: {e}")))
    }

    fn run(self, mut rx: mpsc::UnboundedReceiver<Op>) {
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

    fn commit(&self, batch: Vec<Op>) {
        let mut replies = Vec::with_capacity(batch.len());
        let mut failed: Option<StoreError> = self.shared.fault().map(StoreError::Fault);
        let mut events = 0u64;
        // Whether this batch wrote anything; a batch that only found existing records (an
        // idempotent create, an unchanged definition) needs no flush: everything it read was
        // flushed by an earlier batch before anyone was answered.
        let mut wrote = false;
        for (index, op) in batch.into_iter().enumerate() {
            if index > 0 {
                // Crash point: between two writes of one batch, nothing flushed yet.
                fail::fail_point!("store::between_writes", |_| crate::crash(
                    "store::between_writes"
                ));
            }
            if let Some(f) = &failed {
                // After a fault nothing more is written; answer with the fault.
                let f = Some(f);
                match op {
                    Op::Create(_, tx) => Reply::Create(tx, Ok(Created::New)).send(f),
                    Op::Append(_, _, tx) => Reply::Append(tx, Ok(())).send(f),
                    Op::PutDefinition(_, tx) => {
                        Reply::PutDefinition(tx, Ok(PutDefinition::Created)).send(f)
                    }
                }
                continue;
            }
            let is_fault = match op {
                Op::Create(new, tx) => {
                    let (r, is_fault) = tx_result(self.create(&new));
                    wrote |= matches!(r, Ok(Created::New)) || is_fault;
                    replies.push(Reply::Create(tx, r.clone()));
                    if is_fault { r.err() } else { None }
                }
                Op::Append(new_events, summary, tx) => {
                    let count = new_events.len() as u64;
                    let (r, is_fault) = tx_result(self.append(&new_events, &summary));
                    wrote |= r.is_ok() || is_fault;
                    if r.is_ok() {
                        events += count;
                    }
                    replies.push(Reply::Append(tx, r.clone()));
                    if is_fault { r.err() } else { None }
                }
                Op::PutDefinition(definition, tx) => {
                    let (r, is_fault) = tx_result(self.put_definition(&definition));
                    wrote |= matches!(r, Ok(PutDefinition::Created)) || is_fault;
                    replies.push(Reply::PutDefinition(tx, r.clone()));
                    if is_fault { r.err() } else { None }
                }
            };
            if let Some(e) = is_fault {
                failed = Some(e);
            }
        }
        if failed.is_none() && wrote {
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
            let flushed = match injected {
                Some(message) => Err(fault(format!("flush failed: {message}"))),
                None => self.sync(),
            };
            self.shared.flushes.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = flushed {
                failed = Some(e);
            }
        }
        if let Some(StoreError::Fault(cause)) = &failed {
            tracing::error!(cause = %cause, "storage fault: the store stops accepting writes");
            self.shared.set_fault(cause.clone());
        }
        if failed.is_none() {
            self.shared
                .writes
                .fetch_add(replies.len() as u64, Ordering::Relaxed);
            self.shared.events.fetch_add(events, Ordering::Relaxed);
        }
        for reply in replies {
            reply.send(failed.as_ref());
        }
    }

    fn create(&self, new: &NewSaga) -> std::result::Result<Created, TransactionError<StoreError>> {
        let t = &self.trees;
        let summary_json = to_json(&new.summary).map_err(TransactionError::Abort)?;
        let event_json = to_json(&new.first_event).map_err(TransactionError::Abort)?;
        let id = new.summary.saga_id.as_str();
        (
            &t.idempotency,
            &t.sagas,
            &t.events,
            &t.by_status,
            &t.by_definition,
        )
            .transaction(|(idempotency, sagas, events, by_status, by_definition)| {
                let key = new.summary.idempotency_key.as_bytes();
                if let Some(existing) = idempotency.get(key)? {
                    return match sagas.get(&existing)? {
                        Some(bytes) => match from_json::<Summary>(&existing, &bytes) {
                            Ok(summary) => Ok(Created::Existing(summary)),
                            Err(e) => abort(e),
                        },
                        None => abort(StoreError::Corrupt {
                            key: String::from_utf8_lossy(key).into_owned(),
                            cause: "idempotency key names a saga that does not exist".into(),
                        }),
                    };
                }
                idempotency.insert(key, id.as_bytes())?;
                sagas.insert(id.as_bytes(), summary_json.as_slice())?;
                events.insert(event_key(id, new.first_event.seq), event_json.as_slice())?;
                by_status.insert(status_key(new.summary.status, id), &[])?;
                by_definition.insert(definition_index_key(&new.summary.definition, id), &[])?;
                Ok(Created::New)
            })
    }

    fn append(
        &self,
        new_events: &[Event],
        summary: &Summary,
    ) -> std::result::Result<(), TransactionError<StoreError>> {
        let t = &self.trees;
        let id = summary.saga_id.as_str();
        let summary_json = to_json(summary).map_err(TransactionError::Abort)?;
        let encoded: Vec<(Vec<u8>, Vec<u8>)> = new_events
            .iter()
            .map(|e| Ok((event_key(id, e.seq), to_json(e)?)))
            .collect::<Result<_>>()
            .map_err(TransactionError::Abort)?;
        (&t.sagas, &t.events, &t.by_status).transaction(
            |(sagas, events, by_status): &(
                TransactionalTree,
                TransactionalTree,
                TransactionalTree,
            )| {
                let Some(old) = sagas.get(id.as_bytes())? else {
                    return abort(StoreError::Corrupt {
                        key: id.to_owned(),
                        cause: "append to a saga that does not exist".into(),
                    });
                };
                let old: Summary = match from_json(id.as_bytes(), &old) {
                    Ok(s) => s,
                    Err(e) => return abort(e),
                };
                let first = new_events.first().map_or(old.last_seq + 1, |e| e.seq);
                if first != old.last_seq + 1
                    || summary.last_seq != old.last_seq + new_events.len() as u64
                {
                    return abort(StoreError::Corrupt {
                        key: id.to_owned(),
                        cause: format!(
                            "append of seq {first} does not follow seq {}",
                            old.last_seq
                        ),
                    });
                }
                if old.status.is_terminal() {
                    return abort(StoreError::Corrupt {
                        key: id.to_owned(),
                        cause: format!("append to a saga that is already {}", old.status.as_str()),
                    });
                }
                for (key, value) in &encoded {
                    events.insert(key.as_slice(), value.as_slice())?;
                }
                sagas.insert(id.as_bytes(), summary_json.as_slice())?;
                if old.status != summary.status {
                    by_status.remove(status_key(old.status, id))?;
                    by_status.insert(status_key(summary.status, id), &[])?;
                }
                Ok(())
            },
        )
    }

    fn put_definition(
        &self,
        d: &StoredDefinition,
    ) -> std::result::Result<PutDefinition, TransactionError<StoreError>> {
        let key = definition_key(&d.name, d.version);
        let t = &self.trees;
        (&t.definitions, &t.definition_descriptors).transaction(|(definitions, descriptors)| {
            if let Some(existing) = definitions.get(&key)? {
                let existing = String::from_utf8_lossy(&existing).into_owned();
                // The descriptors first stored stay: the version is pinned as it was.
                return Ok(if existing == d.yaml {
                    PutDefinition::Unchanged
                } else {
                    PutDefinition::Conflict { existing }
                });
            }
            definitions.insert(key.as_slice(), d.yaml.as_bytes())?;
            for (participant, bytes) in &d.descriptors {
                let mut descriptor_key = key.clone();
                descriptor_key.extend_from_slice(participant.as_bytes());
                descriptors.insert(descriptor_key, bytes.as_slice())?;
            }
            Ok(PutDefinition::Created)
        })
    }
}

impl SagaStore for SledStore {
    fn create(&self, saga: NewSaga) -> Pending<Created> {
        self.submit(|reply| Op::Create(saga, reply))
    }

    fn append(&self, events: Vec<Event>, summary: Summary) -> Pending<()> {
        self.submit(|reply| Op::Append(events, summary, reply))
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
        // Pick the narrowest index, walk it newest first, check the other filter.
        let (tree, prefix): (&Tree, Vec<u8>) = match (&filter.status, &filter.definition) {
            (Some(status), _) => (&self.inner.trees.by_status, vec![status_byte(*status)]),
            (None, Some(definition)) => (
                &self.inner.trees.by_definition,
                definition_index_key(definition, ""),
            ),
            (None, None) => (&self.inner.trees.sagas, Vec::new()),
        };
        let end = match after {
            Some(after) => {
                let mut key = prefix.clone();
                key.extend_from_slice(after.as_bytes());
                key
            }
            None => {
                let mut key = prefix.clone();
                key.push(0xff);
                key
            }
        };
        let mut out = Vec::new();
        for item in tree.range(prefix.clone()..end).rev() {
            let (key, _) = item.map_err(fault)?;
            let saga_id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let Some(summary) = self.summary(&saga_id)? else {
                continue;
            };
            if filter.status.is_some_and(|s| s != summary.status)
                || filter
                    .definition
                    .as_ref()
                    .is_some_and(|d| d != &summary.definition)
            {
                continue;
            }
            out.push(summary);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn unfinished(&self) -> Result<Vec<Summary>> {
        let mut out = Vec::new();
        for status in SagaStatus::ALL.into_iter().filter(|s| !s.is_terminal()) {
            for item in self
                .inner
                .trees
                .by_status
                .scan_prefix([status_byte(status)])
            {
                let (key, _) = item.map_err(fault)?;
                let saga_id = String::from_utf8_lossy(&key[1..]).into_owned();
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
            let status = SagaStatus::ALL
                .into_iter()
                .find(|s| key.first() == Some(&status_byte(*s)))
                .ok_or_else(|| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    cause: "unknown status byte in the status index".into(),
                })?;
            out.push((status, String::from_utf8_lossy(&key[1..]).into_owned()));
        }
        Ok(out)
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
        }
    }
}
