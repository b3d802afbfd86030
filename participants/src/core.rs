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
//! A call's writes are gathered in a [`Txn`] and applied with one atomic batch while the
//! apply lock is held, then made durable with a flush after the lock is released.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use prost::Message;
use proto::participant::v1::{LedgerEntry, ListLedgerResponse};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
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

/// The writes of one call, applied atomically by [`Txn::commit`]. Reads see the call's own
/// writes; the apply lock guarantees nobody else writes meanwhile.
pub(crate) struct Txn<'a> {
    tree: &'a sled::Tree,
    key: &'a str,
    writes: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl<'a> Txn<'a> {
    fn new(tree: &'a sled::Tree, key: &'a str) -> Self {
        Txn {
            tree,
            key,
            writes: BTreeMap::new(),
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CallError> {
        if let Some(value) = self.writes.get(key) {
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

    fn commit(self) -> Result<(), sled::Error> {
        let mut batch = sled::Batch::default();
        for (key, value) in self.writes {
            batch.insert(key, value);
        }
        self.tree.apply_batch(batch)
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

/// One participant's state. The services share it through an `Arc`; the server waits for
/// the last reference to drop (the database closes with it) before it reports closed.
pub(crate) struct Core {
    kind: Kind,
    db: sled::Db,
    /// Serializes the check-and-apply section of mutating calls (synchronous sled work).
    apply: Mutex<()>,
    faults: Arc<Faults>,
    // Declared last, so dropped after `db`: its receiver fires once the database is closed.
    _closed: oneshot::Sender<()>,
}

impl Core {
    /// Opens (creating if needed) the database at `data_dir`. The receiver resolves (with an
    /// error) once the returned core and its database are dropped.
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
        let (closed_tx, closed_rx) = oneshot::channel();
        let core = Core {
            kind,
            db,
            apply: Mutex::new(()),
            faults,
            _closed: closed_tx,
        };
        Ok((Arc::new(core), closed_rx))
    }

    /// Makes everything written so far durable.
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
    /// per key. The first result of the key is replayed on every repeat. Returns once the
    /// result is durable (with an injected lost reply, UNAVAILABLE instead of that result).
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
        // A task of its own: a caller that gives up cannot interrupt the apply and flush,
        // and the core (with its database) stays referenced until they are done.
        let core = Arc::clone(self);
        let task = tokio::spawn(async move { core.apply_durably(method, key, message, op).await });
        let stored = task
            .await
            .map_err(|e| Status::internal(format!("call task failed: {e}")))??;
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

    async fn apply_durably<T, R, F>(
        &self,
        method: &'static str,
        key: String,
        message: T,
        op: F,
    ) -> Result<StoredResult, Status>
    where
        R: Message,
        F: FnOnce(T, &mut Txn<'_>) -> Result<R, CallError>,
    {
        let applied = {
            let _guard = self.apply.lock().unwrap_or_else(PoisonError::into_inner);
            self.apply_locked(method, &key, message, op)
        };
        let (stored, replayed) = match applied {
            Ok(applied) => applied,
            Err(status) => {
                error!(participant = %self.kind, method, idempotency_key = %key, error = %status.message(), "call failed");
                return Err(status);
            }
        };
        // Also for a replay: the first call may still be flushing the result it recorded.
        if let Err(e) = self.flush().await {
            error!(participant = %self.kind, method, idempotency_key = %key, error = %e, "flush failed");
            return Err(storage_status(e));
        }
        let code = Code::from_i32(stored.code);
        if code == Code::Ok {
            info!(participant = %self.kind, method, idempotency_key = %key, replayed, outcome = "ok", "call");
        } else {
            info!(participant = %self.kind, method, idempotency_key = %key, replayed, outcome = ?code, message = %stored.message, "call");
        }
        Ok(stored)
    }

    fn apply_locked<T, R, F>(
        &self,
        method: &'static str,
        key: &str,
        message: T,
        op: F,
    ) -> Result<(StoredResult, bool), Status>
    where
        R: Message,
        F: FnOnce(T, &mut Txn<'_>) -> Result<R, CallError>,
    {
        let result_key = result_key(key);
        if let Some(bytes) = self.db.get(&result_key).map_err(storage_status)? {
            let stored = StoredResult::decode(bytes.as_ref()).map_err(storage_status)?;
            if stored.method != method {
                return Err(Status::invalid_argument(format!(
                    "idempotency-key {key} was first used with {}, not {method}",
                    stored.method
                )));
            }
            return Ok((stored, true));
        }
        let mut txn = Txn::new(&self.db, key);
        let stored = match op(message, &mut txn) {
            Ok(response) => StoredResult {
                method: method.to_owned(),
                code: Code::Ok as i32,
                message: String::new(),
                response: response.encode_to_vec(),
            },
            Err(CallError::Rejected(status)) => StoredResult {
                method: method.to_owned(),
                code: status.code() as i32,
                message: status.message().to_owned(),
                response: Vec::new(),
            },
            Err(CallError::Storage(e)) => return Err(storage_status(e)),
        };
        txn.put(result_key, stored.encode_to_vec());
        txn.commit().map_err(storage_status)?;
        Ok((stored, false))
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
        match sled::Config::new().path(data_dir).open() {
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
