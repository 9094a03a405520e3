//! A batch of new orders in two statements and the commit: [`lock`] claims the keys, locks the
//! coupons and products the orders name and reads the callers' balances; the caller decides in
//! Rust; [`write`] makes every write of the accepted orders and settles the keys.
//!
//! Each statement is one round trip, whatever the batch's size: a batch made up to seven (one
//! per step, each waiting for the last), and the hot product rows stayed locked through all
//! the writes that followed their lock, each a round trip.
//!
//! Lock order: coupons (ascending id), then products (ascending id): the tail of the global
//! order of `src/store/postgres` (orders → balances → coupons → products; see
//! [`super::pay_batch`]). Balances are only read: Pay deducts conditionally, so a placed
//! order's balance check is advice to the buyer, not the guard of the balance. Within one
//! statement the order is forced by the data flow: the products' key list is computed under a
//! filter that counts every locked coupon, so it can only be read once all the coupons are
//! locked. A request whose key is busy, replayed or reused has no row locked at all.
//!
//! Both statements run in the caller's transaction and commit nothing: a caller that goes away
//! at either await drops the transaction, which rolls back the claims, the locks and any write.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row as _, postgres::PgRow};

use super::{
    coupons::{UserCouponRow, user_coupon_columns},
    idempotency::{
        BatchClaim, ClaimRow, Operation, SettleColumns, claim_columns, claim_ctes, settle_ctes,
    },
    orders::{StockRow, units_of},
    outbox::{EventColumns, NewEvent, insert_events},
};
use crate::{
    domain::{
        IdempotencyKey, Order, OrderId, OrderLine, ProductId, ProductStatus, UserCoupon,
        UserCouponId, UserId, Won,
    },
    store::StoreError,
};

/// One order asked of a batch.
pub struct PlaceRequest<'a> {
    pub user_id: UserId,
    /// With the request's fingerprint; `None` for an order whose key its caller claimed.
    pub key: Option<(&'a IdempotencyKey, &'a str)>,
    pub user_coupon_id: Option<UserCouponId>,
    pub lines: &'a [OrderLine],
}

/// What [`lock`] found for one request.
pub struct Found {
    /// How its key was claimed (`None`: no key).
    pub claim: Option<BatchClaim>,
    /// An order id reserved for it, if it is still open (no key, or a key claimed here).
    /// Refused orders leave a gap.
    pub order_id: Option<OrderId>,
    /// The caller's balance, read without a lock, if it is still open and they have a row.
    pub balance: Option<Won>,
}

/// What [`lock`] found for a batch.
pub struct Locked {
    /// The transaction's time: the orders' `created_at`.
    pub now: DateTime<Utc>,
    /// One per request, in order.
    pub found: Vec<Found>,
    /// The coupons the open requests name, locked, with their terms (unknown ids left out).
    pub coupons: Vec<UserCoupon>,
    /// The products the open requests name, locked (unknown ids left out).
    pub products: Vec<StockRow>,
}

/// Claims the requests' keys without waiting (unless `wait`: a call running alone, whose keys
/// must be free of other claims first), then, for the requests still open, locks their coupons
/// and their products (in the module's lock order), reads their callers' balances and reserves
/// an order id for each: one statement.
///
/// The claim is [`super::idempotency::claim_ctes`]'s; a key must appear once among `requests`.
#[tracing::instrument(target = "otel", name = "orders.lock_batch", skip_all, fields(db.system = "postgresql"))]
pub async fn lock(
    tx: &mut PgConnection,
    requests: &[PlaceRequest<'_>],
    wait: bool,
) -> Result<Locked, StoreError> {
    let columns = claim_columns(
        tx,
        Operation::PlaceOrder,
        requests.iter().map(|r| (r.user_id, r.key)),
        wait,
    )
    .await?;
    let coupons: Vec<Option<UserCouponId>> = requests.iter().map(|r| r.user_coupon_id).collect();
    let (line_ords, line_products): (Vec<i64>, Vec<ProductId>) = (1_i64..)
        .zip(requests)
        .flat_map(|(ord, r)| r.lines.iter().map(move |l| (ord, l.product_id)))
        .unzip();
    let rows: Vec<PgRow> = sqlx::query(concat!(
        "WITH req AS (
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $6::bigint[])
                 WITH ORDINALITY AS r(user_id, key, fingerprint, coupon, ord)
         ), ",
        claim_ctes!(),
        ", open AS (SELECT * FROM claim WHERE key IS NULL OR fresh),
         lines AS (
             SELECT l.* FROM unnest($7::bigint[], $8::bigint[]) AS l(ord, product_id)
             JOIN open USING (ord)
         ),
         uc AS MATERIALIZED (
             SELECT ",
        user_coupon_columns!(),
        " FROM user_coupons uc JOIN coupons c ON c.id = uc.coupon_id
             WHERE uc.id = ANY(ARRAY(SELECT coupon FROM open))
             ORDER BY uc.id FOR UPDATE OF uc
         ),
         p AS MATERIALIZED (
             SELECT id, name, price, stock, status, stock_gen FROM products
             WHERE id = ANY(ARRAY(
                 SELECT product_id FROM lines WHERE (SELECT count(*) FROM uc) >= 0))
             ORDER BY id FOR UPDATE
         ),
         ids AS MATERIALIZED (
             SELECT ord, nextval(pg_get_serial_sequence('orders', 'id')) AS new_order_id
             FROM (SELECT ord FROM open ORDER BY ord) o
         ),
         b AS (
             SELECT user_id, balance FROM user_balances
             WHERE user_id = ANY(ARRAY(SELECT user_id FROM open))
         )
         SELECT c.got, c.fresh, c.stored, c.result, now() AS now, ids.new_order_id, b.balance,
             pl.*, uc.*
         FROM claim c
         LEFT JOIN ids USING (ord)
         LEFT JOIN b ON b.user_id = c.user_id AND ids.ord IS NOT NULL
         LEFT JOIN uc ON uc.id = c.coupon AND ids.ord IS NOT NULL
         LEFT JOIN LATERAL (
             SELECT array_agg(p.id ORDER BY p.id) AS p_ids,
                 array_agg(p.name ORDER BY p.id) AS p_names,
                 array_agg(p.price ORDER BY p.id) AS p_prices,
                 array_agg(p.stock ORDER BY p.id) AS p_stocks,
                 array_agg(p.status ORDER BY p.id) AS p_statuses,
                 array_agg(p.stock_gen ORDER BY p.id) AS p_gens
             FROM lines l JOIN p ON p.id = l.product_id
             WHERE l.ord = c.ord
         ) pl ON true
         ORDER BY c.ord"
    ))
    .bind(&columns.users)
    .bind(&columns.keys)
    .bind(&columns.fingerprints)
    .bind(Operation::PlaceOrder.as_str())
    .bind(wait)
    .bind(&coupons)
    .bind(&line_ords)
    .bind(&line_products)
    .fetch_all(&mut *tx)
    .await?;
    if rows.len() != requests.len() {
        return Err(StoreError::Inconsistent(format!(
            "{} orders locked {} rows",
            requests.len(),
            rows.len()
        )));
    }
    let mut now = None;
    let mut found = Vec::with_capacity(rows.len());
    let mut coupons = BTreeMap::new();
    let mut products = BTreeMap::new();
    for (row, request) in rows.iter().zip(requests) {
        now = Some(row.try_get("now")?);
        found.push(Found {
            claim: ClaimRow::of(row, request.key)?,
            order_id: row.try_get("new_order_id")?,
            balance: row.try_get("balance")?,
        });
        if row.try_get::<Option<UserCouponId>, _>("id")?.is_some() {
            let coupon: UserCouponRow = sqlx::FromRow::from_row(row)?;
            let coupon = coupon.into_user_coupon()?;
            coupons.insert(coupon.id, coupon);
        }
        for product in stock_rows(row)? {
            products.insert(product.id, product);
        }
    }
    let now = now.ok_or_else(|| StoreError::Inconsistent("a batch of no orders".into()))?;
    Ok(Locked {
        now,
        found,
        coupons: coupons.into_values().collect(),
        products: products.into_values().collect(),
    })
}

/// The products of a row of [`lock`], from its parallel arrays.
fn stock_rows(row: &PgRow) -> Result<Vec<StockRow>, StoreError> {
    let ids: Option<Vec<ProductId>> = row.try_get("p_ids")?;
    let names: Option<Vec<String>> = row.try_get("p_names")?;
    let prices: Option<Vec<Won>> = row.try_get("p_prices")?;
    let stocks: Option<Vec<i64>> = row.try_get("p_stocks")?;
    let statuses: Option<Vec<ProductStatus>> = row.try_get("p_statuses")?;
    let gens: Option<Vec<i64>> = row.try_get("p_gens")?;
    Ok(ids
        .unwrap_or_default()
        .into_iter()
        .zip(names.unwrap_or_default())
        .zip(prices.unwrap_or_default())
        .zip(stocks.unwrap_or_default())
        .zip(statuses.unwrap_or_default())
        .zip(gens.unwrap_or_default())
        .map(
            |(((((id, name), price), stock), status), stock_gen)| StockRow {
                id,
                name,
                price,
                stock,
                status,
                stock_gen,
            },
        )
        .collect())
}

/// Writes a batch's orders and settles its keys, in one statement: each product's stock taken
/// once (`stock - sum` over the orders; the stock generation is left alone, as only a restock
/// changes it), every order (with the id [`lock`] reserved for it and its times) and item
/// row, the coupon reservations, the orders' `events`, and under each key claimed for
/// `operation` its order's id (`Some`) or nothing: the key given back (`None`). The products
/// and coupons must be locked by this transaction and the orders checked against them.
///
/// Each join with the request arrays also names its keys with `= ANY(...)`: the planner
/// cannot see an UNNEST's size and would otherwise scan a large table to hash it.
#[tracing::instrument(target = "otel", name = "orders.write_batch", skip_all, fields(db.system = "postgresql"))]
pub async fn write(
    tx: &mut PgConnection,
    orders: &[Order],
    events: Vec<NewEvent>,
    operation: Operation,
    keys: &[(UserId, &IdempotencyKey, Option<i64>)],
) -> Result<(), StoreError> {
    let (stock_ids, stock_units): (Vec<ProductId>, Vec<i64>) =
        units_of(orders.iter().flat_map(|o| o.items.iter()))
            .into_iter()
            .unzip();
    let ids: Vec<OrderId> = orders.iter().map(|o| o.id).collect();
    let users: Vec<UserId> = orders.iter().map(|o| o.user_id).collect();
    let totals: Vec<Won> = orders.iter().map(|o| o.pricing.total).collect();
    let discounts: Vec<Won> = orders.iter().map(|o| o.pricing.discount).collect();
    let finals: Vec<Won> = orders.iter().map(|o| o.pricing.final_amount).collect();
    let coupons: Vec<Option<UserCouponId>> = orders.iter().map(|o| o.user_coupon_id).collect();
    let created: Vec<DateTime<Utc>> = orders.iter().map(|o| o.created_at).collect();
    let expires: Vec<DateTime<Utc>> = orders.iter().map(|o| o.expires_at).collect();
    let mut item_orders = Vec::new();
    let mut item_products = Vec::new();
    let mut item_names = Vec::new();
    let mut item_prices = Vec::new();
    let mut item_quantities = Vec::new();
    for order in orders {
        for item in &order.items {
            item_orders.push(order.id);
            item_products.push(item.product_id);
            item_names.push(item.name.as_str());
            item_prices.push(item.unit_price);
            item_quantities.push(item.quantity);
        }
    }
    let keys = SettleColumns::of(keys);
    let events = EventColumns::of(events);
    let query = sqlx::query(concat!(
        "WITH o AS (
             INSERT INTO orders (id, user_id, status, total_amount, discount_amount,
                 final_amount, user_coupon_id, created_at, expires_at)
             OVERRIDING SYSTEM VALUE
             SELECT r.id, r.user_id, 'PENDING_PAYMENT', r.total, r.discount, r.final, r.coupon,
                 r.created_at, r.expires_at
             FROM unnest($8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[],
                 $12::bigint[], $13::bigint[], $14::timestamptz[], $15::timestamptz[])
                 AS r(id, user_id, total, discount, final, coupon, created_at, expires_at)
             RETURNING id
         ),
         items AS (
             INSERT INTO order_items (order_id, product_id, product_name, unit_price, quantity)
             SELECT * FROM unnest($16::bigint[], $17::bigint[], $18::text[], $19::bigint[],
                 $20::int[])
         ),
         stock AS (
             UPDATE products p SET stock = p.stock - d.units, updated_at = now()
             FROM unnest($21::bigint[], $22::bigint[]) AS d(id, units)
             WHERE p.id = d.id AND p.id = ANY($21)
         ),
         reserved AS (
             UPDATE user_coupons uc SET status = 'RESERVED', order_id = r.id
             FROM unnest($8::bigint[], $13::bigint[]) AS r(id, coupon)
             WHERE uc.id = r.coupon AND uc.id = ANY($13)
         ),
         events AS (",
        insert_events!(),
        "), ",
        settle_ctes!("$23", "$24", "$25", "$26"),
        " SELECT count(*) FROM o"
    ));
    let query = events
        .bind(query)
        .bind(&ids)
        .bind(&users)
        .bind(&totals)
        .bind(&discounts)
        .bind(&finals)
        .bind(&coupons)
        .bind(&created)
        .bind(&expires)
        .bind(&item_orders)
        .bind(&item_products)
        .bind(&item_names)
        .bind(&item_prices)
        .bind(&item_quantities)
        .bind(&stock_ids)
        .bind(&stock_units);
    let written: i64 = keys
        .bind(query)
        .bind(operation.as_str())
        .fetch_one(tx)
        .await?
        .try_get(0)?;
    if written as usize != orders.len() {
        return Err(StoreError::Inconsistent(format!(
            "{written} orders written for {}",
            orders.len()
        )));
    }
    Ok(())
}
