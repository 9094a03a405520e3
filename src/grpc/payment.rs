//! PaymentService: decode, validate, call the use case, encode.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use crate::{
    app::{PayCommand, Payments},
    domain::{IdempotencyKey, OrderId, UserId},
    proto::{PayRequest, PayResponse, payment_service_server::PaymentService},
};

pub struct PaymentHandler(pub Arc<Payments>);

#[tonic::async_trait]
impl PaymentService for PaymentHandler {
    async fn pay(&self, request: Request<PayRequest>) -> Result<Response<PayResponse>, Status> {
        let req = request.into_inner();
        let cmd = PayCommand {
            order_id: OrderId::parse(req.order_id, "order_id")?,
            user_id: UserId::parse(req.user_id, "user_id")?,
            idempotency_key: IdempotencyKey::parse(req.idempotency_key)?,
        };
        let payment = self.0.pay(cmd).await?;
        Ok(Response::new(PayResponse {
            payment: Some(convert::payment(payment)),
        }))
    }
}
