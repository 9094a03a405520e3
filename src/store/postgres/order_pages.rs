//! Pages of orders, newest first, with their items.
//!
//! Invariant: a page is the first `n` orders of the filter below its cursor in the order
//! (created_at DESC, id DESC), read by one statement (one snapshot: an order and its items as
//! they were at one instant), and every filter walks an index in that order, so a page reads
//! about its own rows whatever the table holds (docs/QUERY_PLANS.md):
//! - one buyer, every status: a backward scan of `orders_user_created_idx`;
//! - by status (with a buyer, some statuses; without one, every status when none is asked):
//!   one backward scan per status of `orders_user_status_created_idx` (with a buyer) or
//!   `orders_status_created_idx`, each stopping after `n` rows, merged;
//!   a creation range and the cursor bound the scans;
//! - by product: a backward scan of `order_items_product_created_idx` (an item's created_at is
//!   its order's), each order then read by its key and checked against the other filters.
//!
//! The parameters are bound as `NULL` when a filter is not set; the pool's connections plan
//! every execution for its values (`plan_cache_mode = force_custom_plan`), so a filter not set
//! costs nothing and the plan uses the index its filters call for. The statements select every
//! column of `orders` (`OrderRow` reads the ones it knows), so a column added to orders reaches
//! the lists with the row type.

use sqlx::PgExecutor;

use super::orders::OrderRow;
use crate::{
    domain::{CreatedCursor, Order, OrderFilter, OrderItem, PageSize, ProductId, Won},
    store::StoreError,
};

/// The statements, as files (`scripts/query-plans` explains the same text).
const BY_BUYER: &str = concat!(
    include_str!("sql/order_page_by_buyer.sql"),
    include_str!("sql/order_page_items.sql")
);
const BY_STATUS: &str = concat!(
    include_str!("sql/order_page_by_status.sql"),
    include_str!("sql/order_page_items.sql")
);
const BY_PRODUCT: &str = concat!(
    include_str!("sql/order_page_by_product.sql"),
    include_str!("sql/order_page_items.sql")
);

#[derive(sqlx::FromRow)]
struct PageRow {
    #[sqlx(flatten)]
    order: OrderRow,
    item_product_id: Option<ProductId>,
    item_name: Option<String>,
    item_unit_price: Option<Won>,
    item_quantity: Option<i32>,
    item_refunded_quantity: Option<i32>,
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
    let sql = match (filter.product, filter.user) {
        (Some(_), _) => BY_PRODUCT,
        (None, Some(_)) if filter.statuses.keeps_all() => BY_BUYER,
        _ => BY_STATUS,
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
            row.item_refunded_quantity,
        ) {
            (
                Some(product_id),
                Some(name),
                Some(unit_price),
                Some(quantity),
                Some(refunded_quantity),
            ) => Some(OrderItem {
                product_id,
                name,
                unit_price,
                quantity,
                refunded_quantity,
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
