//! Placing, reading, cancelling and expiring orders.
//!
//! Invariant: an order reserves all its stock and its coupon, priced and checked against the
//! balance, in one transaction, or leaves no trace; cancelling or expiring an open order gives
//! back exactly what it held. Orders without an idempotency key for a product known to be sold
//! out are refused from Redis without touching Postgres; keyed orders look their key up first,
//! so a retry of a success is never refused by that shortcut.
//!
//! Cancel safety: placing, cancelling and expiring are each one transaction, so a call dropped
//! before its commit leaves nothing (the dropped transaction rolls back). After a commit that
//! gave stock back, the sold-out markers are cleared in a task of their own, which finishes
//! even if the caller has gone.

use std::{sync::Arc, time::Duration};

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tracing::Instrument as _;

use super::{
    idempotency::{NextAction, next_action},
    rate_limit::{LimitedCall, UserRateLimit},
    sold_out::SoldOut,
};
use crate::{
    domain::{
        IdempotencyKey, Order, OrderId, OrderLines, OrderStatus, Pricing, ProductId, UserCoupon,
        UserCouponId, UserCouponStatus, UserId, ValidationError, Won,
    },
    error::{AppError, Resource},
    metrics,
    store::postgres::{
        self as postgres, balances, coupons,
        idempotency::Operation,
        orders::{self, LineRefusal, NewOrder},
    },
    telemetry,
};

pub struct PlaceOrderCommand {
    pub user_id: UserId,
    pub lines: OrderLines,
    pub user_coupon_id: Option<UserCouponId>,
    pub idempotency_key: Option<IdempotencyKey>,
}

impl PlaceOrderCommand {
    /// What makes two requests "the same request" for an idempotency key.
    fn fingerprint(&self) -> String {
        format!(
            "{};coupon={}",
            self.lines.fingerprint(),
            self.user_coupon_id.map_or(0, UserCouponId::get)
        )
    }
}

/// How many overdue orders one expiry transaction closes.
const EXPIRY_BATCH: i64 = 100;

/// The order flows.
pub struct Orders {
    pg: PgPool,
    sold_out: Arc<SoldOut>,
    /// An unpaid order expires after this.
    order_ttl: Duration,
    rate: Arc<UserRateLimit>,
}

impl Orders {
    pub fn new(
        pg: PgPool,
        sold_out: Arc<SoldOut>,
        order_ttl: Duration,
        rate: Arc<UserRateLimit>,
    ) -> Self {
        Self {
            pg,
            sold_out,
            order_ttl,
            rate,
        }
    }

    pub async fn place(&self, cmd: PlaceOrderCommand) -> Result<Order, AppError> {
        let result = self
            .try_place(cmd)
            .instrument(telemetry::step("orders.place"))
            .await;
        metrics::order_placed(metrics::outcome(&result));
        result
    }

    async fn try_place(&self, cmd: PlaceOrderCommand) -> Result<Order, AppError> {
        self.rate
            .admit(cmd.user_id, LimitedCall::PlaceOrder)
            .await?;
        let product_ids: Vec<ProductId> =
            cmd.lines.as_slice().iter().map(|l| l.product_id).collect();
        let keyed = cmd.idempotency_key.is_some();
        if !keyed {
            self.refuse_sold_out(&product_ids).await?;
        }

        let mut tx = self.pg.begin().await?;
        let key = cmd.idempotency_key.as_ref();
        match next_action(&mut tx, cmd.user_id, Operation::PlaceOrder, key, || {
            cmd.fingerprint()
        })
        .await?
        {
            NextAction::Start => {}
            NextAction::ReturnSaved(order_id) => return saved_order(&mut tx, order_id).await,
        }
        if keyed {
            // A fresh key: the shortcut may refuse now (the claim rolls back with the refusal).
            self.refuse_sold_out(&product_ids).await?;
        }
        self.place_in(tx, &cmd, Operation::PlaceOrder).await
    }

    /// Reserves, prices and writes the order in `tx` (whose caller has claimed the command's
    /// key for `operation`, if it has one) and commits: all or nothing. PlaceOrder and Checkout
    /// both end here, so they place orders by the same rules and fail with the same errors.
    pub(super) async fn place_in(
        &self,
        mut tx: Transaction<'static, Postgres>,
        cmd: &PlaceOrderCommand,
        operation: Operation,
    ) -> Result<Order, AppError> {
        // Lock order: the coupon first, then products by ascending id (the lines are sorted).
        let coupon = match cmd.user_coupon_id {
            Some(id) => Some(usable_coupon(
                coupons::lock_user_coupon(&mut tx, id).await?,
                cmd.user_id,
            )?),
            None => None,
        };
        // Read before any product is locked, to keep the hot rows' lock short. Pay deducts
        // conditionally, so this check is advice to the buyer, not the guard of the balance.
        let balance = balances::balance(&mut *tx, cmd.user_id).await?;

        let mut items = Vec::with_capacity(cmd.lines.as_slice().len());
        for line in cmd.lines.as_slice() {
            match orders::reserve_line(&mut tx, line).await? {
                Ok(item) => items.push(item),
                Err(refusal) => {
                    drop(tx);
                    return Err(self.refused_line(refusal).await);
                }
            }
        }
        let total = Pricing::total_of(&items)
            .ok_or_else(|| ValidationError::new("items", "the order total is too large"))?;
        let discount = match &coupon {
            Some(c) => c
                .terms
                .discount_for(total)
                .ok_or(AppError::CouponUnusable {
                    why: "below_min_order_amount",
                })?,
            None => Won::ZERO,
        };
        let pricing = Pricing::new(total, discount);
        if balance < pricing.final_amount {
            return Err(AppError::InsufficientBalance {
                required: pricing.final_amount,
            });
        }
        let order = orders::insert(
            &mut tx,
            NewOrder {
                user_id: cmd.user_id,
                items: &items,
                pricing,
                user_coupon_id: cmd.user_coupon_id,
                ttl_secs: self.order_ttl.as_secs_f64(),
                idempotency_key: cmd.idempotency_key.as_ref().map(|key| (operation, key)),
            },
        )
        .await?;
        postgres::commit(tx).await?;
        Ok(order)
    }

    /// OUT_OF_STOCK when one of `products` is known to be sold out.
    pub(super) async fn refuse_sold_out(&self, products: &[ProductId]) -> Result<(), AppError> {
        match self.sold_out.first(products).await {
            Some(product) => Err(AppError::OutOfStock {
                product_id: product.get(),
            }),
            None => Ok(()),
        }
    }

    /// The error for a line that could not be reserved; a product found with no stock at all
    /// is marked sold out so the next orders for it are refused from Redis.
    async fn refused_line(&self, refusal: LineRefusal) -> AppError {
        match refusal {
            LineRefusal::NoProduct(id) => AppError::NotFound {
                resource: Resource::Product,
                id: id.get(),
            },
            LineRefusal::NotSelling(id) => AppError::ProductNotSelling {
                product_id: id.get(),
            },
            LineRefusal::OutOfStock {
                product,
                left,
                stock_gen,
            } => {
                if left == 0 {
                    self.sold_out.mark(product, stock_gen).await;
                }
                AppError::OutOfStock {
                    product_id: product.get(),
                }
            }
        }
    }

    pub async fn get(&self, id: OrderId, user_id: UserId) -> Result<Order, AppError> {
        let mut conn = self.pg.acquire().await?;
        let order = orders::get(&mut conn, id)
            .await?
            .ok_or(AppError::NotFound {
                resource: Resource::Order,
                id: id.get(),
            })?;
        if order.user_id != user_id {
            return Err(AppError::NotOrderOwner);
        }
        Ok(order)
    }

    pub async fn cancel(&self, id: OrderId, user_id: UserId) -> Result<Order, AppError> {
        let mut tx = self.pg.begin().await?;
        let row = orders::lock(&mut tx, id).await?.ok_or(AppError::NotFound {
            resource: Resource::Order,
            id: id.get(),
        })?;
        if row.user_id != user_id {
            return Err(AppError::NotOrderOwner);
        }
        if !row.status.is_open() {
            return Err(AppError::OrderClosed { status: row.status });
        }
        let items = orders::items(&mut *tx, id).await?;
        let mut released =
            orders::release(&mut tx, &[(&row, &items)], OrderStatus::Cancelled).await?;
        postgres::commit(tx).await?;
        self.sold_out.clear(released.restocks).await;
        Ok(released.orders.remove(0).with_items(items))
    }

    /// Closes every open order past its deadline as EXPIRED, giving back its stock and coupon.
    /// Returns how many were closed.
    pub async fn expire_overdue(&self) -> Result<usize, AppError> {
        let mut expired = 0;
        loop {
            let mut tx = self.pg.begin().await?;
            let overdue = orders::lock_overdue(&mut tx, EXPIRY_BATCH).await?;
            let mut held = Vec::with_capacity(overdue.len());
            for row in &overdue {
                held.push(orders::items(&mut *tx, row.id).await?);
            }
            let batch: Vec<_> = overdue
                .iter()
                .zip(&held)
                .map(|(row, items)| (row, items.as_slice()))
                .collect();
            let released = orders::release(&mut tx, &batch, OrderStatus::Expired).await?;
            postgres::commit(tx).await?;
            // One clear for the whole batch: its orders often share the same hot products.
            self.sold_out.clear(released.restocks).await;
            expired += released.orders.len();
            if (overdue.len() as i64) < EXPIRY_BATCH {
                return Ok(expired);
            }
        }
    }
}

/// The order a key's first call placed, for its replay.
pub(super) async fn saved_order(tx: &mut PgConnection, order_id: i64) -> Result<Order, AppError> {
    let id = OrderId::parse(order_id, "order_id")?;
    orders::get(tx, id)
        .await?
        .ok_or_else(|| AppError::internal(format!("idempotency result {id} has no order")))
}

/// A coupon the caller may put on a new order: theirs, available and not expired.
fn usable_coupon(coupon: Option<UserCoupon>, user_id: UserId) -> Result<UserCoupon, AppError> {
    let coupon = coupon
        .filter(|c| c.user_id == user_id)
        .ok_or(AppError::CouponUnusable { why: "not_owned" })?;
    match coupon
        .status
        .effective(coupon.expires_at, chrono::Utc::now())
    {
        UserCouponStatus::Available => Ok(coupon),
        UserCouponStatus::Reserved => Err(AppError::CouponUnusable { why: "reserved" }),
        UserCouponStatus::Used => Err(AppError::CouponUnusable { why: "used" }),
        UserCouponStatus::Expired => Err(AppError::CouponUnusable { why: "expired" }),
    }
}
