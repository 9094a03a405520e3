//! OrderService: decode, validate, call the use case, encode.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use crate::{
    app::{Orders, PlaceOrderCommand},
    domain::{CreatedCursor, IdempotencyKey, OrderFilter, OrderId, OrderLines, PageSize, UserId},
    proto::{
        CancelOrderRequest, CancelOrderResponse, GetOrderRequest, GetOrderResponse,
        ListOrdersRequest, ListOrdersResponse, PlaceOrderRequest, PlaceOrderResponse,
        order_service_server::OrderService,
    },
};

pub struct OrderHandler(pub Arc<Orders>);

#[tonic::async_trait]
impl OrderService for OrderHandler {
    async fn place_order(
        &self,
        request: Request<PlaceOrderRequest>,
    ) -> Result<Response<PlaceOrderResponse>, Status> {
        let req = request.into_inner();
        let cmd = PlaceOrderCommand {
            user_id: UserId::parse(req.user_id, "user_id")?,
            lines: OrderLines::parse(req.items.iter().map(|l| (l.product_id, l.quantity)))?,
            user_coupon_id: convert::parse_user_coupon(req.user_coupon_id)?,
            idempotency_key: IdempotencyKey::parse(req.idempotency_key)?,
        };
        let order = self.0.place(cmd).await?;
        Ok(Response::new(PlaceOrderResponse {
            order: Some(convert::order(order)),
        }))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<GetOrderResponse>, Status> {
        let req = request.into_inner();
        let order_id = OrderId::parse(req.order_id, "order_id")?;
        let user_id = UserId::parse(req.user_id, "user_id")?;
        let order = self.0.get(order_id, user_id).await?;
        Ok(Response::new(GetOrderResponse {
            order: Some(convert::order(order)),
        }))
    }

    async fn cancel_order(
        &self,
        request: Request<CancelOrderRequest>,
    ) -> Result<Response<CancelOrderResponse>, Status> {
        let req = request.into_inner();
        let order_id = OrderId::parse(req.order_id, "order_id")?;
        let user_id = UserId::parse(req.user_id, "user_id")?;
        let order = self.0.cancel(order_id, user_id).await?;
        Ok(Response::new(CancelOrderResponse {
            order: Some(convert::order(order)),
        }))
    }

    async fn list_orders(
        &self,
        request: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        let req = request.into_inner();
        let filter = OrderFilter::buyer(
            UserId::parse(req.user_id, "user_id")?,
            convert::parse_order_statuses(&req.statuses, "statuses")?,
        );
        let size = PageSize::parse(req.page_size)?;
        let after = CreatedCursor::parse(&req.page_token)?;
        let (orders, next) = self.0.page(&filter, size, after).await?;
        Ok(Response::new(ListOrdersResponse {
            orders: orders.into_iter().map(convert::order).collect(),
            next_page_token: next.map(CreatedCursor::encode).unwrap_or_default(),
        }))
    }
}
