//! Cancelling and expiring open orders.
//!
//! Invariant: closing an open order gives back exactly what it held (stock, coupon), once:
//! the order row is locked and must still be PENDING_PAYMENT. Each close writes its event
//! (`OrderCancelled`, `OrderExpired`) in its own transaction. Cancel safety: each close is one
//! transaction, so a call dropped before its commit leaves nothing; after a commit that gave
//! stock back, the sold-out markers are cleared in a task of their own, which finishes even if
//! the caller has gone.

use chrono::{DateTime, Utc};

use super::Orders;
use crate::{
    app::events,
    domain::{Order, OrderCancelled, OrderExpired, OrderId, OrderStatus, UserId},
    error::{AppError, Resource},
    store::postgres::{self as postgres, orders},
    telemetry::TraceContext,
};

/// How many overdue orders one expiry transaction closes.
const EXPIRY_BATCH: i64 = 100;

impl Orders {
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
        let order = released.orders.remove(0).with_items(items);
        let at = closed_at(&order)?;
        events::record(&mut tx, &[id], &TraceContext::current(), |_, sequence| {
            OrderCancelled::of(&order, sequence, at)
        })
        .await?;
        postgres::commit(tx).await?;
        self.outbox_nudge.notify_one();
        self.sold_out.clear(released.restocks).await;
        Ok(order)
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
            let closed: Vec<Order> = released
                .orders
                .into_iter()
                .zip(held)
                .map(|(row, items)| row.with_items(items))
                .collect();
            let ids: Vec<OrderId> = closed.iter().map(|o| o.id).collect();
            let at = closed
                .iter()
                .map(closed_at)
                .collect::<Result<Vec<_>, _>>()?;
            events::record(&mut tx, &ids, &TraceContext::current(), |i, sequence| {
                OrderExpired::of(&closed[i], sequence, at[i])
            })
            .await?;
            postgres::commit(tx).await?;
            if !closed.is_empty() {
                self.outbox_nudge.notify_one();
            }
            // One clear for the whole batch: its orders often share the same hot products.
            self.sold_out.clear(released.restocks).await;
            expired += closed.len();
            if (overdue.len() as i64) < EXPIRY_BATCH {
                return Ok(expired);
            }
        }
    }
}

/// When a closed order was closed: its row's `cancelled_at`, set by the closing statement.
fn closed_at(order: &Order) -> Result<DateTime<Utc>, AppError> {
    order
        .cancelled_at
        .ok_or_else(|| AppError::internal(format!("closed order {} has no closing time", order.id)))
}
