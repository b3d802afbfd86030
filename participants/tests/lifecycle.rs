//! Running participants: injected faults, restarts on the same data, health and reflection.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{channel, keyed, payment, payment_ledger, start, store, store_ledger};
use participants::Kind;
use proto::payment::v1::{AuthorizeChargeRequest, VoidChargeRequest};
use proto::store::v1::SubmitOrderRequest;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

fn authorize(order: &str) -> AuthorizeChargeRequest {
    AuthorizeChargeRequest {
        order_id: order.into(),
        customer_id: "c-1".into(),
        amount_cents: 1000,
        card: "tok_visa".into(),
    }
}

#[tokio::test]
async fn injected_faults_apply_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Payment, dir.path()).await;
    let mut client = payment(&handle).await;

    handle
        .faults
        .fail_next("AuthorizeCharge", Code::Unavailable, 2);
    for _ in 0..2 {
        let status = client
            .authorize_charge(keyed(authorize("o-1"), "o-1/auth/action"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    let auth = client
        .authorize_charge(keyed(authorize("o-1"), "o-1/auth/action"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(auth.authorization_id, "auth-1");
    assert_eq!(handle.faults.calls("AuthorizeCharge"), 3);

    // "*" hits every method but ListLedger.
    handle.faults.fail_next("*", Code::Unavailable, 1);
    assert_eq!(payment_ledger(&mut client).await.len(), 1);
    let status = client
        .authorize_charge(keyed(authorize("o-2"), "o-2/auth/action"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    client
        .authorize_charge(keyed(authorize("o-2"), "o-2/auth/action"))
        .await
        .unwrap();

    // A call that times out while delayed applies nothing either.
    handle
        .faults
        .set_delay("AuthorizeCharge", Duration::from_secs(30));
    let mut request = keyed(authorize("o-3"), "o-3/auth/action");
    request.set_timeout(Duration::from_millis(50));
    let status = client.authorize_charge(request).await.unwrap_err();
    // The server enforces the grpc-timeout itself (CANCELLED) or the client gives up first.
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
    handle.faults.clear();
    let auth = client
        .authorize_charge(keyed(authorize("o-3"), "o-3/auth/action"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(auth.authorization_id, "auth-3");

    let ledger = payment_ledger(&mut client).await;
    assert_eq!(ledger.len(), 3);
    assert!(ledger.iter().all(|e| !e.noop));
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_lost_reply_applies_the_effect_once_and_a_retry_gets_the_first_reply() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Payment, dir.path()).await;
    let mut client = payment(&handle).await;

    handle.faults.lose_replies("AuthorizeCharge", 1);
    let status = client
        .authorize_charge(keyed(authorize("o-1"), "o-1/auth/action"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        status.message(),
        "reply lost after the effect was applied (injected)"
    );
    // The effect was applied (and flushed) although the caller never heard of it.
    let ledger = payment_ledger(&mut client).await;
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].idempotency_key, "o-1/auth/action");
    assert_eq!(ledger[0].operation, "authorize");
    assert!(!ledger[0].noop);

    // The retry with the same key gets the original reply and applies nothing more.
    let auth = client
        .authorize_charge(keyed(authorize("o-1"), "o-1/auth/action"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(auth.authorization_id, "auth-1");
    assert_eq!(auth.amount_cents, 1000);
    assert_eq!(payment_ledger(&mut client).await, ledger);
    assert_eq!(handle.faults.calls("AuthorizeCharge"), 2);

    // A compensation after a lost-reply action undoes its effect. The compensation's own
    // reply is lost too (through "*"); its retry replays the real result.
    handle.faults.lose_replies("AuthorizeCharge", 1);
    let status = client
        .authorize_charge(keyed(authorize("o-2"), "o-2/auth/action"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    handle.faults.lose_replies("*", 1);
    let void = || {
        keyed(
            VoidChargeRequest {
                order_id: "o-2".into(),
                authorization_id: String::new(),
            },
            "o-2/auth/compensation",
        )
    };
    let status = client.void_charge(void()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let voided = client.void_charge(void()).await.unwrap().into_inner();
    assert!(voided.voided);
    assert!(!voided.noop);
    let ledger = payment_ledger(&mut client).await;
    let o2: Vec<_> = ledger
        .iter()
        .filter(|e| e.order_id == "o-2")
        .map(|e| (e.operation.as_str(), e.noop, e.reference.as_str()))
        .collect();
    assert_eq!(
        o2,
        [("authorize", false, "auth-2"), ("void", false, "auth-2")]
    );
    assert_eq!(handle.faults.calls("AuthorizeCharge"), 3);
    assert_eq!(handle.faults.calls("VoidCharge"), 2);

    // clear() drops pending lost replies.
    handle.faults.lose_replies("*", 5);
    handle.faults.clear();
    client
        .authorize_charge(keyed(authorize("o-3"), "o-3/auth/action"))
        .await
        .unwrap();
    handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_keeps_the_ledger_and_the_idempotency_table() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Store, dir.path()).await;
    let mut client = store(&handle).await;
    let order = |id: &str, store_id: &str| SubmitOrderRequest {
        order_id: id.into(),
        store_id: store_id.into(),
        items: vec!["pizza".into()],
        customer_id: "c-1".into(),
    };
    let first = client
        .submit_order(keyed(order("o-1", "s-2"), "o-1/store/action"))
        .await
        .unwrap()
        .into_inner();
    client
        .submit_order(keyed(order("o-2", "s-9"), "o-2/store/action"))
        .await
        .unwrap_err();
    let before = store_ledger(&mut client).await;
    drop(client);
    handle.shutdown().await.unwrap();

    for round in 0..2 {
        let handle = start(Kind::Store, dir.path()).await;
        let mut client = store(&handle).await;
        assert_eq!(store_ledger(&mut client).await[..before.len()], before[..]);
        let replay = client
            .submit_order(keyed(order("o-1", "s-2"), "o-1/store/action"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(replay, first);
        let failed = client
            .submit_order(keyed(order("o-2", "s-2"), "o-2/store/action"))
            .await
            .unwrap_err();
        assert_eq!(failed.message(), "unknown store s-9");
        // Counters survive too: the next order gets the next ids.
        let next = client
            .submit_order(keyed(
                order(&format!("n-{round}"), "s-2"),
                &format!("n-{round}/action"),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(next.store_order_id, format!("so-{}", round + 2));
        let ledger = store_ledger(&mut client).await;
        assert_eq!(ledger.len(), before.len() + round + 1);
        assert_eq!(ledger.last().unwrap().seq, ledger.len() as u64);
        drop(client);
        handle.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn health_reports_serving() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [Kind::Payment, Kind::Store, Kind::Rider] {
        let handle = start(kind, &dir.path().join(kind.to_string())).await;
        let mut health = HealthClient::new(channel(&handle).await);
        for service in ["", kind.service_name()] {
            let reply = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                reply.status,
                ServingStatus::Serving as i32,
                "{kind} {service:?}"
            );
        }
        let unknown = health
            .check(HealthCheckRequest {
                service: "nope.v1.Nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound);
        drop(health);
        handle.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn reflection_lists_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(Kind::Rider, dir.path()).await;
    let mut reflection = ServerReflectionClient::new(channel(&handle).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reply {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"rider.v1.Rider".to_owned()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    assert!(
        !names.contains(&"payment.v1.Payment".to_owned()),
        "{names:?}"
    );
    drop(replies);
    drop(reflection);
    handle.shutdown().await.unwrap();
}

#[test]
fn kind_names() {
    for kind in [Kind::Payment, Kind::Store, Kind::Rider] {
        assert_eq!(kind.to_string().parse::<Kind>().unwrap(), kind);
    }
    assert_eq!(Kind::Payment.to_string(), "payment");
    assert_eq!(Kind::Store.service_name(), "store.v1.Store");
    assert!("nope".parse::<Kind>().is_err());
}
