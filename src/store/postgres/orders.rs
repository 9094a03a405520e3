//! Orders: stock and coupon reservation, and the reads of orders and their items. Closing open
//! orders (cancel, expiry) lives in `close_batch`, refunds in `refunds`.
//!
//! Invariants: stock never goes negative (conditional updates, plus the schema's CHECK); an
//! order either holds all its stock and its coupon or none (one transaction); a coupon backs at
//! most one live order. Locks are always taken in the same order (order row, then user coupon,
//! then products by ascending id) so concurrent transactions never deadlock. Refunds live in
//! `refunds`; the order rows and items read here carry what they refunded.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor, Row as _, postgres::PgRow};

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

/// The items of each order of the statement's CTE `o`, as parallel arrays (`it.*`) joined to
/// its row, so that a statement locking orders reads their items in the same round trip;
/// [`items_from_arrays`] reads them back. The items are also named by the array of `o`'s ids:
/// a write batch's plan is kept for the connection's life (`begin_batch`), and made while
/// `order_items` was small it could otherwise walk a whole index for each order.
macro_rules! item_arrays {
    () => {
        "LEFT JOIN LATERAL (
             SELECT array_agg(product_id ORDER BY product_id) AS item_products,
                 array_agg(product_name ORDER BY product_id) AS item_names,
                 array_agg(unit_price ORDER BY product_id) AS item_prices,
                 array_agg(quantity ORDER BY product_id) AS item_quantities,
                 array_agg(refunded_quantity ORDER BY product_id) AS item_refunded
             FROM order_items WHERE order_id = o.id AND order_id = ANY(ARRAY(SELECT id FROM o))
         ) it ON true"
    };
}
pub(super) use item_arrays;

/// The items of a row read with [`item_arrays`].
pub(super) fn items_from_arrays(row: &PgRow) -> Result<Vec<OrderItem>, StoreError> {
    let products: Option<Vec<ProductId>> = row.try_get("item_products")?;
    let names: Option<Vec<String>> = row.try_get("item_names")?;
    let prices: Option<Vec<Won>> = row.try_get("item_prices")?;
    let quantities: Option<Vec<i32>> = row.try_get("item_quantities")?;
    let refunded: Option<Vec<i32>> = row.try_get("item_refunded")?;
    Ok(products
        .unwrap_or_default()
        .into_iter()
        .zip(names.unwrap_or_default())
        .zip(prices.unwrap_or_default())
        .zip(quantities.unwrap_or_default())
        .zip(refunded.unwrap_or_default())
        .map(
            |((((product_id, name), unit_price), quantity), refunded_quantity)| OrderItem {
                product_id,
                name,
                unit_price,
                quantity,
                refunded_quantity,
            },
        )
        .collect())
}

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

/// Locks the order row for a state change made statement by statement (a refund; Pay, cancel
/// and expiry lock theirs in their batch statements).
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
    fn a_batch_takes_stock_per_product_in_ascending_order() {
        // Two orders of one batch: A takes products 5 and 1, B takes 2 and 5.
        let a = [item(5, 1), item(1, 2)];
        let b = [item(2, 3), item(5, 4)];
        let units = units_of(a.iter().chain(b.iter()));
        let units: Vec<(i64, i64)> = units.into_iter().map(|(p, n)| (p.get(), n)).collect();
        assert_eq!(units, vec![(1, 2), (2, 3), (5, 5)]);
    }
}
