//! Paid quantities per product and day: what the popular-products ranking must show.
//! Only paid orders count (an order has a payment row only once it is paid), less the units
//! refunded since (a refund only ever raises an item's `refunded_quantity`, in the transaction
//! the ranking knows it by), bucketed by the day span (`domain::Calendar`) holding the payment's
//! `paid_at`: the spans come from the service, not from Postgres' time zone rules, so a payment
//! lands in the same day here as in the bump made when it was paid.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgConnection, PgPool};

use crate::{
    domain::{DayWindow, ProductId, Snapshot},
    store::StoreError,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DailySales {
    pub day: NaiveDate,
    pub product_id: ProductId,
    pub quantity: i64,
}

/// Sales paid within `window`, per day and product, and the snapshot they were read in (one
/// REPEATABLE READ transaction: the snapshot names exactly the payments counted).
pub async fn daily_with_snapshot(
    pg: &PgPool,
    window: &DayWindow,
) -> Result<(Snapshot, Vec<DailySales>), StoreError> {
    let mut tx = pg.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let text: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
        .fetch_one(&mut *tx)
        .await?;
    let snapshot = Snapshot::parse(&text)
        .ok_or_else(|| StoreError::Inconsistent(format!("snapshot {text:?}")))?;
    let sales = daily(&mut tx, window).await?;
    tx.commit().await?;
    Ok((snapshot, sales))
}

async fn daily(db: &mut PgConnection, window: &DayWindow) -> Result<Vec<DailySales>, StoreError> {
    let starts: Vec<DateTime<Utc>> = window.days.iter().map(|(_, start)| *start).collect();
    // width_bucket numbers the span of `starts` holding paid_at from 1 (before the first: 0).
    let rows: Vec<(i32, ProductId, i64)> = sqlx::query_as(
        "SELECT width_bucket(p.paid_at, $1::timestamptz[]) AS day,
                oi.product_id,
                sum(oi.quantity - oi.refunded_quantity)::bigint AS quantity
         FROM payments p
         JOIN order_items oi ON oi.order_id = p.order_id
         WHERE p.paid_at >= $2 AND p.paid_at < $3
         GROUP BY 1, 2
         ORDER BY 1, 2",
    )
    .bind(&starts)
    .bind(window.start())
    .bind(window.end)
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|(bucket, product_id, quantity)| {
            let day = usize::try_from(bucket - 1)
                .ok()
                .and_then(|i| window.days.get(i))
                .ok_or_else(|| StoreError::Inconsistent(format!("day bucket {bucket}")))?;
            Ok(DailySales {
                day: day.0,
                product_id,
                quantity,
            })
        })
        .collect()
}
