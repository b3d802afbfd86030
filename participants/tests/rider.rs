//! The rider participant over gRPC: zones, deliveries and cancellations.

#![allow(clippy::unwrap_used)]

mod common;

use common::{keyed, rider, rider_ledger, start};
use participants::Kind;
use proto::rider::v1::{CancelDeliveryRequest, RequestDeliveryRequest};
use tonic::Code;

fn request(order: &str, zone: &str) -> RequestDeliveryRequest {
    RequestDeliveryRequest {
        order_id: order.into(),
        zone: zone.into(),
        store_id: "s-1".into(),
        customer_id: "c-1".into(),
    }
}

fn cancel(order: &str) -> CancelDeliveryRequest {
    CancelDeliveryRequest {
        order_id: order.into(),
        delivery_id: String::new(),
    }
}

#[tokio::test]
async fn request_cancel_and_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Rider, dir.path()).await;
    let mut client = rider(&handle).await;

    let delivery = client
        .request_delivery(keyed(request("o-1", "gangnam"), "o-1/rider/action"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(delivery.delivery_id, "dl-1");
    assert!(delivery.rider_id.starts_with("rider-"));
    let repeat = client
        .request_delivery(keyed(request("o-1", "gangnam"), "o-1/rider/action"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(repeat, delivery);

    let cancelled = client
        .cancel_delivery(keyed(cancel("o-1"), "o-1/rider/compensation"))
        .await
        .unwrap()
        .into_inner();
    assert!(cancelled.cancelled);
    assert!(!cancelled.noop);

    let ledger = rider_ledger(&mut client).await;
    let ops: Vec<_> = ledger
        .iter()
        .map(|e| (e.seq, e.operation.as_str(), e.reference.as_str(), e.noop))
        .collect();
    assert_eq!(
        ops,
        [(1, "request", "dl-1", false), (2, "cancel", "dl-1", false)]
    );
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn zone_rules_and_late_actions() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Rider, dir.path()).await;
    let mut client = rider(&handle).await;

    for _ in 0..2 {
        let status = client
            .request_delivery(keyed(request("o-1", "nowhere"), "o-1/rider/action"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), "no rider available in zone nowhere");
    }
    let status = client
        .request_delivery(keyed(request("o-2", ""), "o-2/rider/action"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(rider_ledger(&mut client).await.is_empty());

    let cancelled = client
        .cancel_delivery(keyed(cancel("o-3"), "o-3/rider/compensation"))
        .await
        .unwrap()
        .into_inner();
    assert!(cancelled.noop);
    let late = client
        .request_delivery(keyed(request("o-3", "gangnam"), "o-3/rider/action"))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert_eq!(late.message(), "compensated before it arrived");
    let ledger = rider_ledger(&mut client).await;
    assert_eq!(ledger.len(), 2);
    assert!(ledger.iter().all(|e| e.noop));
    handle.shutdown().await.unwrap();
}
