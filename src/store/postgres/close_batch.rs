//! Closing open orders (cancel, expiry) in two statements and the commit, the shape of
//! [`super::pay_batch`]: [`lock`] locks the orders and every row their closing writes, and reads
//! their items; the caller checks them in Rust; [`write`] closes them, gives back their stock
//! and coupons and enqueues their events.
//!
//! Each statement is one round trip whatever the number of orders. Closing statement by
//! statement took, between BEGIN and COMMIT, one per order to read its items, one per coupon,
//! product and order given back, and two for the events: seven for a cancel of two products
//! with a coupon, over two hundred for an expiry batch of 100 orders, each waited for while the
//! batch held the orders' (and then hot products') row locks.
//!
//! Lock order: [`lock`] locks orders, then their coupons (ascending id), then their products
//! (ascending id), the global order of `src/store/postgres` (orders → balances → coupons →
//! products) that placing, Pay and refunds follow too, so closes never deadlock with them. As in
//! Pay's lock statement, the order within the statement is forced by the data flow, not by the
//! order the CTEs are written in: the coupons' key list reads every locked open order, and the
//! products' key list waits for the count of every locked coupon. The order holds across the
//! whole batch, not order by order: an expiry batch that gave back order A's product 5 before
//! order B's product 2 once deadlocked with an order being placed for products 2 and 5.
//! [`write`] then only touches rows the transaction already holds, in whatever order its plan
//! takes them.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row as _, postgres::PgRow};

use super::{
    orders::{OrderRow, item_arrays, items_from_arrays, order_columns},
    outbox::{EventColumns, NewEvent, insert_events},
};
use crate::{
    domain::{Order, OrderId, OrderItem, OrderStatus, ProductId, Restock, UserCouponId, UserId},
    store::StoreError,
};

/// Which orders [`lock`] takes.
#[derive(Clone, Copy, Debug)]
pub enum Closing {
    /// One order, whoever bought it and whatever its status (the caller tells why it may not be
    /// cancelled); its coupon and products are locked only if it is open and `buyer`'s.
    Cancel { order: OrderId, buyer: UserId },
    /// Up to `limit` open orders past their deadline, earliest deadline first, skipping those
    /// another transaction holds (a payment in progress, or another replica's expiry run).
    Overdue { limit: i64 },
}

/// The orders [`lock`] found, locked, with their items.
pub struct Locked {
    /// The transaction's time: the closing time the write records and the events report.
    pub now: DateTime<Utc>,
    pub orders: Vec<(OrderRow, Vec<OrderItem>)>,
}

/// The statement of [`lock`], for the orders selected (and locked) by `$orders`. `$2` is the
/// buyer an order must have for its coupon and products to be locked (NULL: any). The products
/// are counted (`products_locked`, read by no one) so that their CTE runs at all: Postgres
/// skips a CTE nothing reads, and its locks with it. Their items are read with `quantity`
/// (always positive): with only `product_id` and `order_id` asked, the product index (whose
/// third column is `order_id`) covers the read too, and a plan kept from when `order_items` was
/// small walked that index whole on every cancel (`tests/it/batch_plans.rs`).
macro_rules! lock_statement {
    ($orders:literal) => {
        concat!(
            "WITH o AS MATERIALIZED (SELECT ",
            order_columns!(),
            " FROM orders ",
            $orders,
            "),
             open AS (
                 SELECT id, user_coupon_id FROM o
                 WHERE status = 'PENDING_PAYMENT' AND user_id = coalesce($2, user_id)
             ),
             c AS MATERIALIZED (
                 SELECT id FROM user_coupons
                 WHERE id = ANY(ARRAY(SELECT user_coupon_id FROM open))
                 ORDER BY id FOR UPDATE
             ),
             p AS MATERIALIZED (
                 SELECT id FROM products
                 WHERE id = ANY(ARRAY(
                     SELECT product_id FROM order_items
                     WHERE order_id = ANY(ARRAY(SELECT id FROM open)) AND quantity > 0
                         AND (SELECT count(*) FROM c) >= 0))
                 ORDER BY id FOR UPDATE
             )
             SELECT now() AS now, (SELECT count(*) FROM p) AS products_locked, it.*, o.*
             FROM o ",
            item_arrays!(),
            " ORDER BY o.expires_at, o.id"
        )
    };
}

/// Locks the orders `closing` names and, for those open (and the buyer's, for a cancel), their
/// coupons and products, and reads their items and the transaction's time: one statement.
/// `None`: no order (an unknown id, or nothing overdue).
#[tracing::instrument(target = "otel", name = "orders.lock_closing", skip_all, fields(db.system = "postgresql"))]
pub async fn lock(tx: &mut PgConnection, closing: Closing) -> Result<Option<Locked>, StoreError> {
    let query = match closing {
        Closing::Cancel { order, buyer } => {
            sqlx::query(lock_statement!("WHERE id = $1 FOR UPDATE"))
                .bind(order)
                .bind(Some(buyer))
        }
        Closing::Overdue { limit } => sqlx::query(lock_statement!(
            "WHERE status = 'PENDING_PAYMENT' AND expires_at <= now()
             ORDER BY expires_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED"
        ))
        .bind(limit)
        .bind(None::<UserId>),
    };
    let rows: Vec<PgRow> = query.fetch_all(&mut *tx).await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let now = first.try_get("now")?;
    let orders = rows
        .iter()
        .map(|row| Ok((sqlx::FromRow::from_row(row)?, items_from_arrays(row)?)))
        .collect::<Result<_, StoreError>>()?;
    Ok(Some(Locked { now, orders }))
}

/// Closes `orders` (locked by [`lock`] and checked open) as `to` at `at`, in one statement:
/// each order's status, closing time and next event number (the one its event in `events`
/// carries: the locked row's number + 1); its coupon back from RESERVED to AVAILABLE; its
/// stock back, once per product (`stock + units`, and `stock_gen + 1` so that sold-out
/// markers from before are refused); the events in the outbox. The stock given back is summed
/// from the items of the orders the statement closed, so an order it did not close gives
/// nothing back; an order left open fails the call, and the transaction must then roll back.
/// Returns the products restocked with their new generation, for clearing their markers.
///
/// Each join also names its keys with `= ANY(...)`: the planner cannot see the size of a CTE's
/// result and would otherwise scan a large table to hash it.
#[tracing::instrument(target = "otel", name = "orders.close_batch", skip_all, fields(db.system = "postgresql"))]
pub async fn write(
    tx: &mut PgConnection,
    orders: &[Order],
    to: OrderStatus,
    at: DateTime<Utc>,
    events: Vec<NewEvent>,
) -> Result<Vec<Restock>, StoreError> {
    let ids: Vec<OrderId> = orders.iter().map(|o| o.id).collect();
    let coupons: Vec<UserCouponId> = orders.iter().filter_map(|o| o.user_coupon_id).collect();
    let mut products: Vec<ProductId> = orders
        .iter()
        .flat_map(|o| o.items.iter().map(|i| i.product_id))
        .collect();
    products.sort_unstable();
    products.dedup();
    let events = EventColumns::of(events);
    let row = events
        .bind(sqlx::query(concat!(
            "WITH closed AS (
                 UPDATE orders o SET status = $8, cancelled_at = $9,
                     event_sequence = o.event_sequence + 1
                 WHERE o.id = ANY($10) AND o.status = 'PENDING_PAYMENT'
                 RETURNING o.id, o.user_coupon_id
             ),
             freed AS (
                 UPDATE user_coupons uc SET status = 'AVAILABLE', order_id = NULL
                 FROM closed c
                 WHERE uc.id = c.user_coupon_id AND uc.order_id = c.id AND uc.status = 'RESERVED'
                     AND uc.id = ANY($11)
             ),
             held AS (
                 SELECT i.product_id, sum(i.quantity)::bigint AS units
                 FROM order_items i JOIN closed c ON c.id = i.order_id
                 WHERE i.order_id = ANY($10)
                 GROUP BY i.product_id
             ),
             restocked AS (
                 UPDATE products p SET stock = p.stock + h.units, stock_gen = p.stock_gen + 1,
                     updated_at = now()
                 FROM held h
                 WHERE p.id = h.product_id AND p.id = ANY($12)
                 RETURNING p.id, p.stock_gen
             ),
             events AS (",
            insert_events!(),
            ")
             SELECT (SELECT count(*) FROM closed) AS closed,
                 ARRAY(SELECT id FROM restocked ORDER BY id) AS products,
                 ARRAY(SELECT stock_gen FROM restocked ORDER BY id) AS stock_gens",
        )))
        .bind(to)
        .bind(at)
        .bind(&ids)
        .bind(&coupons)
        .bind(&products)
        .fetch_one(&mut *tx)
        .await?;
    let closed: i64 = row.try_get("closed")?;
    let restocked: Vec<ProductId> = row.try_get("products")?;
    let stock_gens: Vec<i64> = row.try_get("stock_gens")?;
    // Both hold unless a row changed under a lock this transaction holds: a bug to stop at,
    // not a close to half-make.
    if closed != ids.len() as i64 || restocked != products {
        return Err(StoreError::Inconsistent(format!(
            "closing orders {ids:?} closed {closed} and restocked {restocked:?} of {products:?}"
        )));
    }
    Ok(restocked
        .into_iter()
        .zip(stock_gens)
        .map(|(product, stock_gen)| Restock { product, stock_gen })
        .collect())
}
