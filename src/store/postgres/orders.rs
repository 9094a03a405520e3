//! Orders: stock reservation, coupon reservation and release.
//!
//! Invariants: stock never goes negative (conditional updates, plus the schema's CHECK); an
//! order either holds all its stock and its coupon or none (one transaction); a coupon backs at
//! most one live order. Locks are always taken in the same order (order row, then user coupon,
//! then products by ascending id) so concurrent transactions never deadlock. Refunds live in
//! `refunds`; the order rows and items read here carry what they refunded.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use crate::{
    domain::{
        EventSequence, Order, OrderId, OrderItem, OrderLine, OrderStatus, Pricing, ProductId,
        ProductStatus, Restock, UserCouponId, UserId, Won,
    },
    store::StoreError,
};

macro_rules! order_columns {
    () => {
        "id, user_id, status, total_amount, discount_amount, final_amount, refunded_amount,
         user_coupon_id, created_at, expires_at, paid_at, cancelled_at, event_sequence"
    };
}
pub(super) use order_columns;

/// An order row without its items.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct OrderRow {
    pub id: OrderId,
    pub user_id: UserId,
    pub status: OrderStatus,
    pub total_amount: Won,
    pub discount_amount: Won,
    pub final_amount: Won,
    pub refunded_amount: Won,
    pub user_coupon_id: Option<UserCouponId>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
    /// The number of the order's last event (placing is 1).
    pub event_sequence: EventSequence,
}

impl OrderRow {
    pub fn with_items(self, items: Vec<OrderItem>) -> Order {
        Order {
            id: self.id,
            user_id: self.user_id,
            status: self.status,
            items,
            pricing: Pricing {
                total: self.total_amount,
                discount: self.discount_amount,
                final_amount: self.final_amount,
            },
            refunded: self.refunded_amount,
            user_coupon_id: self.user_coupon_id,
            created_at: self.created_at,
            expires_at: self.expires_at,
            paid_at: self.paid_at,
            cancelled_at: self.cancelled_at,
        }
    }
}

/// Why a line could not be reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineRefusal {
    NoProduct(ProductId),
    NotSelling(ProductId),
    /// Not enough stock; `left` is what there is, at stock generation `stock_gen`.
    OutOfStock {
        product: ProductId,
        left: i64,
        stock_gen: i64,
    },
}

/// A product row as orders see it, locked by the reading transaction.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct StockRow {
    pub id: ProductId,
    pub name: String,
    pub price: Won,
    pub stock: i64,
    pub status: ProductStatus,
    pub stock_gen: i64,
}

impl StockRow {
    /// Takes `line.quantity` units if the product is on sale and has them (the rules of the
    /// conditional `UPDATE ... WHERE status = 'SELLING' AND stock >= $n`), and returns the
    /// item as priced now.
    pub fn reserve(&mut self, line: &OrderLine) -> Result<OrderItem, LineRefusal> {
        let units = i64::from(line.quantity.get());
        if self.status != ProductStatus::Selling {
            return Err(LineRefusal::NotSelling(self.id));
        }
        if self.stock < units {
            return Err(LineRefusal::OutOfStock {
                product: self.id,
                left: self.stock,
                stock_gen: self.stock_gen,
            });
        }
        self.stock -= units;
        Ok(OrderItem {
            product_id: self.id,
            name: self.name.clone(),
            unit_price: self.price,
            quantity: line.quantity.get(),
            refunded_quantity: 0,
        })
    }
}

pub async fn items(db: impl PgExecutor<'_>, order: OrderId) -> Result<Vec<OrderItem>, StoreError> {
    let items = sqlx::query_as(
        "SELECT product_id, product_name AS name, unit_price, quantity, refunded_quantity
         FROM order_items WHERE order_id = $1 ORDER BY product_id",
    )
    .bind(order)
    .fetch_all(db)
    .await?;
    Ok(items)
}

pub async fn get(conn: &mut PgConnection, id: OrderId) -> Result<Option<Order>, StoreError> {
    let row: Option<OrderRow> = sqlx::query_as(concat!(
        "SELECT ",
        order_columns!(),
        " FROM orders WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(row) => {
            let items = items(&mut *conn, id).await?;
            Ok(Some(row.with_items(items)))
        }
        None => Ok(None),
    }
}

/// The buyer of an order, read without a lock (it never changes).
pub async fn buyer(db: impl PgExecutor<'_>, id: OrderId) -> Result<Option<UserId>, StoreError> {
    let buyer = sqlx::query_scalar("SELECT user_id FROM orders WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await?;
    Ok(buyer)
}

/// Locks the order row for a state change (pay, cancel, expire, refund).
#[tracing::instrument(target = "otel", name = "orders.lock", skip_all, fields(db.system = "postgresql"))]
pub async fn lock(tx: &mut PgConnection, id: OrderId) -> Result<Option<OrderRow>, StoreError> {
    let row = sqlx::query_as(concat!(
        "SELECT ",
        order_columns!(),
        " FROM orders WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(tx)
    .await?;
    Ok(row)
}

/// What closing open orders gave back.
pub struct Released {
    /// The closed rows, in the order given.
    pub orders: Vec<OrderRow>,
    /// The products whose stock went up, with their new stock generation.
    pub restocks: Vec<Restock>,
}

/// Closes PENDING_PAYMENT orders as CANCELLED or EXPIRED, giving their coupons and their stock
/// back. The order rows must be locked by this transaction.
///
/// Locks follow the global order (orders, then coupons, then products by ascending id) across
/// the whole batch, not order by order: an expiry batch that gave back order A's product 5
/// before order B's product 2 deadlocked with an order being placed for products 2 and 5.
#[tracing::instrument(target = "otel", name = "orders.release", skip_all, fields(db.system = "postgresql"))]
pub async fn release(
    tx: &mut PgConnection,
    orders: &[(&OrderRow, &[OrderItem])],
    to: OrderStatus,
) -> Result<Released, StoreError> {
    let mut coupons: Vec<(UserCouponId, OrderId)> = orders
        .iter()
        .filter_map(|(order, _)| order.user_coupon_id.map(|c| (c, order.id)))
        .collect();
    coupons.sort_unstable();
    for (coupon, order) in coupons {
        sqlx::query(
            "UPDATE user_coupons SET status = 'AVAILABLE', order_id = NULL
             WHERE id = $1 AND order_id = $2 AND status = 'RESERVED'",
        )
        .bind(coupon)
        .bind(order)
        .execute(&mut *tx)
        .await?;
    }
    let units = units_of(orders.iter().flat_map(|(_, items)| items.iter()));
    let restocks = restock(tx, &units).await?;
    let mut closed = Vec::with_capacity(orders.len());
    for (order, _) in orders {
        let row = sqlx::query_as(concat!(
            "UPDATE orders SET status = $2, cancelled_at = now()
             WHERE id = $1 AND status = 'PENDING_PAYMENT'
             RETURNING ",
            order_columns!()
        ))
        .bind(order.id)
        .bind(to)
        .fetch_one(&mut *tx)
        .await?;
        closed.push(row);
    }
    Ok(Released {
        orders: closed,
        restocks,
    })
}

/// Puts `units` back in stock (by ascending product id, as given: the last step of the global
/// lock order), bumping each product's stock generation so that a sold-out marker from before
/// is refused. Returns the products with their new generation, for clearing their markers.
pub async fn restock(
    tx: &mut PgConnection,
    units: &[(ProductId, i64)],
) -> Result<Vec<Restock>, StoreError> {
    let mut restocks = Vec::with_capacity(units.len());
    for &(product, units) in units {
        let stock_gen: i64 = sqlx::query_scalar(
            "UPDATE products SET stock = stock + $2, stock_gen = stock_gen + 1, updated_at = now()
             WHERE id = $1
             RETURNING stock_gen",
        )
        .bind(product)
        .bind(units)
        .fetch_one(&mut *tx)
        .await?;
        restocks.push(Restock { product, stock_gen });
    }
    Ok(restocks)
}

/// Takes the next event number of each of `orders`, whose rows this transaction must hold
/// locked for the transition the events report; returns them in the order given.
#[tracing::instrument(target = "otel", name = "orders.next_event_sequences", skip_all, fields(db.system = "postgresql"))]
pub async fn next_event_sequences(
    tx: &mut PgConnection,
    orders: &[OrderId],
) -> Result<Vec<EventSequence>, StoreError> {
    let taken: BTreeMap<OrderId, EventSequence> = sqlx::query_as(
        "UPDATE orders SET event_sequence = event_sequence + 1
         WHERE id = ANY($1)
         RETURNING id, event_sequence",
    )
    .bind(orders)
    .fetch_all(tx)
    .await?
    .into_iter()
    .collect();
    orders
        .iter()
        .map(|id| {
            taken
                .get(id)
                .copied()
                .ok_or_else(|| StoreError::Inconsistent(format!("order {id} has no row")))
        })
        .collect()
}

/// The units of `items` per product, by ascending product id: the order every transaction
/// locks products in.
pub(super) fn units_of<'a>(items: impl Iterator<Item = &'a OrderItem>) -> Vec<(ProductId, i64)> {
    let mut units = BTreeMap::new();
    for item in items {
        *units.entry(item.product_id).or_insert(0) += i64::from(item.quantity);
    }
    units.into_iter().collect()
}

/// Open orders past their deadline, locked, skipping those another transaction holds (a
/// payment in progress, or another replica's expiry run).
#[tracing::instrument(target = "otel", name = "orders.lock_overdue", skip_all, fields(db.system = "postgresql"))]
pub async fn lock_overdue(tx: &mut PgConnection, limit: i64) -> Result<Vec<OrderRow>, StoreError> {
    let rows = sqlx::query_as(concat!(
        "SELECT ",
        order_columns!(),
        " FROM orders
         WHERE status = 'PENDING_PAYMENT' AND expires_at <= now()
         ORDER BY expires_at
         LIMIT $1
         FOR UPDATE SKIP LOCKED"
    ))
    .bind(limit)
    .fetch_all(tx)
    .await?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(product: i64, quantity: i32) -> OrderItem {
        OrderItem {
            product_id: ProductId::parse(product, "product_id").unwrap(),
            name: format!("product {product}"),
            unit_price: Won::new(1_000),
            quantity,
            refunded_quantity: 0,
        }
    }

    #[test]
    fn a_batch_gives_stock_back_in_ascending_product_order() {
        // Two expiring orders: A holds products 5 and 1, B holds 2 and 5.
        let a = [item(5, 1), item(1, 2)];
        let b = [item(2, 3), item(5, 4)];
        let units = units_of(a.iter().chain(b.iter()));
        let units: Vec<(i64, i64)> = units.into_iter().map(|(p, n)| (p.get(), n)).collect();
        assert_eq!(units, vec![(1, 2), (2, 3), (5, 5)]);
    }
}
