//! The payment participant: authorizes, voids, captures and refunds card charges.

use std::sync::Arc;

use proto::participant::v1::{ListLedgerRequest, ListLedgerResponse};
use proto::payment::v1::payment_server::Payment;
use proto::payment::v1::{
    AuthorizeChargeRequest, AuthorizeChargeResponse, CaptureChargeRequest, CaptureChargeResponse,
    RefundChargeRequest, RefundChargeResponse, VoidChargeRequest, VoidChargeResponse,
};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::core::{Applied, CallError, Core, Txn, invalid, refused};

/// The card token that is always declined.
pub const DECLINED_CARD: &str = "tok_declined";
/// The largest amount a single authorization may hold.
pub const LIMIT_CENTS: i64 = 500_000;

/// An authorization (a hold on the card), stored under `o/auth/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Authorization {
    order_id: String,
    customer_id: String,
    amount_cents: i64,
    voided: bool,
    /// The capture that took the money, if any.
    capture_id: Option<String>,
}

/// A capture, stored under `o/cap/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Capture {
    order_id: String,
    authorization_id: String,
    amount_cents: i64,
    refunded: bool,
}

fn auth_key(id: &str) -> String {
    format!("o/auth/{id}")
}

fn capture_key(id: &str) -> String {
    format!("o/cap/{id}")
}

/// The `payment.v1.Payment` service.
pub(crate) struct PaymentService {
    core: Arc<Core>,
}

impl PaymentService {
    pub(crate) fn new(core: Arc<Core>) -> Self {
        PaymentService { core }
    }
}

fn authorize(
    req: AuthorizeChargeRequest,
    txn: &mut Txn<'_>,
) -> Result<AuthorizeChargeResponse, CallError> {
    let order_id = req.order_id.clone();
    txn.action("authorize", &order_id, |txn| {
        if req.order_id.is_empty() {
            return Err(invalid("order_id is required"));
        }
        if req.amount_cents <= 0 {
            return Err(invalid(format!(
                "amount_cents must be positive, got {}",
                req.amount_cents
            )));
        }
        if req.card == DECLINED_CARD {
            return Err(refused("card declined"));
        }
        if req.amount_cents > LIMIT_CENTS {
            return Err(refused(format!(
                "amount {} exceeds the limit of {LIMIT_CENTS} cents",
                req.amount_cents
            )));
        }
        let id = format!("auth-{}", txn.next_id("auth")?);
        let auth = Authorization {
            order_id: req.order_id.clone(),
            customer_id: req.customer_id.clone(),
            amount_cents: req.amount_cents,
            voided: false,
            capture_id: None,
        };
        txn.put_json(&auth_key(&id), &auth)?;
        Ok(Applied {
            response: AuthorizeChargeResponse {
                authorization_id: id.clone(),
                amount_cents: req.amount_cents,
            },
            order_id: req.order_id,
            detail: format!(
                "held {} cents for customer {}",
                req.amount_cents, req.customer_id
            ),
            reference: id,
        })
    })
}

fn void(req: VoidChargeRequest, txn: &mut Txn<'_>) -> Result<VoidChargeResponse, CallError> {
    let outcome = txn.compensation("void", "authorize", &req.order_id, |txn, effect| {
        let key = auth_key(&effect.reference);
        let Some(mut auth) = txn.get_json::<Authorization>(&key)? else {
            return Err(CallError::Storage(format!(
                "authorization {} is missing",
                effect.reference
            )));
        };
        auth.voided = true;
        txn.put_json(&key, &auth)?;
        Ok(match &auth.capture_id {
            None => format!(
                "released the hold of {} cents on {}",
                auth.amount_cents, effect.reference
            ),
            Some(capture) => format!(
                "released the hold of {} cents on {} (its capture {capture} stands)",
                auth.amount_cents, effect.reference
            ),
        })
    })?;
    Ok(VoidChargeResponse {
        voided: !outcome.is_noop(),
        noop: outcome.is_noop(),
    })
}

fn capture(
    req: CaptureChargeRequest,
    txn: &mut Txn<'_>,
) -> Result<CaptureChargeResponse, CallError> {
    txn.action("capture", &req.order_id, |txn| {
        if req.authorization_id.is_empty() {
            return Err(invalid("authorization_id is required"));
        }
        let key = auth_key(&req.authorization_id);
        let Some(mut auth) = txn.get_json::<Authorization>(&key)? else {
            return Err(refused(format!(
                "unknown authorization {}",
                req.authorization_id
            )));
        };
        if !req.order_id.is_empty() && req.order_id != auth.order_id {
            return Err(refused(format!(
                "authorization {} belongs to order {}, not {}",
                req.authorization_id, auth.order_id, req.order_id
            )));
        }
        if auth.voided {
            return Err(refused(format!(
                "authorization {} is voided",
                req.authorization_id
            )));
        }
        if let Some(capture_id) = &auth.capture_id {
            return Err(refused(format!(
                "authorization {} is already captured by {capture_id}",
                req.authorization_id
            )));
        }
        let id = format!("cap-{}", txn.next_id("cap")?);
        auth.capture_id = Some(id.clone());
        txn.put_json(&key, &auth)?;
        let capture = Capture {
            order_id: auth.order_id.clone(),
            authorization_id: req.authorization_id.clone(),
            amount_cents: auth.amount_cents,
            refunded: false,
        };
        txn.put_json(&capture_key(&id), &capture)?;
        Ok(Applied {
            response: CaptureChargeResponse {
                capture_id: id.clone(),
                amount_cents: auth.amount_cents,
            },
            order_id: auth.order_id,
            detail: format!(
                "captured {} cents of {}",
                auth.amount_cents, req.authorization_id
            ),
            reference: id,
        })
    })
}

fn refund(req: RefundChargeRequest, txn: &mut Txn<'_>) -> Result<RefundChargeResponse, CallError> {
    let outcome = txn.compensation("refund", "capture", &req.order_id, |txn, effect| {
        let key = capture_key(&effect.reference);
        let Some(mut capture) = txn.get_json::<Capture>(&key)? else {
            return Err(CallError::Storage(format!(
                "capture {} is missing",
                effect.reference
            )));
        };
        capture.refunded = true;
        txn.put_json(&key, &capture)?;
        Ok(format!(
            "refunded {} cents of {}",
            capture.amount_cents, effect.reference
        ))
    })?;
    Ok(RefundChargeResponse {
        refunded: !outcome.is_noop(),
        noop: outcome.is_noop(),
    })
}

#[tonic::async_trait]
impl Payment for PaymentService {
    async fn authorize_charge(
        &self,
        request: Request<AuthorizeChargeRequest>,
    ) -> Result<Response<AuthorizeChargeResponse>, Status> {
        self.core
            .mutate("AuthorizeCharge", request, authorize)
            .await
    }

    async fn void_charge(
        &self,
        request: Request<VoidChargeRequest>,
    ) -> Result<Response<VoidChargeResponse>, Status> {
        self.core.mutate("VoidCharge", request, void).await
    }

    async fn capture_charge(
        &self,
        request: Request<CaptureChargeRequest>,
    ) -> Result<Response<CaptureChargeResponse>, Status> {
        self.core.mutate("CaptureCharge", request, capture).await
    }

    async fn refund_charge(
        &self,
        request: Request<RefundChargeRequest>,
    ) -> Result<Response<RefundChargeResponse>, Status> {
        self.core.mutate("RefundCharge", request, refund).await
    }

    async fn list_ledger(
        &self,
        _request: Request<ListLedgerRequest>,
    ) -> Result<Response<ListLedgerResponse>, Status> {
        self.core.list_ledger().await
    }
}
