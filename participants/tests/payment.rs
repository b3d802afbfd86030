//! The payment participant over gRPC: authorizations, captures, their compensations and the
//! idempotency convention.

#![allow(clippy::unwrap_used)]

mod common;

use common::{keyed, payment, payment_ledger, start};
use participants::Kind;
use proto::payment::v1::{
    AuthorizeChargeRequest, CaptureChargeRequest, RefundChargeRequest, VoidChargeRequest,
};
use tonic::Code;

fn authorize(order: &str, amount: i64, card: &str) -> AuthorizeChargeRequest {
    AuthorizeChargeRequest {
        order_id: order.into(),
        customer_id: "c-1".into(),
        amount_cents: amount,
        card: card.into(),
    }
}

#[tokio::test]
async fn authorize_capture_and_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Payment, dir.path()).await;
    let mut client = payment(&handle).await;

    let auth = client
        .authorize_charge(keyed(
            authorize("o-1", 2500, "tok_visa"),
            "o-1/authorize/action",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(auth.authorization_id, "auth-1");
    assert_eq!(auth.amount_cents, 2500);

    let capture = client
        .capture_charge(keyed(
            CaptureChargeRequest {
                order_id: "o-1".into(),
                authorization_id: auth.authorization_id.clone(),
            },
            "o-1/capture/action",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(capture.capture_id, "cap-1");
    assert_eq!(capture.amount_cents, 2500);

    let ledger = payment_ledger(&mut client).await;
    assert_eq!(ledger.len(), 2);
    assert_eq!(ledger[0].seq, 1);
    assert_eq!(ledger[0].operation, "authorize");
    assert_eq!(ledger[0].idempotency_key, "o-1/authorize/action");
    assert_eq!(ledger[0].order_id, "o-1");
    assert_eq!(ledger[0].reference, "auth-1");
    assert!(!ledger[0].noop);
    assert!(ledger[0].at.is_some());
    assert_eq!(ledger[1].seq, 2);
    assert_eq!(ledger[1].operation, "capture");
    assert_eq!(ledger[1].reference, "cap-1");
    assert!(!ledger[1].noop);

    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_repeated_key_returns_the_first_result_and_applies_once() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Payment, dir.path()).await;
    let mut client = payment(&handle).await;

    let first = client
        .authorize_charge(keyed(
            authorize("o-1", 2500, "tok_visa"),
            "o-1/authorize/action",
        ))
        .await
        .unwrap()
        .into_inner();
    // Even with a different body, the repeat replays the first result.
    let second = client
        .authorize_charge(keyed(
            authorize("o-1", 9999, "tok_visa"),
            "o-1/authorize/action",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, second);
    assert_eq!(second.amount_cents, 2500);
    assert_eq!(payment_ledger(&mut client).await.len(), 1);
    assert_eq!(handle.faults.calls("AuthorizeCharge"), 2);

    handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_with_one_key_apply_once() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Payment, dir.path()).await;
    let client = payment(&handle).await;

    let calls = (0..16).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .authorize_charge(keyed(authorize("o-1", 100, "tok_visa"), "o-1/auth/action"))
                .await
                .unwrap()
                .into_inner()
        })
    });
    let mut ids = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        ids.push(call.await.unwrap().authorization_id);
    }
    assert!(ids.iter().all(|id| id == "auth-1"), "{ids:?}");
    assert_eq!(payment_ledger(&mut client.clone()).await.len(), 1);

    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn business_failures_are_recorded_as_the_first_result() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Payment, dir.path()).await;
    let mut client = payment(&handle).await;

    let declined = client
        .authorize_charge(keyed(
            authorize("o-1", 2500, "tok_declined"),
            "o-1/a/action",
        ))
        .await
        .unwrap_err();
    assert_eq!(declined.code(), Code::FailedPrecondition);
    assert_eq!(declined.message(), "card declined");
    // The repeat returns the same error even though the card would now pass.
    let repeat = client
        .authorize_charge(keyed(authorize("o-1", 2500, "tok_visa"), "o-1/a/action"))
        .await
        .unwrap_err();
    assert_eq!(repeat.code(), Code::FailedPrecondition);
    assert_eq!(repeat.message(), "card declined");

    let over = client
        .authorize_charge(keyed(authorize("o-2", 600_000, "tok_visa"), "o-2/a/action"))
        .await
        .unwrap_err();
    assert_eq!(over.code(), Code::FailedPrecondition);
    assert_eq!(
        over.message(),
        "amount 600000 exceeds the limit of 500000 cents"
    );

    let zero = client
        .authorize_charge(keyed(authorize("o-3", 0, "tok_visa"), "o-3/a/action"))
        .await
        .unwrap_err();
    assert_eq!(zero.code(), Code::InvalidArgument);
    let no_order = client
        .authorize_charge(keyed(authorize("", 100, "tok_visa"), "o-4/a/action"))
        .await
        .unwrap_err();
    assert_eq!(no_order.code(), Code::InvalidArgument);

    let unknown = client
        .capture_charge(keyed(
            CaptureChargeRequest {
                order_id: "o-5".into(),
                authorization_id: "auth-42".into(),
            },
            "o-5/capture/action",
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::FailedPrecondition);

    assert!(payment_ledger(&mut client).await.is_empty());
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn compensations_undo_what_their_action_applied() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Payment, dir.path()).await;
    let mut client = payment(&handle).await;

    let auth = client
        .authorize_charge(keyed(authorize("o-1", 2500, "tok_visa"), "o-1/auth/action"))
        .await
        .unwrap()
        .into_inner();
    let capture = client
        .capture_charge(keyed(
            CaptureChargeRequest {
                order_id: "o-1".into(),
                authorization_id: auth.authorization_id.clone(),
            },
            "o-1/capture/action",
        ))
        .await
        .unwrap()
        .into_inner();

    let refund = client
        .refund_charge(keyed(
            RefundChargeRequest {
                order_id: "o-1".into(),
                capture_id: capture.capture_id.clone(),
            },
            "o-1/capture/compensation",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(refund.refunded);
    assert!(!refund.noop);

    // The compensation finds the effect by its key's scope, not by the ids in the body.
    let void = client
        .void_charge(keyed(
            VoidChargeRequest {
                order_id: "o-1".into(),
                authorization_id: String::new(),
            },
            "o-1/auth/compensation",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(void.voided);
    assert!(!void.noop);

    let ledger = payment_ledger(&mut client).await;
    let ops: Vec<_> = ledger
        .iter()
        .map(|e| (e.operation.as_str(), e.reference.as_str(), e.noop))
        .collect();
    assert_eq!(
        ops,
        [
            ("authorize", "auth-1", false),
            ("capture", "cap-1", false),
            ("refund", "cap-1", false),
            ("void", "auth-1", false),
        ]
    );

    // A voided authorization cannot be captured again.
    let again = client
        .capture_charge(keyed(
            CaptureChargeRequest {
                order_id: "o-1".into(),
                authorization_id: "auth-1".into(),
            },
            "o-1/capture-2/action",
        ))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);

    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_compensation_before_its_action_tombstones_it() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Payment, dir.path()).await;
    let mut client = payment(&handle).await;

    let void = client
        .void_charge(keyed(
            VoidChargeRequest {
                order_id: "o-9".into(),
                authorization_id: String::new(),
            },
            "o-9/auth/compensation",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!void.voided);
    assert!(void.noop);

    for _ in 0..2 {
        let late = client
            .authorize_charge(keyed(authorize("o-9", 2500, "tok_visa"), "o-9/auth/action"))
            .await
            .unwrap_err();
        assert_eq!(late.code(), Code::FailedPrecondition);
        assert_eq!(late.message(), "compensated before it arrived");
    }

    let ledger = payment_ledger(&mut client).await;
    assert_eq!(ledger.len(), 2);
    assert_eq!(ledger[0].operation, "void");
    assert_eq!(ledger[0].idempotency_key, "o-9/auth/compensation");
    assert!(ledger[0].noop);
    assert_eq!(ledger[1].operation, "authorize");
    assert_eq!(ledger[1].idempotency_key, "o-9/auth/action");
    assert!(ledger[1].noop);

    // A compensation after a failed action also succeeds as a no-op.
    client
        .authorize_charge(keyed(
            authorize("o-8", 2500, "tok_declined"),
            "o-8/auth/action",
        ))
        .await
        .unwrap_err();
    let void = client
        .void_charge(keyed(
            VoidChargeRequest {
                order_id: "o-8".into(),
                authorization_id: String::new(),
            },
            "o-8/auth/compensation",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(void.noop);

    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn keys_are_required_and_must_match_the_method() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Payment, dir.path()).await;
    let mut client = payment(&handle).await;

    let missing = client
        .authorize_charge(authorize("o-1", 2500, "tok_visa"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert_eq!(missing.message(), "missing idempotency-key metadata");

    let action_key = client
        .void_charge(keyed(
            VoidChargeRequest {
                order_id: "o-1".into(),
                authorization_id: "auth-1".into(),
            },
            "o-1/auth/action",
        ))
        .await
        .unwrap_err();
    assert_eq!(action_key.code(), Code::InvalidArgument);

    let compensation_key = client
        .authorize_charge(keyed(
            authorize("o-1", 2500, "tok_visa"),
            "o-1/auth/compensation",
        ))
        .await
        .unwrap_err();
    assert_eq!(compensation_key.code(), Code::InvalidArgument);

    assert!(payment_ledger(&mut client).await.is_empty());
    handle.shutdown().await.unwrap();
}
