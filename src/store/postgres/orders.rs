//! Orders: stock reservation, coupon reservation and release.
//!
//! Invariants: stock never goes negative (conditional updates, plus the schema's CHECK); an
//! order either holds all its stock and its coupon or none (one transaction); a coupon backs at
//! most one live order. Locks are always taken in the same order (order row, then user coupon,
//! then products by ascending id) so concurrent transactions never deadlock.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use crate::{
    domain::{
        IdempotencyKey, Order, OrderId, OrderItem, OrderLine, OrderStatus, Pricing, ProductId,
        ProductStatus, Restock, UserCouponId, UserId, Won,
    },
    store::{StoreError, postgres::idempotency::Operation},
};

macro_rules! order_columns {
    () => {
        "id, user_id, status, total_amount, discount_amount, final_amount, user_coupon_id,
         created_at, expires_at, paid_at, cancelled_at"
    };
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
    pub user_coupon_id: Option<UserCouponId>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
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

/// Takes `line.quantity` units out of stock if the product is on sale and has them; returns the
/// product's name and price at that moment (the order is priced with these).
#[tracing::instrument(target = "otel", name = "orders.reserve_line", skip_all, fields(db.system = "postgresql"))]
pub async fn reserve_line(
    tx: &mut PgConnection,
    line: &OrderLine,
) -> Result<Result<OrderItem, LineRefusal>, StoreError> {
    let reserved: Option<(String, Won)> = sqlx::query_as(
        "UPDATE products SET stock = stock - $2, updated_at = now()
         WHERE id = $1 AND status = 'SELLING' AND stock >= $2
         RETURNING name, price",
    )
    .bind(line.product_id)
    .bind(i64::from(line.quantity.get()))
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((name, unit_price)) = reserved {
        return Ok(Ok(OrderItem {
            product_id: line.product_id,
            name,
            unit_price,
            quantity: line.quantity.get(),
        }));
    }
    let found: Option<(ProductStatus, i64, i64)> =
        sqlx::query_as("SELECT status, stock, stock_gen FROM products WHERE id = $1")
            .bind(line.product_id)
            .fetch_optional(&mut *tx)
            .await?;
    Ok(Err(match found {
        None => LineRefusal::NoProduct(line.product_id),
        Some((ProductStatus::Selling, left, stock_gen)) => LineRefusal::OutOfStock {
            product: line.product_id,
            left,
            stock_gen,
        },
        Some(_) => LineRefusal::NotSelling(line.product_id),
    }))
}

pub struct NewOrder<'a> {
    pub user_id: UserId,
    pub items: &'a [OrderItem],
    pub pricing: Pricing,
    pub user_coupon_id: Option<UserCouponId>,
    pub ttl_secs: f64,
    /// Records the order as the result of this call's key in the same statement.
    pub idempotency_key: Option<(Operation, &'a IdempotencyKey)>,
}

/// Writes the order, its items, the coupon reservation and the idempotency result in one
/// statement (one round trip while the product rows are locked).
#[tracing::instrument(target = "otel", name = "orders.insert", skip_all, fields(db.system = "postgresql"))]
pub async fn insert(tx: &mut PgConnection, new: NewOrder<'_>) -> Result<Order, StoreError> {
    let product_ids: Vec<ProductId> = new.items.iter().map(|i| i.product_id).collect();
    let names: Vec<&str> = new.items.iter().map(|i| i.name.as_str()).collect();
    let prices: Vec<Won> = new.items.iter().map(|i| i.unit_price).collect();
    let quantities: Vec<i32> = new.items.iter().map(|i| i.quantity).collect();
    let row: OrderRow = sqlx::query_as(concat!(
        "WITH o AS (
             INSERT INTO orders (user_id, status, total_amount, discount_amount, final_amount,
                 user_coupon_id, expires_at)
             VALUES ($1, 'PENDING_PAYMENT', $2, $3, $4, $5, now() + make_interval(secs => $6))
             RETURNING ",
        order_columns!(),
        "),
         items AS (
             INSERT INTO order_items (order_id, product_id, product_name, unit_price, quantity)
             SELECT o.id, i.product_id, i.name, i.price, i.quantity
             FROM o, unnest($7::bigint[], $8::text[], $9::bigint[], $10::int[])
                 AS i(product_id, name, price, quantity)
         ),
         coupon AS (
             UPDATE user_coupons SET status = 'RESERVED', order_id = o.id
             FROM o WHERE user_coupons.id = $5
         ),
         idem AS (
             UPDATE idempotency_keys SET result_id = o.id
             FROM o
             WHERE idempotency_keys.user_id = $1 AND operation = $12
                 AND idempotency_key = $11
         )
         SELECT * FROM o"
    ))
    .bind(new.user_id)
    .bind(new.pricing.total)
    .bind(new.pricing.discount)
    .bind(new.pricing.final_amount)
    .bind(new.user_coupon_id)
    .bind(new.ttl_secs)
    .bind(&product_ids)
    .bind(&names)
    .bind(&prices)
    .bind(&quantities)
    .bind(new.idempotency_key.map(|(_, key)| key.as_str()))
    .bind(new.idempotency_key.map(|(operation, _)| operation.as_str()))
    .fetch_one(&mut *tx)
    .await?;
    Ok(row.with_items(new.items.to_vec()))
}

pub async fn items(db: impl PgExecutor<'_>, order: OrderId) -> Result<Vec<OrderItem>, StoreError> {
    let items = sqlx::query_as(
        "SELECT product_id, product_name AS name, unit_price, quantity
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

/// Locks the order row for a state change (pay, cancel, expire).
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
    let mut restocks = Vec::new();
    for (product, units) in units_to_return(orders.iter().flat_map(|(_, items)| items.iter())) {
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

/// The units to put back per product, by ascending product id: the order every transaction
/// locks products in.
fn units_to_return<'a>(items: impl Iterator<Item = &'a OrderItem>) -> Vec<(ProductId, i64)> {
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
        }
    }

    #[test]
    fn a_batch_gives_stock_back_in_ascending_product_order() {
        // Two expiring orders: A holds products 5 and 1, B holds 2 and 5.
        let a = [item(5, 1), item(1, 2)];
        let b = [item(2, 3), item(5, 4)];
        let units = units_to_return(a.iter().chain(b.iter()));
        let units: Vec<(i64, i64)> = units.into_iter().map(|(p, n)| (p.get(), n)).collect();
        assert_eq!(units, vec![(1, 2), (2, 3), (5, 5)]);
    }
}
