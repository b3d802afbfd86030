//! The store participant: passes orders to the restaurants, and cancels them.

use std::sync::Arc;

use proto::participant::v1::{ListLedgerRequest, ListLedgerResponse};
use proto::store::v1::store_server::Store;
use proto::store::v1::{
    CancelOrderRequest, CancelOrderResponse, SubmitOrderRequest, SubmitOrderResponse,
};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::core::{Applied, CallError, Core, Txn, invalid, refused};

/// A store's menu: every item, and which of them are sold out.
#[derive(Debug, Clone, Copy)]
pub struct Menu {
    pub store_id: &'static str,
    pub items: &'static [&'static str],
    pub sold_out: &'static [&'static str],
}

/// The known stores and their menus.
pub const MENUS: &[Menu] = &[
    Menu {
        store_id: "s-1",
        items: &[
            "bibimbap",
            "bulgogi",
            "kimchi-jjigae",
            "japchae",
            "tteokbokki",
        ],
        sold_out: &["tteokbokki"],
    },
    Menu {
        store_id: "s-2",
        items: &["pizza", "pasta", "salad"],
        sold_out: &[],
    },
    Menu {
        store_id: "s-3",
        items: &["ramen", "gyoza", "udon"],
        sold_out: &["udon"],
    },
];

/// Minutes every store announces for an order.
pub const ESTIMATED_MINUTES: u32 = 20;

/// A store order, stored under `o/so/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoreOrder {
    order_id: String,
    store_id: String,
    customer_id: String,
    items: Vec<String>,
    cancelled: bool,
}

fn order_key(id: &str) -> String {
    format!("o/so/{id}")
}

/// The `store.v1.Store` service.
pub(crate) struct StoreService {
    core: Arc<Core>,
}

impl StoreService {
    pub(crate) fn new(core: Arc<Core>) -> Self {
        StoreService { core }
    }
}

fn submit(req: SubmitOrderRequest, txn: &mut Txn<'_>) -> Result<SubmitOrderResponse, CallError> {
    let order_id = req.order_id.clone();
    txn.action("submit", &order_id, |txn| {
        if req.order_id.is_empty() {
            return Err(invalid("order_id is required"));
        }
        if req.store_id.is_empty() {
            return Err(invalid("store_id is required"));
        }
        if req.items.is_empty() {
            return Err(invalid("an order needs at least one item"));
        }
        let Some(menu) = MENUS.iter().find(|m| m.store_id == req.store_id) else {
            return Err(refused(format!("unknown store {}", req.store_id)));
        };
        for item in &req.items {
            if !menu.items.contains(&item.as_str()) {
                return Err(refused(format!(
                    "item {item} is not on the menu of store {}",
                    menu.store_id
                )));
            }
            if menu.sold_out.contains(&item.as_str()) {
                return Err(refused(format!(
                    "item {item} is sold out at store {}",
                    menu.store_id
                )));
            }
        }
        let id = format!("so-{}", txn.next_id("so")?);
        let detail = format!("{} at store {}", req.items.join(", "), req.store_id);
        let order = StoreOrder {
            order_id: req.order_id.clone(),
            store_id: req.store_id,
            customer_id: req.customer_id,
            items: req.items,
            cancelled: false,
        };
        txn.put_json(&order_key(&id), &order)?;
        Ok(Applied {
            response: SubmitOrderResponse {
                store_order_id: id.clone(),
                estimated_minutes: ESTIMATED_MINUTES,
            },
            order_id: req.order_id,
            reference: id,
            detail,
        })
    })
}

fn cancel(req: CancelOrderRequest, txn: &mut Txn<'_>) -> Result<CancelOrderResponse, CallError> {
    let outcome = txn.compensation("cancel", "submit", &req.order_id, |txn, effect| {
        let key = order_key(&effect.reference);
        let Some(mut order) = txn.get_json::<StoreOrder>(&key)? else {
            return Err(CallError::Storage(format!(
                "store order {} is missing",
                effect.reference
            )));
        };
        order.cancelled = true;
        txn.put_json(&key, &order)?;
        let mut detail = format!("cancelled {} at store {}", effect.reference, order.store_id);
        if !req.reason.is_empty() {
            detail.push_str(": ");
            detail.push_str(&req.reason);
        }
        Ok(detail)
    })?;
    Ok(CancelOrderResponse {
        cancelled: !outcome.is_noop(),
        noop: outcome.is_noop(),
    })
}

#[tonic::async_trait]
impl Store for StoreService {
    async fn submit_order(
        &self,
        request: Request<SubmitOrderRequest>,
    ) -> Result<Response<SubmitOrderResponse>, Status> {
        self.core.mutate("SubmitOrder", request, submit).await
    }

    async fn cancel_order(
        &self,
        request: Request<CancelOrderRequest>,
    ) -> Result<Response<CancelOrderResponse>, Status> {
        self.core.mutate("CancelOrder", request, cancel).await
    }

    async fn list_ledger(
        &self,
        _request: Request<ListLedgerRequest>,
    ) -> Result<Response<ListLedgerResponse>, Status> {
        self.core.list_ledger().await
    }
}
