//! CartService: decode, validate, call the use case, encode.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use crate::{
    app::{Carts, CheckoutCommand},
    domain::{IdempotencyKey, LineChange, ProductId, UserId},
    proto::{
        CheckoutRequest, CheckoutResponse, ClearRequest, ClearResponse, GetCartRequest,
        GetCartResponse, RemoveItemRequest, RemoveItemResponse, SetItemRequest, SetItemResponse,
        cart_service_server::CartService,
    },
};

pub struct CartHandler(pub Arc<Carts>);

#[tonic::async_trait]
impl CartService for CartHandler {
    async fn get_cart(
        &self,
        request: Request<GetCartRequest>,
    ) -> Result<Response<GetCartResponse>, Status> {
        let user_id = UserId::parse(request.into_inner().user_id, "user_id")?;
        let cart = self.0.get(user_id).await?;
        Ok(Response::new(GetCartResponse {
            cart: Some(convert::cart(user_id, cart)),
        }))
    }

    async fn set_item(
        &self,
        request: Request<SetItemRequest>,
    ) -> Result<Response<SetItemResponse>, Status> {
        let req = request.into_inner();
        let user_id = UserId::parse(req.user_id, "user_id")?;
        let product_id = ProductId::parse(req.product_id, "product_id")?;
        let change = LineChange::parse(req.quantity, "quantity")?;
        let cart = self.0.set_item(user_id, product_id, change).await?;
        Ok(Response::new(SetItemResponse {
            cart: Some(convert::cart(user_id, cart)),
        }))
    }

    async fn remove_item(
        &self,
        request: Request<RemoveItemRequest>,
    ) -> Result<Response<RemoveItemResponse>, Status> {
        let req = request.into_inner();
        let user_id = UserId::parse(req.user_id, "user_id")?;
        let product_id = ProductId::parse(req.product_id, "product_id")?;
        let cart = self
            .0
            .set_item(user_id, product_id, LineChange::Remove)
            .await?;
        Ok(Response::new(RemoveItemResponse {
            cart: Some(convert::cart(user_id, cart)),
        }))
    }

    async fn clear(
        &self,
        request: Request<ClearRequest>,
    ) -> Result<Response<ClearResponse>, Status> {
        let user_id = UserId::parse(request.into_inner().user_id, "user_id")?;
        let cart = self.0.clear(user_id).await?;
        Ok(Response::new(ClearResponse {
            cart: Some(convert::cart(user_id, cart)),
        }))
    }

    async fn checkout(
        &self,
        request: Request<CheckoutRequest>,
    ) -> Result<Response<CheckoutResponse>, Status> {
        let req = request.into_inner();
        let cmd = CheckoutCommand {
            user_id: UserId::parse(req.user_id, "user_id")?,
            user_coupon_id: convert::parse_user_coupon(req.user_coupon_id)?,
            idempotency_key: IdempotencyKey::parse(req.idempotency_key)?,
        };
        let order = self.0.checkout(cmd).await?;
        Ok(Response::new(CheckoutResponse {
            order: Some(convert::order(order)),
        }))
    }
}
