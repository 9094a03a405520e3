//! Paid quantities per product and day: what the popular-products ranking must show.
//! Only PAID orders count (an order has a payment row only once it is paid, and paid orders
//! never change again), bucketed by the payment's day in the ranking time zone.

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use sqlx::PgExecutor;

use crate::{domain::ProductId, store::StoreError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct DailySales {
    pub day: NaiveDate,
    pub product_id: ProductId,
    pub quantity: i64,
}

/// Sales paid at or after `since`, per day (in `tz`) and product.
pub async fn daily_since(
    db: impl PgExecutor<'_>,
    tz: Tz,
    since: DateTime<Utc>,
) -> Result<Vec<DailySales>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT (p.paid_at AT TIME ZONE $1)::date AS day,
                oi.product_id,
                sum(oi.quantity)::bigint AS quantity
         FROM payments p
         JOIN order_items oi ON oi.order_id = p.order_id
         WHERE p.paid_at >= $2
         GROUP BY 1, 2
         ORDER BY 1, 2",
    )
    .bind(tz.name())
    .bind(since)
    .fetch_all(db)
    .await?;
    Ok(rows)
}
