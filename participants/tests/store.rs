//! The store participant over gRPC: menus, sold-out items and cancellations.

#![allow(clippy::unwrap_used)]

mod common;

use common::{keyed, start, store, store_ledger};
use participants::Kind;
use proto::store::v1::{CancelOrderRequest, SubmitOrderRequest};
use tonic::Code;

fn submit(order: &str, store_id: &str, items: &[&str]) -> SubmitOrderRequest {
    SubmitOrderRequest {
        order_id: order.into(),
        store_id: store_id.into(),
        items: items.iter().map(|i| (*i).to_owned()).collect(),
        customer_id: "c-1".into(),
    }
}

fn cancel(order: &str) -> CancelOrderRequest {
    CancelOrderRequest {
        order_id: order.into(),
        store_order_id: String::new(),
        reason: "saga aborted".into(),
    }
}

#[tokio::test]
async fn submit_cancel_and_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Store, dir.path()).await;
    let mut client = store(&handle).await;

    let submitted = client
        .submit_order(keyed(
            submit("o-1", "s-1", &["bibimbap", "japchae"]),
            "o-1/store/action",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(submitted.store_order_id, "so-1");
    assert_eq!(submitted.estimated_minutes, 20);
    let repeat = client
        .submit_order(keyed(
            submit("o-1", "s-1", &["bibimbap"]),
            "o-1/store/action",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(repeat, submitted);

    let cancelled = client
        .cancel_order(keyed(cancel("o-1"), "o-1/store/compensation"))
        .await
        .unwrap()
        .into_inner();
    assert!(cancelled.cancelled);
    assert!(!cancelled.noop);

    let ledger = store_ledger(&mut client).await;
    assert_eq!(ledger.len(), 2);
    assert_eq!(
        (
            ledger[0].operation.as_str(),
            ledger[0].reference.as_str(),
            ledger[0].noop
        ),
        ("submit", "so-1", false)
    );
    assert_eq!(
        (
            ledger[1].operation.as_str(),
            ledger[1].reference.as_str(),
            ledger[1].noop
        ),
        ("cancel", "so-1", false)
    );
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn menu_rules() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Store, dir.path()).await;
    let mut client = store(&handle).await;

    let cases = [
        (
            submit("o-1", "s-9", &["pizza"]),
            Code::FailedPrecondition,
            "unknown store s-9",
        ),
        (
            submit("o-2", "s-1", &["bibimbap", "sushi"]),
            Code::FailedPrecondition,
            "item sushi is not on the menu of store s-1",
        ),
        (
            submit("o-3", "s-1", &["tteokbokki"]),
            Code::FailedPrecondition,
            "item tteokbokki is sold out at store s-1",
        ),
        (
            submit("o-4", "s-3", &["ramen", "udon"]),
            Code::FailedPrecondition,
            "item udon is sold out at store s-3",
        ),
        (submit("o-5", "s-2", &[]), Code::InvalidArgument, ""),
    ];
    for (request, code, message) in cases {
        let key = format!("{}/store/action", request.order_id);
        for _ in 0..2 {
            let status = client
                .submit_order(keyed(request.clone(), &key))
                .await
                .unwrap_err();
            assert_eq!(status.code(), code, "{key}");
            if !message.is_empty() {
                assert_eq!(status.message(), message);
            }
        }
    }
    assert!(store_ledger(&mut client).await.is_empty());

    // Every store takes an order of its own menu.
    for (i, (store_id, item)) in [("s-1", "bulgogi"), ("s-2", "pizza"), ("s-3", "gyoza")]
        .into_iter()
        .enumerate()
    {
        let order = format!("ok-{i}");
        let reply = client
            .submit_order(keyed(
                submit(&order, store_id, &[item]),
                &format!("{order}/action"),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.store_order_id, format!("so-{}", i + 1));
    }
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_cancel_before_the_submit_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Store, dir.path()).await;
    let mut client = store(&handle).await;

    let cancelled = client
        .cancel_order(keyed(cancel("o-1"), "o-1/store/compensation"))
        .await
        .unwrap()
        .into_inner();
    assert!(cancelled.noop);
    assert!(!cancelled.cancelled);
    let late = client
        .submit_order(keyed(submit("o-1", "s-2", &["pizza"]), "o-1/store/action"))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert_eq!(late.message(), "compensated before it arrived");

    let ledger = store_ledger(&mut client).await;
    assert_eq!(ledger.len(), 2);
    assert!(ledger.iter().all(|e| e.noop));
    assert_eq!(ledger[0].operation, "cancel");
    assert_eq!(ledger[1].operation, "submit");
    handle.shutdown().await.unwrap();
}
