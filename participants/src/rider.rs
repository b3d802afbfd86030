//! The rider participant: finds a rider to deliver an order, and cancels deliveries.

use std::sync::Arc;

use proto::participant::v1::{ListLedgerRequest, ListLedgerResponse};
use proto::rider::v1::rider_server::Rider;
use proto::rider::v1::{
    CancelDeliveryRequest, CancelDeliveryResponse, RequestDeliveryRequest, RequestDeliveryResponse,
};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::core::{Applied, CallError, Core, Txn, invalid, refused};

/// The zone where no rider is ever available.
pub const EMPTY_ZONE: &str = "nowhere";
/// How many riders work each zone; deliveries are assigned to them in turn.
pub const RIDERS_PER_ZONE: u64 = 3;

/// A delivery, stored under `o/dl/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Delivery {
    order_id: String,
    zone: String,
    store_id: String,
    customer_id: String,
    rider_id: String,
    cancelled: bool,
}

fn delivery_key(id: &str) -> String {
    format!("o/dl/{id}")
}

/// The `rider.v1.Rider` service.
pub(crate) struct RiderService {
    core: Arc<Core>,
}

impl RiderService {
    pub(crate) fn new(core: Arc<Core>) -> Self {
        RiderService { core }
    }
}

fn deliver(
    req: RequestDeliveryRequest,
    txn: &mut Txn<'_>,
) -> Result<RequestDeliveryResponse, CallError> {
    let order_id = req.order_id.clone();
    txn.action("request", &order_id, |txn| {
        if req.order_id.is_empty() {
            return Err(invalid("order_id is required"));
        }
        if req.zone.is_empty() {
            return Err(invalid("zone is required"));
        }
        if req.zone == EMPTY_ZONE {
            return Err(refused(format!("no rider available in zone {}", req.zone)));
        }
        let n = txn.next_id("dl")?;
        let id = format!("dl-{n}");
        // Deterministic: the riders of the zone take deliveries in turn.
        let rider_id = format!("rider-{}-{}", req.zone, (n - 1) % RIDERS_PER_ZONE + 1);
        let detail = format!(
            "{rider_id} delivers from store {} in zone {}",
            req.store_id, req.zone
        );
        let delivery = Delivery {
            order_id: req.order_id.clone(),
            zone: req.zone,
            store_id: req.store_id,
            customer_id: req.customer_id,
            rider_id: rider_id.clone(),
            cancelled: false,
        };
        txn.put_json(&delivery_key(&id), &delivery)?;
        Ok(Applied {
            response: RequestDeliveryResponse {
                delivery_id: id.clone(),
                rider_id,
            },
            order_id: req.order_id,
            reference: id,
            detail,
        })
    })
}

fn cancel(
    req: CancelDeliveryRequest,
    txn: &mut Txn<'_>,
) -> Result<CancelDeliveryResponse, CallError> {
    let outcome = txn.compensation("cancel", "request", &req.order_id, |txn, effect| {
        let key = delivery_key(&effect.reference);
        let Some(mut delivery) = txn.get_json::<Delivery>(&key)? else {
            return Err(CallError::Storage(format!(
                "delivery {} is missing",
                effect.reference
            )));
        };
        delivery.cancelled = true;
        txn.put_json(&key, &delivery)?;
        Ok(format!(
            "released {} from {}",
            delivery.rider_id, effect.reference
        ))
    })?;
    Ok(CancelDeliveryResponse {
        cancelled: !outcome.is_noop(),
        noop: outcome.is_noop(),
    })
}

#[tonic::async_trait]
impl Rider for RiderService {
    async fn request_delivery(
        &self,
        request: Request<RequestDeliveryRequest>,
    ) -> Result<Response<RequestDeliveryResponse>, Status> {
        self.core.mutate("RequestDelivery", request, deliver).await
    }

    async fn cancel_delivery(
        &self,
        request: Request<CancelDeliveryRequest>,
    ) -> Result<Response<CancelDeliveryResponse>, Status> {
        self.core.mutate("CancelDelivery", request, cancel).await
    }

    async fn list_ledger(
        &self,
        _request: Request<ListLedgerRequest>,
    ) -> Result<Response<ListLedgerResponse>, Status> {
        self.core.list_ledger().await
    }
}
