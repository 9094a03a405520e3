//! The operator's coupon reads and changes: pages of coupons with their issued counts, and
//! changing a live coupon's name, window end and total.
//!
//! A change locks the coupon row FOR UPDATE. Every insert of an issued coupon locks that row
//! FOR KEY SHARE before taking a seat (see [`super::coupons::issue`]), so while a change holds
//! it no coupon is being recorded: the issued count it reads stays true until it commits, and a
//! lowered total is checked against every coupon that will ever have been issued under the old
//! one. Inserts that waited then check their seat against the new total.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use super::{
    coupons::{CouponRow, coupon_columns},
    split_page,
};
use crate::{
    domain::{Coupon, CouponId, DisplayName, PageSize, PageToken},
    store::StoreError,
};

/// A coupon with the coupons issued of it.
#[derive(sqlx::FromRow)]
struct CountedRow {
    #[sqlx(flatten)]
    coupon: CouponRow,
    issued: i64,
}

impl CountedRow {
    fn into_pair(self) -> Result<(Coupon, i64), StoreError> {
        Ok((self.coupon.into_coupon()?, self.issued))
    }
}

/// Coupons by id after `after`, each with how many were issued.
pub async fn page(
    db: impl PgExecutor<'_>,
    page_size: PageSize,
    after: Option<PageToken>,
) -> Result<(Vec<(Coupon, i64)>, Option<PageToken>), StoreError> {
    // The count is an index-only scan of user_coupons_seat_unique (coupon_id, seat).
    let mut rows: Vec<CountedRow> = sqlx::query_as(concat!(
        "SELECT ",
        coupon_columns!("c."),
        ", (SELECT count(*) FROM user_coupons uc WHERE uc.coupon_id = c.id) AS issued
         FROM coupons c
         WHERE c.id > $1
         ORDER BY c.id
         LIMIT $2"
    ))
    .bind(after.map_or(0, PageToken::last_key))
    .bind(page_size.get() + 1)
    .fetch_all(db)
    .await?;
    let next = split_page(&mut rows, page_size, |r| r.coupon.c_id.get());
    let coupons = rows
        .into_iter()
        .map(CountedRow::into_pair)
        .collect::<Result<_, _>>()?;
    Ok((coupons, next))
}

/// Locks the coupon for a change (no coupon of it is recorded until the transaction ends) and
/// reads it with its issued count; `None` when there is no such coupon.
pub async fn lock(
    tx: &mut PgConnection,
    id: CouponId,
) -> Result<Option<(Coupon, i64)>, StoreError> {
    let row: Option<CountedRow> = sqlx::query_as(concat!(
        "SELECT ",
        coupon_columns!("c."),
        ", (SELECT count(*) FROM user_coupons uc WHERE uc.coupon_id = c.id) AS issued
         FROM coupons c WHERE c.id = $1
         FOR UPDATE OF c"
    ))
    .bind(id)
    .fetch_optional(tx)
    .await?;
    row.map(CountedRow::into_pair).transpose()
}

/// Writes a locked coupon's new name, window end and total.
pub async fn update(
    tx: &mut PgConnection,
    id: CouponId,
    name: &DisplayName,
    issue_ends_at: DateTime<Utc>,
    total_quantity: i64,
) -> Result<Coupon, StoreError> {
    let row: CouponRow = sqlx::query_as(concat!(
        "UPDATE coupons SET name = $2, issue_ends_at = $3, total_quantity = $4
         WHERE id = $1
         RETURNING ",
        coupon_columns!("")
    ))
    .bind(id)
    .bind(name.as_str())
    .bind(issue_ends_at)
    .bind(total_quantity)
    .fetch_one(tx)
    .await?;
    row.into_coupon()
}

/// After a total was lowered to `total` (at least the coupons issued): moves every coupon
/// whose seat is beyond it to a free seat within it, so the seats stay `1..=total` and
/// distinct, which is what keeps any later insert from passing the total. Returns how many
/// moved. The coupon must be locked (no insert can take a seat meanwhile).
pub async fn compact_seats(
    tx: &mut PgConnection,
    id: CouponId,
    total: i64,
) -> Result<u64, StoreError> {
    let moved = sqlx::query(
        "WITH beyond AS (
             SELECT id, row_number() OVER (ORDER BY seat) AS n
             FROM user_coupons WHERE coupon_id = $1 AND seat > $2
         ),
         free AS (
             SELECT s AS seat, row_number() OVER (ORDER BY s) AS n
             FROM generate_series(1, $2) AS s
             WHERE NOT EXISTS (
                 SELECT 1 FROM user_coupons WHERE coupon_id = $1 AND seat = s
             )
         )
         UPDATE user_coupons uc SET seat = free.seat
         FROM beyond JOIN free USING (n)
         WHERE uc.id = beyond.id",
    )
    .bind(id)
    .bind(total)
    .execute(tx)
    .await?;
    Ok(moved.rows_affected())
}
