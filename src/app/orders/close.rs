//! Cancelling and expiring open orders.
//!
//! Invariant: closing an open order gives back exactly what it held (stock, coupon), once: the
//! order row is locked and must still be PENDING_PAYMENT, and the stock given back is summed
//! from the items of the rows the closing statement itself moved out of PENDING_PAYMENT. Each
//! close writes its event (`OrderCancelled`, `OrderExpired`), numbered under the order's lock,
//! in its own transaction.
//!
//! A close is two statements and the commit ([`close_batch`]): one locks the orders with their
//! coupons and products and reads their items, one makes every write; an expiry batch of 100
//! orders costs the same three round trips as a single cancel.
//!
//! Cancel safety, at each await: dropped while beginning, locking or writing, the transaction
//! rolls back (the dropped transaction's ROLLBACK runs before its connection is used again),
//! leaving nothing and releasing its row locks; dropped during the commit, the close committed
//! whole or not at all, and a retried cancel is told ORDER_CLOSED in the first case (a close
//! that committed then skips clearing the sold-out markers, which lapse by their TTL). After a
//! commit that gave stock back, the markers are cleared in a task of their own, which finishes
//! even if the caller goes away while it runs.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::Orders;
use crate::{
    domain::{
        EventSequence, Order, OrderCancelled, OrderEvent, OrderExpired, OrderId, OrderItem,
        OrderStatus, Restock, UserId,
    },
    error::{AppError, Resource},
    store::postgres::{
        self as postgres,
        close_batch::{self, Closing},
        orders::OrderRow,
        outbox::NewEvent,
    },
    telemetry::TraceContext,
};

/// How many overdue orders one expiry transaction closes.
const EXPIRY_BATCH: i64 = 100;

impl Orders {
    pub async fn cancel(&self, id: OrderId, user_id: UserId) -> Result<Order, AppError> {
        let mut tx = postgres::begin_batch(&self.pg).await?;
        let closing = Closing::Cancel {
            order: id,
            buyer: user_id,
        };
        let locked = close_batch::lock(&mut tx, closing).await?;
        let Some((now, (row, items))) =
            locked.and_then(|l| Some((l.now, l.orders.into_iter().next()?)))
        else {
            return Err(AppError::NotFound {
                resource: Resource::Order,
                id: id.get(),
            });
        };
        if row.user_id != user_id {
            return Err(AppError::NotOrderOwner);
        }
        if !row.status.is_open() {
            return Err(AppError::OrderClosed { status: row.status });
        }
        let (mut closed, restocks) = close(
            &mut tx,
            vec![(row, items)],
            OrderStatus::Cancelled,
            now,
            OrderCancelled::of,
        )
        .await?;
        postgres::commit(tx).await?;
        self.outbox_nudge.notify_one();
        self.sold_out.clear(restocks).await;
        closed
            .pop()
            .ok_or_else(|| AppError::internal(format!("order {id} was not closed")))
    }

    /// Closes every open order past its deadline as EXPIRED, giving back its stock and coupon.
    /// Returns how many were closed.
    pub async fn expire_overdue(&self) -> Result<usize, AppError> {
        let mut expired = 0;
        loop {
            let mut tx = postgres::begin_batch(&self.pg).await?;
            let closing = Closing::Overdue {
                limit: EXPIRY_BATCH,
            };
            let Some(locked) = close_batch::lock(&mut tx, closing).await? else {
                return Ok(expired);
            };
            let found = locked.orders.len();
            let (closed, restocks) = close(
                &mut tx,
                locked.orders,
                OrderStatus::Expired,
                locked.now,
                OrderExpired::of,
            )
            .await?;
            postgres::commit(tx).await?;
            self.outbox_nudge.notify_one();
            // One clear for the whole batch: its orders often share the same hot products.
            self.sold_out.clear(restocks).await;
            expired += closed.len();
            if (found as i64) < EXPIRY_BATCH {
                return Ok(expired);
            }
        }
    }
}

/// Closes `held` (locked, open) as `to` at `at` with one statement, each with the event `event`
/// builds for it. Returns the closed orders, in the order given, and the products restocked.
async fn close<E: OrderEvent>(
    tx: &mut PgConnection,
    held: Vec<(OrderRow, Vec<OrderItem>)>,
    to: OrderStatus,
    at: DateTime<Utc>,
    event: impl Fn(&Order, EventSequence, DateTime<Utc>) -> E,
) -> Result<(Vec<Order>, Vec<Restock>), AppError> {
    let trace = TraceContext::current();
    let mut closed = Vec::with_capacity(held.len());
    let mut events = Vec::with_capacity(held.len());
    for (row, items) in held {
        // The number the write takes for the order, whose row this transaction holds.
        let sequence = row.event_sequence + 1;
        let order = OrderRow {
            status: to,
            cancelled_at: Some(at),
            ..row
        }
        .with_items(items);
        events.push(NewEvent::of(&event(&order, sequence, at), trace.clone())?);
        closed.push(order);
    }
    let restocks = close_batch::write(tx, &closed, to, at, events).await?;
    Ok((closed, restocks))
}
