//! Pages of orders, newest first, with their items.
//!
//! Invariant: a page is the first `n` orders of the filter below its cursor in the order
//! (created_at DESC, id DESC), read by one statement (one snapshot: an order and its items as
//! they were at one instant), and every filter walks an index in that order, so a page reads
//! about its own rows whatever the table holds (docs/QUERY_PLANS.md):
//! - by status (every status when none is asked): one backward scan per status of
//!   `orders_user_status_created_idx` (with a buyer) or `orders_status_created_idx`, each
//!   stopping after `n` rows, merged; a creation range and the cursor bound the scans;
//! - by product: a backward scan of `order_items_product_created_idx` (an item's created_at is
//!   its order's), each order then read by its key and checked against the other filters.
//!
//! The parameters are bound as `NULL` when a filter is not set; the pool's connections plan
//! every execution for its values (`plan_cache_mode = force_custom_plan`), so a filter not set
//! costs nothing and the plan uses the index its filters call for.

use sqlx::PgExecutor;

use super::orders::{OrderRow, order_columns};
use crate::{
    domain::{CreatedCursor, Order, OrderFilter, OrderItem, PageSize, ProductId, Won},
    store::StoreError,
};

/// The page's orders, each with its items (one row per item), newest first.
macro_rules! with_items {
    () => {
        "SELECT page.*, i.product_id AS item_product_id, i.product_name AS item_name,
             i.unit_price AS item_unit_price, i.quantity AS item_quantity
         FROM page LEFT JOIN order_items i ON i.order_id = page.id
         ORDER BY page.created_at DESC, page.id DESC, i.product_id"
    };
}

/// The bounds every shape shares: $1 statuses kept, $2 buyer, $3..$4 creation range, $5..$6
/// cursor, $7 rows to read (a page and one more, to know whether another page follows).
macro_rules! page_by_status {
    () => {
        concat!(
            "WITH page AS (
                 SELECT o.* FROM unnest($1::text[]) AS s(status)
                 CROSS JOIN LATERAL (
                     SELECT ",
            order_columns!(),
            " FROM orders
                     WHERE status = s.status
                         AND ($2::bigint IS NULL OR user_id = $2)
                         AND ($3::timestamptz IS NULL OR created_at >= $3)
                         AND ($4::timestamptz IS NULL OR created_at < $4)
                         AND ($5::timestamptz IS NULL OR (created_at, id) < ($5, $6))
                     ORDER BY created_at DESC, id DESC
                     LIMIT $7
                 ) o
                 ORDER BY o.created_at DESC, o.id DESC
                 LIMIT $7
             )",
            with_items!()
        )
    };
}

/// $8: the product every order of the page has a line of.
macro_rules! page_by_product {
    () => {
        concat!(
            "WITH hits AS (
                 SELECT pi.order_id FROM order_items pi
                 JOIN orders o ON o.id = pi.order_id
                 WHERE pi.product_id = $8
                     AND ($3::timestamptz IS NULL OR pi.created_at >= $3)
                     AND ($4::timestamptz IS NULL OR pi.created_at < $4)
                     AND ($5::timestamptz IS NULL OR (pi.created_at, pi.order_id) < ($5, $6))
                     AND ($2::bigint IS NULL OR o.user_id = $2)
                     AND o.status = ANY($1)
                 ORDER BY pi.created_at DESC, pi.order_id DESC
                 LIMIT $7
             ),
             page AS (
                 SELECT ",
            order_columns!(),
            " FROM orders WHERE id IN (SELECT order_id FROM hits)
             )",
            with_items!()
        )
    };
}

#[derive(sqlx::FromRow)]
struct PageRow {
    #[sqlx(flatten)]
    order: OrderRow,
    item_product_id: Option<ProductId>,
    item_name: Option<String>,
    item_unit_price: Option<Won>,
    item_quantity: Option<i32>,
}

/// The orders of `filter` below `after`, newest first, and where the next page starts (if
/// there is one).
#[tracing::instrument(target = "otel", name = "orders.page", skip_all, fields(db.system = "postgresql"))]
pub async fn page(
    db: impl PgExecutor<'_>,
    filter: &OrderFilter,
    size: PageSize,
    after: Option<CreatedCursor>,
) -> Result<(Vec<Order>, Option<CreatedCursor>), StoreError> {
    let statuses: Vec<&str> = filter
        .statuses
        .kept()
        .into_iter()
        .map(|s| s.as_str())
        .collect();
    let sql = if filter.product.is_some() {
        page_by_product!()
    } else {
        page_by_status!()
    };
    let query = sqlx::query_as(sql)
        .bind(&statuses)
        .bind(filter.user)
        .bind(filter.created.after())
        .bind(filter.created.before())
        .bind(after.map(|c| c.created_at))
        .bind(after.map(|c| c.id))
        .bind(size.get() + 1);
    let query = match filter.product {
        Some(product) => query.bind(product),
        None => query,
    };
    let rows: Vec<PageRow> = query.fetch_all(db).await?;
    let mut orders = group(rows);
    let next = if orders.len() > size.get() as usize {
        orders.truncate(size.get() as usize);
        orders
            .last()
            .map(|o| CreatedCursor::below(o.created_at, o.id.get()))
    } else {
        None
    };
    Ok((orders, next))
}

/// Folds the rows (an order's items are adjacent, in product order) into orders.
fn group(rows: Vec<PageRow>) -> Vec<Order> {
    let mut orders: Vec<Order> = Vec::new();
    for row in rows {
        let item = match (
            row.item_product_id,
            row.item_name,
            row.item_unit_price,
            row.item_quantity,
        ) {
            (Some(product_id), Some(name), Some(unit_price), Some(quantity)) => Some(OrderItem {
                product_id,
                name,
                unit_price,
                quantity,
            }),
            _ => None,
        };
        match orders.last_mut() {
            Some(last) if last.id == row.order.id => last.items.extend(item),
            _ => orders.push(row.order.with_items(item.into_iter().collect())),
        }
    }
    orders
}
