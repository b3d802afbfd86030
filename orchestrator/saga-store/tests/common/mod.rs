//! Helpers shared by the store's test files.
#![allow(dead_code)] // each test binary uses some of them

use saga_engine::{Event, EventKind, SagaStatus};
use saga_store::{NewSaga, Summary};
use serde_json::json;

/// A plausible "now" for creation times.
pub const BASE_MS: u64 = 1_700_000_000_000;

/// A running saga's summary after its first event.
pub fn summary(id: &str, definition: &str, created_at_ms: u64) -> Summary {
    Summary {
        saga_id: id.to_owned(),
        definition: definition.to_owned(),
        version: 1,
        status: SagaStatus::Running,
        business_status: "placed".into(),
        idempotency_key: format!("key-{id}"),
        request_digest: "d".into(),
        created_at_ms,
        updated_at_ms: created_at_ms,
        last_seq: 1,
    }
}

/// The create of the saga `summary` describes.
pub fn new_saga(summary: &Summary) -> NewSaga {
    NewSaga::started(
        summary.clone(),
        Event {
            seq: 1,
            at_ms: summary.created_at_ms,
            kind: EventKind::SagaStarted {
                saga_id: summary.saga_id.clone(),
                definition: summary.definition.clone(),
                version: summary.version,
                input: json!({"order": 1}),
                idempotency_key: summary.idempotency_key.clone(),
                trace: None,
            },
        },
    )
}

/// One more event for the saga `summary` describes, and its summary after it.
pub fn step(summary: &Summary, status: SagaStatus, business_status: &str) -> (Vec<Event>, Summary) {
    let seq = summary.last_seq + 1;
    let at_ms = summary.updated_at_ms + 1;
    let kind = match status {
        SagaStatus::Completed => EventKind::SagaCompleted,
        SagaStatus::Compensated => EventKind::SagaCompensated,
        SagaStatus::Failed => EventKind::SagaFailed {
            reason: "test".into(),
        },
        _ => EventKind::CancelRequested {
            reason: "test".into(),
        },
    };
    let next = Summary {
        status,
        business_status: business_status.to_owned(),
        updated_at_ms: at_ms,
        last_seq: seq,
        ..summary.clone()
    };
    (vec![Event { seq, at_ms, kind }], next)
}
