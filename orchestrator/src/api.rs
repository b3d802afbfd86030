//! The `saga.v1.SagaOrchestrator` gRPC service: request checks and conversions around the
//! runtime. Errors become statuses in one place, [`crate::error`].

use std::pin::Pin;

use futures::Stream;
use saga_engine::{Plan, Saga, SagaStatus};
use saga_store::ListFilter;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use proto::saga::v1 as pb;
use proto::saga::v1::saga_orchestrator_server::SagaOrchestrator;

use crate::convert;
use crate::error::Error;
use crate::runtime::{Published, Runtime};

/// Page size when the request gives none, and the largest allowed.
pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 1000;

#[derive(Debug, Clone)]
pub struct Api {
    runtime: Runtime,
}

impl Api {
    pub fn new(runtime: Runtime) -> Api {
        Api { runtime }
    }
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Error> {
    let value = value.trim();
    if value.is_empty() {
        Err(Error::InvalidArgument(format!("{field}: required")))
    } else {
        Ok(value)
    }
}

fn definition_message(plan: &Plan) -> pb::Definition {
    pb::Definition {
        name: plan.name.clone(),
        version: plan.version,
        yaml: plan.yaml.clone(),
        steps: plan.steps.iter().map(|s| s.name.clone()).collect(),
        participants: plan.participants.keys().cloned().collect(),
        signals: plan.signals().into_iter().map(str::to_owned).collect(),
    }
}

/// Milliseconds since the epoch of a request's timestamp; `field` names it in errors.
fn millis(timestamp: Option<&prost_types::Timestamp>, field: &str) -> Result<Option<u64>, Error> {
    let Some(t) = timestamp else {
        return Ok(None);
    };
    if t.seconds < 0 || !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Error::InvalidArgument(format!(
            "{field}: {}s {}ns is not a time after 1970",
            t.seconds, t.nanos
        )));
    }
    Ok(Some(t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::SagaEvent, Status>> + Send>>;
type ChangeStream = Pin<Box<dyn Stream<Item = Result<pb::SagaChange, Status>> + Send>>;

/// Which changes a WatchSagas stream sends.
#[derive(Debug, Clone)]
struct ChangeFilter {
    status: Option<SagaStatus>,
    definition: Option<String>,
}

impl ChangeFilter {
    fn matches(&self, change: &saga_store::Change) -> bool {
        self.status.is_none_or(|s| s == change.status)
            && self
                .definition
                .as_ref()
                .is_none_or(|d| *d == change.definition)
    }
}

/// Changes read from the store's durable feed, after `cursor`: first those already stored,
/// then each batch as its flush completes. Reading the feed (rather than the runtime's live
/// events) is what makes a resumed stream exact: nothing is lost or sent twice.
async fn watch_changes(
    runtime: Runtime,
    filter: ChangeFilter,
    mut cursor: u64,
    tx: mpsc::Sender<Result<pb::SagaChange, Status>>,
) {
    /// Changes read from the store at a time.
    const PAGE: usize = 512;
    let store = runtime.store().clone();
    let mut durable = store.watch_changes();
    loop {
        // Mark the current position seen before reading, so a flush during the read wakes
        // the wait below.
        durable.borrow_and_update();
        let page = match store.changes(cursor, PAGE) {
            Ok(page) => page,
            Err(e) => {
                let _ = tx.send(Err(Error::from(e).into())).await;
                return;
            }
        };
        if page.is_empty() {
            tokio::select! {
                changed = durable.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
                // The stream ends; the client resumes from its cursor after the restart.
                () = runtime.shutting_down() => return,
            }
            continue;
        }
        for change in page {
            cursor = change.cursor;
            if filter.matches(&change) && tx.send(Ok(convert::change(&change))).await.is_err() {
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl SagaOrchestrator for Api {
    async fn start_saga(
        &self,
        request: Request<pb::StartSagaRequest>,
    ) -> Result<Response<pb::StartSagaResponse>, Status> {
        let request = request.into_inner();
        let definition = required(&request.definition, "definition")?;
        let input = request
            .input
            .as_ref()
            .map_or_else(|| json!({}), convert::struct_to_json);
        let (saga_id, created, version) = self
            .runtime
            .start_saga(definition, request.version, input, &request.idempotency_key)
            .await?;
        // Crash point: the saga is durable, the client has no answer yet.
        fail::fail_point!("api::after_start_before_reply", |_| saga_store::crash(
            "api::after_start_before_reply"
        ));
        Ok(Response::new(pb::StartSagaResponse {
            saga_id,
            created,
            version,
        }))
    }

    async fn get_saga(
        &self,
        request: Request<pb::GetSagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let request = request.into_inner();
        let saga_id = required(&request.saga_id, "saga_id")?;
        let (plan, saga) = self.runtime.get(saga_id)?;
        Ok(Response::new(convert::saga(
            &plan,
            &saga,
            crate::runtime::now_ms(),
        )))
    }

    async fn list_sagas(
        &self,
        request: Request<pb::ListSagasRequest>,
    ) -> Result<Response<pb::ListSagasResponse>, Status> {
        let request = request.into_inner();
        let status = pb::SagaStatus::try_from(request.status).map_err(|_| {
            Error::InvalidArgument(format!("status: unknown value {}", request.status))
        })?;
        let limit = match request.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(Error::InvalidArgument(format!(
                    "page_size: {n} is over the limit of {MAX_PAGE_SIZE}"
                ))
                .into());
            }
            n => n,
        };
        let created_from_ms = millis(request.created_after.as_ref(), "created_after")?;
        let created_to_ms = millis(request.created_before.as_ref(), "created_before")?;
        if let (Some(from), Some(to)) = (created_from_ms, created_to_ms)
            && to <= from
        {
            return Err(Error::InvalidArgument(
                "created_before: must be later than created_after".into(),
            )
            .into());
        }
        let filter = ListFilter {
            status: convert::saga_status_from_pb(status),
            definition: Some(request.definition.trim().to_owned()).filter(|d| !d.is_empty()),
            created_from_ms,
            created_to_ms,
        };
        let after = Some(request.page_token.as_str()).filter(|t| !t.is_empty());
        let sagas = self.runtime.list(&filter, after, limit)?;
        let next_page_token = if sagas.len() == limit {
            sagas.last().map(saga_store::page_token).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListSagasResponse {
            sagas: sagas.iter().map(convert::summary).collect(),
            next_page_token,
        }))
    }

    type WatchSagaStream = EventStream;

    async fn watch_saga(
        &self,
        request: Request<pb::WatchSagaRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let request = request.into_inner();
        let saga_id = required(&request.saga_id, "saga_id")?.to_owned();
        // Subscribe before reading the history so nothing falls between the two.
        let live = self.runtime.subscribe();
        let (plan, _) = self.runtime.get(&saga_id)?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(watch(self.runtime.clone(), plan, saga_id, live, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_saga(
        &self,
        request: Request<pb::CancelSagaRequest>,
    ) -> Result<Response<pb::CancelSagaResponse>, Status> {
        let request = request.into_inner();
        let saga_id = required(&request.saga_id, "saga_id")?;
        let status = self.runtime.cancel(saga_id, &request.reason).await?;
        Ok(Response::new(pb::CancelSagaResponse {
            status: convert::saga_status(status) as i32,
        }))
    }

    async fn signal_saga(
        &self,
        request: Request<pb::SignalSagaRequest>,
    ) -> Result<Response<pb::SignalSagaResponse>, Status> {
        let request = request.into_inner();
        let saga_id = required(&request.saga_id, "saga_id")?;
        let signal = required(&request.signal, "signal")?;
        let payload = request
            .payload
            .as_ref()
            .map_or_else(|| json!({}), convert::struct_to_json);
        let reply = self.runtime.signal(saga_id, signal, payload).await?;
        Ok(Response::new(pb::SignalSagaResponse {
            status: convert::saga_status(reply.status) as i32,
            step: reply.step,
            buffered: reply.buffered,
            duplicate: reply.duplicate,
        }))
    }

    type WatchSagasStream = ChangeStream;

    async fn watch_sagas(
        &self,
        request: Request<pb::WatchSagasRequest>,
    ) -> Result<Response<ChangeStream>, Status> {
        let request = request.into_inner();
        let status = pb::SagaStatus::try_from(request.status).map_err(|_| {
            Error::InvalidArgument(format!("status: unknown value {}", request.status))
        })?;
        let filter = ChangeFilter {
            status: convert::saga_status_from_pb(status),
            definition: Some(request.definition.trim().to_owned()).filter(|d| !d.is_empty()),
        };
        if let Some(definition) = &filter.definition {
            // An unknown name is a typo, not an empty feed.
            self.runtime.registry().get(definition, None)?;
        }
        self.runtime.store().health().map_err(Error::from)?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(watch_changes(
            self.runtime.clone(),
            filter,
            request.after_cursor,
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn put_definition(
        &self,
        request: Request<pb::PutDefinitionRequest>,
    ) -> Result<Response<pb::PutDefinitionResponse>, Status> {
        let request = request.into_inner();
        let (plan, created) = self
            .runtime
            .registry()
            .put("PutDefinition", &request.yaml, None)
            .await?;
        tracing::info!(saga.name = %plan.name, saga.version = plan.version, created, "definition stored");
        Ok(Response::new(pb::PutDefinitionResponse {
            name: plan.name.clone(),
            version: plan.version,
            created,
        }))
    }

    async fn get_definition(
        &self,
        request: Request<pb::GetDefinitionRequest>,
    ) -> Result<Response<pb::Definition>, Status> {
        let request = request.into_inner();
        let name = required(&request.name, "name")?;
        let version = Some(request.version).filter(|v| *v > 0);
        let plan = self.runtime.registry().get(name, version)?;
        Ok(Response::new(definition_message(&plan)))
    }

    async fn list_definitions(
        &self,
        _: Request<pb::ListDefinitionsRequest>,
    ) -> Result<Response<pb::ListDefinitionsResponse>, Status> {
        let definitions = self
            .runtime
            .registry()
            .list()
            .into_iter()
            .map(|(name, versions)| pb::DefinitionSummary {
                latest: versions.last().copied().unwrap_or(0),
                name,
                versions,
            })
            .collect();
        Ok(Response::new(pb::ListDefinitionsResponse { definitions }))
    }

    async fn list_circuit_breakers(
        &self,
        _: Request<pb::ListCircuitBreakersRequest>,
    ) -> Result<Response<pb::ListCircuitBreakersResponse>, Status> {
        let breakers = self
            .runtime
            .registry()
            .breakers()
            .all()
            .iter()
            .map(|b| crate::breakers::message(&b.snapshot()))
            .collect();
        Ok(Response::new(pb::ListCircuitBreakersResponse { breakers }))
    }

    async fn set_circuit_breaker(
        &self,
        request: Request<pb::SetCircuitBreakerRequest>,
    ) -> Result<Response<pb::CircuitBreaker>, Status> {
        let request = request.into_inner();
        let participant = required(&request.participant, "participant")?;
        let mode = pb::BreakerMode::try_from(request.mode)
            .ok()
            .and_then(crate::breakers::mode)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "mode: {} is not normal, forced_open or disabled",
                    request.mode
                ))
            })?;
        let breaker = self
            .runtime
            .registry()
            .breakers()
            .get(participant)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "participant `{participant}` has no circuit breaker"
                ))
            })?;
        breaker.set_mode(mode);
        tracing::warn!(
            participant,
            ?mode,
            "circuit breaker mode set by an operator"
        );
        Ok(Response::new(crate::breakers::message(&breaker.snapshot())))
    }
}

/// Streams a saga's history, then its live events, until it is terminal.
async fn watch(
    runtime: Runtime,
    plan: std::sync::Arc<Plan>,
    saga_id: String,
    mut live: broadcast::Receiver<Published>,
    tx: mpsc::Sender<Result<pb::SagaEvent, Status>>,
) {
    let mut last_seq = 0;
    let mut status = SagaStatus::Running;
    if !catch_up(&runtime, &plan, &saga_id, &mut last_seq, &mut status, &tx).await
        || status.is_terminal()
    {
        return;
    }
    loop {
        tokio::select! {
            received = live.recv() => match received {
                Ok(published) if *published.saga_id == *saga_id => {
                    if published.event.seq <= last_seq {
                        continue;
                    }
                    if published.event.seq > last_seq + 1 {
                        // Missed something: read it from the store.
                        if !catch_up(&runtime, &plan, &saga_id, &mut last_seq, &mut status, &tx).await {
                            return;
                        }
                    } else {
                        last_seq = published.event.seq;
                        status = published.status;
                        if tx.send(Ok(convert::event(&saga_id, &published.event, status))).await.is_err() {
                            return;
                        }
                    }
                    if status.is_terminal() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if !catch_up(&runtime, &plan, &saga_id, &mut last_seq, &mut status, &tx).await || status.is_terminal() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = tx.closed() => return,
            () = runtime.shutting_down() => {
                let _ = tx.send(Err(Status::unavailable("the orchestrator is shutting down; watch again to resume"))).await;
                return;
            }
        }
    }
}

/// Sends the stored events after `last_seq`. False when the client went away.
async fn catch_up(
    runtime: &Runtime,
    plan: &Plan,
    saga_id: &str,
    last_seq: &mut u64,
    status: &mut SagaStatus,
    tx: &mpsc::Sender<Result<pb::SagaEvent, Status>>,
) -> bool {
    let events = match runtime.store().events(saga_id) {
        Ok(Some(events)) => events,
        Ok(None) => {
            let _ = tx
                .send(Err(Error::UnknownSaga(saga_id.to_owned()).into()))
                .await;
            return false;
        }
        Err(e) => {
            let _ = tx.send(Err(Error::from(e).into())).await;
            return false;
        }
    };
    let mut state: Option<Saga> = None;
    for event in &events {
        let folded = match state.as_mut() {
            None => Saga::from_events(plan, [event]).map(|s| state.insert(s).status()),
            Some(saga) => saga.apply(plan, event).map(|()| saga.status()),
        };
        let Ok(after) = folded else {
            let _ = tx
                .send(Err(Error::Internal(format!(
                    "saga {saga_id}: log does not replay"
                ))
                .into()))
                .await;
            return false;
        };
        if event.seq > *last_seq {
            *last_seq = event.seq;
            *status = after;
            if tx
                .send(Ok(convert::event(saga_id, event, after)))
                .await
                .is_err()
            {
                return false;
            }
        }
    }
    true
}
