//! Carts and their checkout.
//!
//! Invariant: a cart holds at most [`MAX_CART_LINES`] lines (the same limit as an order), and a
//! checkout places exactly one order through the same path as PlaceOrder and empties the cart
//! in the same transaction, or changes nothing. A checkout retried with its idempotency key
//! returns the first attempt's order, even though the cart is empty by then: the key is claimed
//! first in the transaction and its fingerprint is the request (the coupon), not the cart.
//!
//! Cancel safety: every call is one Postgres transaction, so a call dropped before its commit
//! leaves the cart and the stock as they were.

use std::sync::Arc;

use sqlx::PgPool;

use super::{
    idempotency::{NextAction, next_action},
    orders::{Orders, PlaceOrderCommand, saved_order},
    rate_limit::{LimitedCall, UserRateLimit},
};
use crate::{
    domain::{
        Cart, IdempotencyKey, LineChange, MAX_CART_LINES, Order, OrderLines, ProductId,
        UserCouponId, UserId,
    },
    error::{AppError, Resource},
    metrics,
    store::postgres::{
        self,
        carts::{self, AddRefusal},
        idempotency::Operation,
    },
};

pub struct CheckoutCommand {
    pub user_id: UserId,
    pub user_coupon_id: Option<UserCouponId>,
    pub idempotency_key: Option<IdempotencyKey>,
}

impl CheckoutCommand {
    /// What makes two checkouts "the same request" for a key: the cart is emptied by the first,
    /// so only the coupon can tell them apart.
    fn fingerprint(&self) -> String {
        format!(
            "coupon={}",
            self.user_coupon_id.map_or(0, UserCouponId::get)
        )
    }
}

/// The cart flows.
pub struct Carts {
    pg: PgPool,
    orders: Arc<Orders>,
    rate: Arc<UserRateLimit>,
}

impl Carts {
    pub fn new(pg: PgPool, orders: Arc<Orders>, rate: Arc<UserRateLimit>) -> Self {
        Self { pg, orders, rate }
    }

    pub async fn get(&self, user_id: UserId) -> Result<Cart, AppError> {
        let mut conn = self.pg.acquire().await?;
        Ok(carts::get(&mut conn, user_id).await?)
    }

    /// Sets a line (CART_FULL for a new line past the limit) or removes it; returns the cart.
    pub async fn set_item(
        &self,
        user_id: UserId,
        product_id: ProductId,
        change: LineChange,
    ) -> Result<Cart, AppError> {
        let mut tx = self.pg.begin().await?;
        match change {
            LineChange::Set(quantity) => {
                match carts::set_line(&mut tx, user_id, product_id, quantity, MAX_CART_LINES)
                    .await?
                {
                    Ok(()) => {}
                    Err(AddRefusal::Full) => {
                        return Err(AppError::CartFull {
                            max: MAX_CART_LINES,
                        });
                    }
                    Err(AddRefusal::NoProduct) => {
                        return Err(AppError::NotFound {
                            resource: Resource::Product,
                            id: product_id.get(),
                        });
                    }
                }
            }
            LineChange::Remove => carts::remove_line(&mut tx, user_id, product_id).await?,
        }
        let cart = carts::get(&mut tx, user_id).await?;
        postgres::commit(tx).await?;
        Ok(cart)
    }

    pub async fn clear(&self, user_id: UserId) -> Result<Cart, AppError> {
        let mut tx = self.pg.begin().await?;
        carts::take_lines(&mut tx, user_id).await?;
        postgres::commit(tx).await?;
        Ok(Cart { lines: Vec::new() })
    }

    pub async fn checkout(&self, cmd: CheckoutCommand) -> Result<Order, AppError> {
        let result = self.try_checkout(cmd).await;
        metrics::checkout(metrics::outcome(&result));
        result
    }

    async fn try_checkout(&self, cmd: CheckoutCommand) -> Result<Order, AppError> {
        self.rate.admit(cmd.user_id, LimitedCall::Checkout).await?;
        let mut tx = self.pg.begin().await?;
        let key = cmd.idempotency_key.as_ref();
        match next_action(&mut tx, cmd.user_id, Operation::Checkout, key, || {
            cmd.fingerprint()
        })
        .await?
        {
            NextAction::Start => {}
            NextAction::ReturnSaved(order_id) => return saved_order(&mut tx, order_id).await,
        }
        // Emptied first: if the order is refused, the rollback puts every line back.
        let lines = carts::take_lines(&mut tx, cmd.user_id).await?;
        if lines.is_empty() {
            return Err(AppError::CartEmpty);
        }
        let lines =
            OrderLines::parse(lines.iter().map(|l| (l.product_id.get(), l.quantity.get())))?;
        let product_ids: Vec<ProductId> = lines.as_slice().iter().map(|l| l.product_id).collect();
        self.orders.refuse_sold_out(&product_ids).await?;
        let order = PlaceOrderCommand {
            user_id: cmd.user_id,
            lines,
            user_coupon_id: cmd.user_coupon_id,
            idempotency_key: cmd.idempotency_key,
        };
        self.orders.place_in(tx, order, Operation::Checkout).await
    }
}
