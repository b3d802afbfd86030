//! Shared helpers of the participant tests: start a participant on a loopback port, build
//! keyed requests, connect clients.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

use participants::{Kind, ParticipantHandle};
use proto::participant::v1::{LedgerEntry, ListLedgerRequest};
use proto::payment::v1::payment_client::PaymentClient;
use proto::rider::v1::rider_client::RiderClient;
use proto::store::v1::store_client::StoreClient;
use tonic::transport::Channel;

/// Starts `kind` on 127.0.0.1:0 with data in `dir`.
pub async fn start(kind: Kind, dir: &Path) -> ParticipantHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    participants::spawn(kind, listener, dir).await.unwrap()
}

pub async fn channel(handle: &ParticipantHandle) -> Channel {
    Channel::from_shared(format!("http://{}", handle.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub async fn payment(handle: &ParticipantHandle) -> PaymentClient<Channel> {
    PaymentClient::new(channel(handle).await)
}

pub async fn store(handle: &ParticipantHandle) -> StoreClient<Channel> {
    StoreClient::new(channel(handle).await)
}

pub async fn rider(handle: &ParticipantHandle) -> RiderClient<Channel> {
    RiderClient::new(channel(handle).await)
}

/// `message` with the `idempotency-key` metadata set to `key`.
pub fn keyed<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("idempotency-key", key.parse().unwrap());
    request
}

pub async fn payment_ledger(client: &mut PaymentClient<Channel>) -> Vec<LedgerEntry> {
    client
        .list_ledger(ListLedgerRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries
}

pub async fn store_ledger(client: &mut StoreClient<Channel>) -> Vec<LedgerEntry> {
    client
        .list_ledger(ListLedgerRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries
}

pub async fn rider_ledger(client: &mut RiderClient<Channel>) -> Vec<LedgerEntry> {
    client
        .list_ledger(ListLedgerRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries
}
