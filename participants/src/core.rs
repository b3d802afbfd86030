//! What every participant shares: the sled state, the idempotency table, the ledger, and
//! the action/compensation convention.
//!
//! Everything lives in the default tree of one sled database, under these prefixes:
//!
//! - `r/<idempotency key>`: the first result of the key (a [`StoredResult`]).
//! - `l/<seq, 8 bytes big-endian>`: the ledger (encoded `participant.v1.LedgerEntry`).
//! - `c/<name>`: counters (8 bytes big-endian): the ledger seq and business ids.
//! - `e/<scope>`: the effect the action `<scope>/action` applied (an [`Effect`]).
//! - `t/<scope>`: the tombstone a compensation leaves when it found nothing to undo.
//! - `o/<type>/<id>`: business objects (authorizations, store orders, deliveries).
//!
//! Every mutating call goes to one writer thread per [`Core`] (the only writer of the
//! database), with group commit: the writer takes every call queued at that moment (up to
//! [`MAX_BATCH`]) and runs them one after the other, each in a [`Txn`] whose reads see its
//! own writes, then those of the calls before it in the group, then the tree. A call that
//! succeeded or was rejected records its result under `r/<key>` and its writes join the
//! group's; one that failed on storage leaves nothing. Then the group's writes are applied
//! with one atomic batch and made durable with one flush, and only then is anyone of the
//! group answered. A group of nothing but replays of results already in the tree needs no
//! flush: the writer flushes before it answers, so whatever it answered from is durable.
//! If the batch or the flush fails, every call of the group gets a storage error.
//!
//! A caller that gives up does not stop its call: the writer finishes every call queued,
//! also when the core is dropped (see [`Core`]'s `Drop`).

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use prost::Message;
use proto::participant::v1::{LedgerEntry, ListLedgerResponse};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};
use tracing::{error, info, warn};

use crate::{Faults, Kind, ParticipantError};

/// The request metadata that carries the idempotency key.
pub(crate) const IDEMPOTENCY_KEY: &str = "idempotency-key";
const ACTION_SUFFIX: &str = "/action";
const COMPENSATION_SUFFIX: &str = "/compensation";
const LEDGER_COUNTER: &str = "ledger";

/// The first result of an idempotency key, replayed verbatim on every repeat.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct StoredResult {
    /// The short method name the key was first used with.
    #[prost(string, tag = "1")]
    pub method: String,
    /// `0` (OK) for a success, else the gRPC status code of the error.
    #[prost(int32, tag = "2")]
    pub code: i32,
    #[prost(string, tag = "3")]
    pub message: String,
    /// The encoded response message of a success.
    #[prost(bytes = "vec", tag = "4")]
    pub response: Vec<u8>,
}

/// The effect an action applied, kept so that its compensation can find and undo it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Effect {
    /// The ledger operation of the action, e.g. "authorize".
    pub operation: String,
    pub order_id: String,
    /// The business id the action created (authorization, store order, delivery).
    pub reference: String,
    pub undone: bool,
}

/// What a successful action reports, besides its response.
pub(crate) struct Applied<R> {
    pub response: R,
    pub order_id: String,
    pub reference: String,
    pub detail: String,
}

/// What a compensation did.
pub(crate) enum Compensated {
    /// The action's effect was undone.
    Undone,
    /// There was nothing to undo; the action is tombstoned.
    Noop,
}

impl Compensated {
    pub(crate) fn is_noop(&self) -> bool {
        matches!(self, Compensated::Noop)
    }
}

/// Why a call's business logic stopped.
pub(crate) enum CallError {
    /// A business outcome (bad input, refused): recorded as the key's first result. Writes
    /// made before it (e.g. the ledger entry of a refused late action) are kept.
    Rejected(Status),
    /// The storage failed: nothing is recorded or applied, the caller may retry.
    Storage(String),
}

impl From<sled::Error> for CallError {
    fn from(e: sled::Error) -> Self {
        CallError::Storage(e.to_string())
    }
}

pub(crate) fn invalid(message: impl Into<String>) -> CallError {
    CallError::Rejected(Status::invalid_argument(message))
}

pub(crate) fn refused(message: impl Into<String>) -> CallError {
    CallError::Rejected(Status::failed_precondition(message))
}

/// Writes not yet applied to the tree, by key.
type Writes = BTreeMap<Vec<u8>, Vec<u8>>;

/// The writes of one call, applied with the rest of its group by the writer. Reads see the
/// call's own writes, then those of the calls before it in the group, then the tree; the
/// writer is the only writer, so nothing else changes meanwhile.
pub(crate) struct Txn<'a> {
    tree: &'a sled::Tree,
    key: &'a str,
    /// The writes of the calls before this one in the group.
    group: &'a Writes,
    writes: Writes,
}

impl<'a> Txn<'a> {
    fn new(tree: &'a sled::Tree, key: &'a str, group: &'a Writes) -> Self {
        Txn {
            tree,
            key,
            group,
            writes: BTreeMap::new(),
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CallError> {
        if let Some(value) = self.writes.get(key).or_else(|| self.group.get(key)) {
            return Ok(Some(value.clone()));
        }
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, value);
    }

    pub(crate) fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, CallError> {
        match self.get(key.as_bytes())? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| CallError::Storage(format!("corrupt record {key}: {e}"))),
        }
    }

    pub(crate) fn put_json<T: Serialize>(&mut self, key: &str, value: &T) -> Result<(), CallError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| CallError::Storage(format!("cannot encode record {key}: {e}")))?;
        self.put(key.as_bytes().to_vec(), bytes);
        Ok(())
    }

    /// Increments the counter `name` and returns its new value (the first is 1).
    pub(crate) fn next_id(&mut self, name: &str) -> Result<u64, CallError> {
        let key = format!("c/{name}").into_bytes();
        let current = match self.get(&key)? {
            None => 0,
            Some(bytes) => decode_u64(&bytes)
                .ok_or_else(|| CallError::Storage(format!("corrupt counter {name}")))?,
        };
        let next = current + 1;
        self.put(key, next.to_be_bytes().to_vec());
        Ok(next)
    }

    fn append_ledger(
        &mut self,
        operation: &str,
        order_id: &str,
        reference: &str,
        noop: bool,
        detail: String,
    ) -> Result<(), CallError> {
        let seq = self.next_id(LEDGER_COUNTER)?;
        let entry = LedgerEntry {
            seq,
            idempotency_key: self.key.to_owned(),
            operation: operation.to_owned(),
            order_id: order_id.to_owned(),
            reference: reference.to_owned(),
            noop,
            detail,
            at: Some(prost_types::Timestamp::from(SystemTime::now())),
        };
        self.put(ledger_key(seq), entry.encode_to_vec());
        Ok(())
    }

    /// Runs the action `operation` under this call's key: refused (and ledgered as a no-op)
    /// if its compensation came first, else `apply`, whose success is ledgered and kept as
    /// the effect of the key's scope.
    pub(crate) fn action<R>(
        &mut self,
        operation: &str,
        order_id: &str,
        apply: impl FnOnce(&mut Txn<'a>) -> Result<Applied<R>, CallError>,
    ) -> Result<R, CallError> {
        if self.key.ends_with(COMPENSATION_SUFFIX) {
            return Err(invalid(format!(
                "idempotency-key {} is a compensation key, but {operation} is an action",
                self.key
            )));
        }
        let scope = self.key.strip_suffix(ACTION_SUFFIX).unwrap_or(self.key);
        if self.get(tombstone_key(scope).as_bytes())?.is_some() {
            self.append_ledger(
                operation,
                order_id,
                "",
                true,
                format!("refused: {scope}{COMPENSATION_SUFFIX} came first"),
            )?;
            return Err(refused("compensated before it arrived"));
        }
        let applied = apply(self)?;
        self.append_ledger(
            operation,
            &applied.order_id,
            &applied.reference,
            false,
            applied.detail,
        )?;
        let effect = Effect {
            operation: operation.to_owned(),
            order_id: applied.order_id,
            reference: applied.reference,
            undone: false,
        };
        self.put_json(&effect_key(scope), &effect)?;
        Ok(applied.response)
    }

    /// Runs the compensation `operation` (which undoes actions whose operation is `undoes`)
    /// under this call's key `<scope>/compensation`: `undo` the effect of `<scope>/action`
    /// if it exists, else ledger a no-op and tombstone the scope.
    pub(crate) fn compensation(
        &mut self,
        operation: &str,
        undoes: &str,
        order_id: &str,
        undo: impl FnOnce(&mut Txn<'a>, &Effect) -> Result<String, CallError>,
    ) -> Result<Compensated, CallError> {
        let Some(scope) = self.key.strip_suffix(COMPENSATION_SUFFIX) else {
            return Err(invalid(format!(
                "idempotency-key {} of the compensation {operation} must end in {COMPENSATION_SUFFIX}",
                self.key
            )));
        };
        let effect_key = effect_key(scope);
        match self.get_json::<Effect>(&effect_key)? {
            Some(mut effect) if !effect.undone => {
                if effect.operation != undoes {
                    return Err(invalid(format!(
                        "{scope}{ACTION_SUFFIX} was a {}, which {operation} does not undo",
                        effect.operation
                    )));
                }
                let detail = undo(self, &effect)?;
                let order_id = if order_id.is_empty() {
                    effect.order_id.clone()
                } else {
                    order_id.to_owned()
                };
                self.append_ledger(operation, &order_id, &effect.reference, false, detail)?;
                effect.undone = true;
                self.put_json(&effect_key, &effect)?;
                Ok(Compensated::Undone)
            }
            _ => {
                let key = self.key;
                self.put_json(&tombstone_key(scope), &key)?;
                self.append_ledger(
                    operation,
                    order_id,
                    "",
                    true,
                    format!("nothing to undo: {scope}{ACTION_SUFFIX} did not apply"),
                )?;
                Ok(Compensated::Noop)
            }
        }
    }
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn ledger_key(seq: u64) -> Vec<u8> {
    let mut key = b"l/".to_vec();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn effect_key(scope: &str) -> String {
    format!("e/{scope}")
}

fn tombstone_key(scope: &str) -> String {
    format!("t/{scope}")
}

fn result_key(key: &str) -> Vec<u8> {
    format!("r/{key}").into_bytes()
}

fn storage_status(e: impl std::fmt::Display) -> Status {
    Status::internal(format!("storage failure: {e}"))
}

/// The most calls one group commit takes: applied with one batch, made durable by one
/// flush.
const MAX_BATCH: usize = 1024;

/// A call's business logic, holding its decoded request: the encoded response, or why not.
type Op = Box<dyn for<'a> FnOnce(&mut Txn<'a>) -> Result<Vec<u8>, CallError> + Send>;

/// A mutating call, queued to the writer.
struct Job {
    method: &'static str,
    key: String,
    op: Op,
    reply: oneshot::Sender<Answer>,
}

/// The writer's answer to a call, sent once the call's group is durable.
struct Answer {
    /// The key's first result, or why there is none.
    outcome: Result<StoredResult, Status>,
    log: CallLog,
}

/// The line a call is logged with, written when this is dropped: by the caller once it has
/// its answer, or by the writer when the caller has gone. So every call the writer handled
/// is logged once, mostly off the writer's thread.
struct CallLog {
    kind: Kind,
    method: &'static str,
    key: String,
    line: Line,
}

enum Line {
    /// Answered with the key's first result.
    Done {
        replayed: bool,
        code: Code,
        message: String,
    },
    /// No result: the error.
    Failed(String),
    /// No result, because the group's flush failed: the error.
    FlushFailed(String),
}

impl Drop for CallLog {
    fn drop(&mut self) {
        let CallLog {
            kind,
            method,
            key,
            line,
        } = &*self;
        match line {
            Line::Done {
                replayed,
                code: Code::Ok,
                ..
            } => {
                info!(participant = %kind, method, idempotency_key = %key, replayed, outcome = "ok", "call");
            }
            Line::Done {
                replayed,
                code,
                message,
            } => {
                info!(participant = %kind, method, idempotency_key = %key, replayed, outcome = ?code, reason = %message, "call");
            }
            Line::Failed(error) => {
                error!(participant = %kind, method, idempotency_key = %key, error = %error, "call failed");
            }
            Line::FlushFailed(error) => {
                error!(participant = %kind, method, idempotency_key = %key, error = %error, "flush failed");
            }
        }
    }
}

/// Why a group commit failed: every call of the group gets a storage error.
enum GroupFailure {
    Apply(String),
    Flush(String),
}

/// The only writer of a core's database, on a thread of its own: runs the calls queued
/// in groups, each group applied with one batch and made durable with one flush before
/// any of its calls is answered (see the module doc).
struct Writer {
    kind: Kind,
    db: sled::Db,
    /// Writes were applied that no successful flush covers yet (a flush failed): the next
    /// group flushes, even one of nothing but replays.
    unflushed: bool,
}

impl Writer {
    /// Runs groups until every sender is gone and the queue is empty.
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut group = Vec::new();
        while let Some(job) = rx.blocking_recv() {
            group.push(job);
            while group.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            self.commit(std::mem::take(&mut group));
        }
    }

    /// Runs the calls of `group` in order, makes their writes durable, then answers them.
    fn commit(&mut self, group: Vec<Job>) {
        let mut writes = Writes::new();
        let mut ran = Vec::with_capacity(group.len());
        for job in group {
            let outcome = self.apply(job.method, &job.key, job.op, &mut writes);
            ran.push((job.method, job.key, job.reply, outcome));
        }
        let failure = self.persist(writes, ran.len());
        for (method, key, reply, outcome) in ran {
            let (outcome, line) = match (&failure, outcome) {
                (Some(GroupFailure::Apply(e)), _) => {
                    let status = storage_status(e);
                    let line = Line::Failed(status.message().to_owned());
                    (Err(status), line)
                }
                (Some(GroupFailure::Flush(e)), _) => {
                    (Err(storage_status(e)), Line::FlushFailed(e.clone()))
                }
                (None, Ok((stored, replayed))) => {
                    let line = Line::Done {
                        replayed,
                        code: Code::from_i32(stored.code),
                        message: stored.message.clone(),
                    };
                    (Ok(stored), line)
                }
                (None, Err(status)) => {
                    let line = Line::Failed(status.message().to_owned());
                    (Err(status), line)
                }
            };
            let log = CallLog {
                kind: self.kind,
                method,
                key,
                line,
            };
            // A caller that has gone no longer needs the answer; its line is logged here.
            let _ = reply.send(Answer { outcome, log });
        }
    }

    /// One call of a group: the key's first result if it has one (in the group's writes or
    /// the tree), else `op`, whose writes (with its result under `r/<key>`) join the
    /// group's, unless it failed on storage. Returns the result and whether it is a replay.
    fn apply(
        &self,
        method: &'static str,
        key: &str,
        op: Op,
        writes: &mut Writes,
    ) -> Result<(StoredResult, bool), Status> {
        let result_key = result_key(key);
        let first = match writes.get(&result_key) {
            Some(bytes) => Some(StoredResult::decode(bytes.as_slice())),
            None => self
                .db
                .get(&result_key)
                .map_err(storage_status)?
                .map(|bytes| StoredResult::decode(bytes.as_ref())),
        };
        if let Some(stored) = first {
            let stored = stored.map_err(storage_status)?;
            if stored.method != method {
                return Err(Status::invalid_argument(format!(
                    "idempotency-key {key} was first used with {}, not {method}",
                    stored.method
                )));
            }
            return Ok((stored, true));
        }
        let mut txn = Txn::new(&self.db, key, writes);
        // A panic fails this call, not the writer (and with it every later call).
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| op(&mut txn)));
        let mut own = txn.writes;
        let stored = match ran {
            Ok(Ok(response)) => StoredResult {
                method: method.to_owned(),
                code: Code::Ok as i32,
                message: String::new(),
                response,
            },
            Ok(Err(CallError::Rejected(status))) => StoredResult {
                method: method.to_owned(),
                code: status.code() as i32,
                message: status.message().to_owned(),
                response: Vec::new(),
            },
            Ok(Err(CallError::Storage(e))) => return Err(storage_status(e)),
            Err(panic) => {
                return Err(Status::internal(format!(
                    "the call panicked: {}",
                    panic_message(&*panic)
                )));
            }
        };
        own.insert(result_key, stored.encode_to_vec());
        writes.extend(own);
        Ok((stored, false))
    }

    /// Applies the group's writes with one batch and flushes (also when the group wrote
    /// nothing but an earlier flush failed). `calls`: the size of the group, for the log.
    fn persist(&mut self, writes: Writes, calls: usize) -> Option<GroupFailure> {
        if !writes.is_empty() {
            let mut batch = sled::Batch::default();
            for (key, value) in writes {
                batch.insert(key, value);
            }
            if let Err(e) = self.db.apply_batch(batch) {
                error!(participant = %self.kind, calls, error = %e, "cannot apply the writes of a group of calls");
                // Part of the batch may be in the tree: nothing is answered from it before a
                // flush covers it.
                self.unflushed = true;
                return Some(GroupFailure::Apply(e.to_string()));
            }
            self.unflushed = true;
        }
        if self.unflushed {
            // Blocking, on this thread: not sled's flush_async (see `Core::flush`).
            if let Err(e) = self.db.flush() {
                error!(participant = %self.kind, calls, error = %e, "cannot flush a group of calls");
                return Some(GroupFailure::Flush(e.to_string()));
            }
            self.unflushed = false;
        }
        None
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// One participant's state. The services share it through an `Arc`; the server waits for
/// the last reference to drop (the database closes with it) before it reports closed.
/// Dropping it lets the writer finish the calls already queued, and waits for it.
pub(crate) struct Core {
    kind: Kind,
    db: sled::Db,
    /// Where mutating calls go; taken (closing the channel) when the core is dropped.
    writer_tx: Option<mpsc::UnboundedSender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    faults: Arc<Faults>,
    // Declared last, so dropped after `db`: its receiver fires once the database is closed.
    _closed: oneshot::Sender<()>,
}

impl Drop for Core {
    fn drop(&mut self) {
        // Closing the channel ends the writer's loop once the calls queued are done;
        // joining it releases its handle on the database before ours (and `_closed`) goes.
        self.writer_tx.take();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            error!(participant = %self.kind, "the writer thread panicked");
        }
    }
}

impl Core {
    /// Opens (creating if needed) the database at `data_dir` and starts its writer. The
    /// receiver resolves (with an error) once the returned core and its database are
    /// dropped.
    pub(crate) fn open(
        kind: Kind,
        data_dir: &Path,
        faults: Arc<Faults>,
    ) -> Result<(Arc<Core>, oneshot::Receiver<()>), ParticipantError> {
        std::fs::create_dir_all(data_dir).map_err(|source| ParticipantError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let db = open_db(data_dir)?;
        let (writer_tx, writer_rx) = mpsc::unbounded_channel();
        let writer = Writer {
            kind,
            db: db.clone(),
            unflushed: false,
        };
        let writer = std::thread::Builder::new()
            .name("participant-writer".into())
            .spawn(move || writer.run(writer_rx))?;
        let (closed_tx, closed_rx) = oneshot::channel();
        let core = Core {
            kind,
            db,
            writer_tx: Some(writer_tx),
            writer: Some(writer),
            faults,
            _closed: closed_tx,
        };
        Ok((Arc::new(core), closed_rx))
    }

    /// Makes everything written so far durable. Every call answered is durable already
    /// (the writer flushes before it answers); this covers the rest.
    ///
    /// Not `sled::Db::flush_async`: it runs the flush on sled's small shared thread pool,
    /// where it holds sled's process-wide concurrency-control read lock while it waits for
    /// the log buffer write, a job queued on that same pool. With a batch or transaction
    /// waiting for the write lock, the other pooled flushes block on the read lock, no pool
    /// thread is left for the buffer write, and everything stops (seen with 64 sagas in
    /// flight). A blocking flush on tokio's blocking pool leaves sled's pool free.
    pub(crate) async fn flush(&self) -> Result<(), ParticipantError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush()).await??;
        Ok(())
    }

    /// Counts the call, waits for an injected delay and fails with an injected fault.
    async fn admit(&self, method: &str) -> Result<(), Status> {
        let delay = self.faults.begin_call(method);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(code) = self.faults.take_failure(method) {
            warn!(participant = %self.kind, method, code = ?code, "injected fault");
            return Err(Status::new(code, format!("injected fault on {method}")));
        }
        Ok(())
    }

    /// Serves a mutating call: faults, the idempotency key, then `op` applied at most once
    /// per key, by the writer. The first result of the key is replayed on every repeat.
    /// Returns once the result is durable (with an injected lost reply, UNAVAILABLE instead
    /// of that result).
    pub(crate) async fn mutate<T, R, F>(
        self: &Arc<Self>,
        method: &'static str,
        request: Request<T>,
        op: F,
    ) -> Result<Response<R>, Status>
    where
        T: Send + 'static,
        R: Message + Default + 'static,
        F: FnOnce(T, &mut Txn<'_>) -> Result<R, CallError> + Send + 'static,
    {
        self.admit(method).await?;
        let key = match idempotency_key(request.metadata()) {
            Some(key) => key,
            None => {
                warn!(participant = %self.kind, method, "missing idempotency-key metadata");
                return Err(Status::invalid_argument("missing idempotency-key metadata"));
            }
        };
        let message = request.into_inner();
        // Decided on arrival, so "the next n calls" are the next n that get this far.
        let lose_reply = self.faults.take_lost_reply(method);
        let (reply, answer) = oneshot::channel();
        let job = Job {
            method,
            key,
            op: Box::new(move |txn: &mut Txn<'_>| {
                op(message, txn).map(|response| response.encode_to_vec())
            }),
            reply,
        };
        // Once queued, the call is the writer's: a caller that gives up cannot interrupt
        // the apply and flush.
        let queued = self
            .writer_tx
            .as_ref()
            .is_some_and(|tx| tx.send(job).is_ok());
        let answer = if queued { answer.await.ok() } else { None };
        let Some(Answer { outcome, log }) = answer else {
            error!(participant = %self.kind, method, "the writer has stopped");
            return Err(storage_status("the writer has stopped"));
        };
        drop(log);
        let stored = outcome?;
        if lose_reply {
            // The result is recorded and durable; only this reply goes missing.
            warn!(participant = %self.kind, method, "injected lost reply");
            return Err(Status::unavailable(
                "reply lost after the effect was applied (injected)",
            ));
        }
        if stored.code != Code::Ok as i32 {
            return Err(Status::new(Code::from_i32(stored.code), stored.message));
        }
        R::decode(stored.response.as_slice())
            .map(Response::new)
            .map_err(|e| Status::internal(format!("corrupt stored response: {e}")))
    }

    /// Serves `ListLedger`: every entry in seq order.
    pub(crate) async fn list_ledger(&self) -> Result<Response<ListLedgerResponse>, Status> {
        const METHOD: &str = "ListLedger";
        self.admit(METHOD).await?;
        let entries = self.ledger().map_err(|e| {
            error!(participant = %self.kind, method = METHOD, error = %e, "cannot read the ledger");
            storage_status(e)
        })?;
        info!(participant = %self.kind, method = METHOD, entries = entries.len(), "call");
        Ok(Response::new(ListLedgerResponse { entries }))
    }

    /// How many entries the ledger holds: its counter, one read.
    pub(crate) fn ledger_entries(&self) -> Result<u64, ParticipantError> {
        match self.db.get(format!("c/{LEDGER_COUNTER}"))? {
            None => Ok(0),
            Some(bytes) => decode_u64(&bytes)
                .ok_or_else(|| ParticipantError::Corrupt("the ledger counter".to_owned())),
        }
    }

    fn ledger(&self) -> Result<Vec<LedgerEntry>, ParticipantError> {
        self.db
            .scan_prefix(b"l/")
            .values()
            .map(|value| {
                let value = value?;
                LedgerEntry::decode(value.as_ref())
                    .map_err(|e| ParticipantError::Corrupt(format!("ledger entry: {e}")))
            })
            .collect()
    }
}

fn idempotency_key(metadata: &MetadataMap) -> Option<String> {
    let key = metadata.get(IDEMPOTENCY_KEY)?.to_str().ok()?.trim();
    (!key.is_empty()).then(|| key.to_owned())
}

/// Opens a participant's sled database. A database just closed in this process may hold its
/// file lock a moment longer (sled's flusher thread exits after the handle is dropped), so
/// a lock conflict is retried for up to 2 s.
pub(crate) fn open_db(data_dir: &Path) -> Result<sled::Db, ParticipantError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        // Every write is flushed explicitly (the writer's group commit, the notifier's
        // cursor): no background flush thread.
        match sled::Config::new()
            .path(data_dir)
            .flush_every_ms(None)
            .open()
        {
            Err(sled::Error::Io(io))
                if (io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("lock"))
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            opened => return Ok(opened?),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use proto::participant::v1::ListLedgerRequest;
    use proto::payment::v1::payment_server::Payment;
    use proto::payment::v1::{AuthorizeChargeRequest, VoidChargeRequest};

    use super::*;
    use crate::payment::{DECLINED_CARD, PaymentService};

    fn with_key<T>(key: &str, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert(IDEMPOTENCY_KEY, key.parse().unwrap());
        request
    }

    /// Order `i`: declined for every tenth, else authorized.
    fn authorize(i: usize) -> Request<AuthorizeChargeRequest> {
        let card = if i.is_multiple_of(10) {
            DECLINED_CARD
        } else {
            "tok_visa"
        };
        with_key(
            &format!("o-{i}/action"),
            AuthorizeChargeRequest {
                order_id: format!("o-{i}"),
                customer_id: format!("c-{i}"),
                amount_cents: 100 + i as i64,
                card: card.to_owned(),
            },
        )
    }

    type Outcome = Result<String, (Code, String)>;

    /// Authorizes every order of `orders` at once; returns each call's order and outcome
    /// (the authorization id, or the error).
    async fn authorize_all(
        service: &Arc<PaymentService>,
        orders: &[usize],
    ) -> Vec<(usize, Outcome)> {
        let calls: Vec<_> = orders
            .iter()
            .map(|&i| {
                let service = Arc::clone(service);
                tokio::spawn(async move {
                    let outcome = match service.authorize_charge(authorize(i)).await {
                        Ok(response) => Ok(response.into_inner().authorization_id),
                        Err(status) => Err((status.code(), status.message().to_owned())),
                    };
                    (i, outcome)
                })
            })
            .collect();
        let mut outcomes = Vec::with_capacity(calls.len());
        for call in calls {
            outcomes.push(call.await.unwrap());
        }
        outcomes
    }

    /// The single outcome of every order, checking that all calls of an order had it.
    fn outcome_by_order(outcomes: &[(usize, Outcome)]) -> HashMap<usize, Outcome> {
        let mut by_order = HashMap::new();
        for (i, outcome) in outcomes {
            let first = by_order.entry(*i).or_insert_with(|| outcome.clone());
            assert_eq!(first, outcome, "order {i}: a repeat got another result");
        }
        by_order
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_calls_apply_each_key_once_and_survive_a_reopen() {
        const ORDERS: usize = 150;
        let dir = tempfile::tempdir().unwrap();
        let (core, closed) =
            Core::open(Kind::Payment, dir.path(), Arc::new(Faults::default())).unwrap();
        let service = Arc::new(PaymentService::new(Arc::clone(&core)));

        // 200 calls: every order once, every third twice in a row (likely the same group).
        let mut orders = Vec::new();
        for i in 0..ORDERS {
            orders.push(i);
            if i.is_multiple_of(3) {
                orders.push(i);
            }
        }
        assert_eq!(orders.len(), 200);
        let outcomes = authorize_all(&service, &orders).await;
        let first = outcome_by_order(&outcomes);
        assert_eq!(first.len(), ORDERS);

        let mut authorizations = BTreeSet::new();
        for (i, outcome) in &first {
            match outcome {
                Ok(id) => {
                    assert!(!i.is_multiple_of(10), "order {i} should be declined");
                    assert!(authorizations.insert(id.clone()), "{id} given twice");
                }
                Err((code, message)) => {
                    assert!(i.is_multiple_of(10), "order {i}: {code:?} {message}");
                    assert_eq!(*code, Code::FailedPrecondition);
                    assert_eq!(message, "card declined");
                }
            }
        }
        let authorized = ORDERS - ORDERS.div_ceil(10);
        assert_eq!(authorizations.len(), authorized);
        // Ids come from one counter, read through the writes of earlier calls of the group.
        let expected: BTreeSet<String> = (1..=authorized).map(|n| format!("auth-{n}")).collect();
        assert_eq!(authorizations, expected);

        // One ledger entry per authorized key, seqs without gaps.
        assert_eq!(core.ledger_entries().unwrap(), authorized as u64);
        let ledger = service
            .list_ledger(Request::new(ListLedgerRequest {}))
            .await
            .unwrap()
            .into_inner()
            .entries;
        assert_eq!(
            ledger.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=authorized as u64).collect::<Vec<_>>()
        );
        let keys: BTreeSet<&str> = ledger.iter().map(|e| e.idempotency_key.as_str()).collect();
        assert_eq!(keys.len(), authorized);
        for entry in &ledger {
            let i: usize = entry.order_id.trim_start_matches("o-").parse().unwrap();
            assert_eq!(entry.idempotency_key, format!("o-{i}/action"));
            assert_eq!(first[&i], Ok(entry.reference.clone()));
        }

        // A key is bound to its first method.
        let err = service
            .void_charge(with_key(
                "o-1/action",
                VoidChargeRequest {
                    order_id: "o-1".to_owned(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

        // Closed, then reopened: every first result is still there, and nothing reapplies.
        drop(service);
        drop(core);
        assert!(closed.await.is_err());
        let (core, closed) =
            Core::open(Kind::Payment, dir.path(), Arc::new(Faults::default())).unwrap();
        assert_eq!(core.ledger_entries().unwrap(), authorized as u64);
        let service = Arc::new(PaymentService::new(Arc::clone(&core)));
        let all: Vec<usize> = (0..ORDERS).collect();
        let again = outcome_by_order(&authorize_all(&service, &all).await);
        assert_eq!(again, first);
        assert_eq!(core.ledger_entries().unwrap(), authorized as u64);
        drop(service);
        drop(core);
        assert!(closed.await.is_err());
    }

    /// A job for [`Writer::commit`] and the receiver of its answer.
    fn job(
        method: &'static str,
        key: &str,
        op: impl FnOnce(&mut Txn<'_>) -> Result<Vec<u8>, CallError> + Send + 'static,
    ) -> (Job, oneshot::Receiver<Answer>) {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            method,
            key: key.to_owned(),
            op: Box::new(op),
            reply,
        };
        (job, answer)
    }

    /// Takes the next id of counter "x", and returns it.
    fn next_x(txn: &mut Txn<'_>) -> Result<Vec<u8>, CallError> {
        Ok(txn.next_id("x")?.to_be_bytes().to_vec())
    }

    fn answer(mut answer: oneshot::Receiver<Answer>) -> Result<(i32, String, Vec<u8>), Code> {
        let Answer { outcome, log } = answer.try_recv().unwrap();
        drop(log);
        outcome
            .map(|s| (s.code, s.message, s.response))
            .map_err(|status| status.code())
    }

    #[test]
    fn a_group_runs_its_calls_in_order_and_keeps_only_what_did_not_fail() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path()).unwrap();
        let mut writer = Writer {
            kind: Kind::Payment,
            db: db.clone(),
            unflushed: false,
        };
        let (a, a_answer) = job("M", "a", next_x);
        // Same key, same group: a replay of a's result, not applied again.
        let (a_again, a_again_answer) = job("M", "a", |_| panic!("a is applied once"));
        let (broken, broken_answer) = job("M", "broken", |txn| {
            next_x(txn)?;
            Err(CallError::Storage("disk on fire".to_owned()))
        });
        let (panics, panics_answer) = job("M", "panics", |txn| {
            next_x(txn)?;
            panic!("a bug");
        });
        let (refused_call, refused_answer) = job("M", "refused", |txn| {
            next_x(txn)?;
            Err(refused("no"))
        });
        let (b, b_answer) = job("M", "b", next_x);
        writer.commit(vec![a, a_again, broken, panics, refused_call, b]);

        let one = 1u64.to_be_bytes().to_vec();
        assert_eq!(answer(a_answer), Ok((0, String::new(), one.clone())));
        assert_eq!(answer(a_again_answer), Ok((0, String::new(), one)));
        assert_eq!(answer(broken_answer), Err(Code::Internal));
        assert_eq!(answer(panics_answer), Err(Code::Internal));
        // A rejection is a result, and keeps the writes made before it.
        let rejected = Ok((Code::FailedPrecondition as i32, "no".to_owned(), vec![]));
        assert_eq!(answer(refused_answer), rejected);
        assert_eq!(
            answer(b_answer),
            Ok((0, String::new(), 3u64.to_be_bytes().to_vec()))
        );
        assert_eq!(
            db.get("c/x").unwrap().unwrap().as_ref(),
            3u64.to_be_bytes().as_slice()
        );
        assert!(db.get(result_key("broken")).unwrap().is_none());
        assert!(db.get(result_key("panics")).unwrap().is_none());

        // Later groups replay from the tree; another method is refused; a failed key can
        // be retried.
        let (refused_again, refused_again_answer) = job("M", "refused", |_| panic!("replayed"));
        let (other_method, other_method_answer) = job("N", "a", |_| panic!("refused"));
        let (broken_retry, broken_retry_answer) = job("M", "broken", next_x);
        writer.commit(vec![refused_again, other_method, broken_retry]);
        assert_eq!(answer(refused_again_answer), rejected);
        assert_eq!(answer(other_method_answer), Err(Code::InvalidArgument));
        assert_eq!(
            answer(broken_retry_answer),
            Ok((0, String::new(), 4u64.to_be_bytes().to_vec()))
        );
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_does_not_stop_its_call() {
        let dir = tempfile::tempdir().unwrap();
        let (core, closed) =
            Core::open(Kind::Payment, dir.path(), Arc::new(Faults::default())).unwrap();
        let service = PaymentService::new(Arc::clone(&core));
        // Polled once: far enough to queue the call, then dropped.
        {
            let call = service.authorize_charge(authorize(1));
            tokio::pin!(call);
            let _ = poll_once(call.as_mut()).await;
        }
        drop(service);
        drop(core);
        assert!(closed.await.is_err());
        let (core, closed) =
            Core::open(Kind::Payment, dir.path(), Arc::new(Faults::default())).unwrap();
        assert_eq!(core.ledger_entries().unwrap(), 1);
        drop(core);
        assert!(closed.await.is_err());
    }

    /// Polls `future` once.
    async fn poll_once<F: std::future::Future + Unpin>(mut future: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
                std::task::Poll::Ready(output) => Some(output),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
