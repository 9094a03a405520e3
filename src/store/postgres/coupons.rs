//! Coupons and issued coupons: the durable record of who holds what.
//!
//! Invariant (enforced by the schema, whatever Redis says): at most one coupon per user and
//! coupon, and at most `total_quantity` issued, because each issued coupon occupies a distinct
//! seat in `1..=total_quantity`.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use super::split_page;
use crate::{
    domain::{
        Coupon, CouponId, CouponTerms, Discount, DisplayName, IssueWindow, NewCoupon, OrderId,
        PageSize, PageToken, UserCoupon, UserCouponId, UserCouponStatus, UserId, ValidDays, Won,
    },
    store::StoreError,
};

/// The columns of a coupon row, optionally qualified by a table alias.
macro_rules! coupon_columns {
    ($alias:literal) => {
        concat!(
            $alias,
            "id AS c_id, ",
            $alias,
            "name AS c_name, ",
            $alias,
            "discount_type AS c_discount_type, ",
            $alias,
            "discount_amount AS c_discount_amount, ",
            $alias,
            "discount_percent AS c_discount_percent, ",
            $alias,
            "max_discount AS c_max_discount, ",
            $alias,
            "min_order_amount AS c_min_order_amount, ",
            $alias,
            "total_quantity AS c_total_quantity, ",
            $alias,
            "issue_starts_at AS c_issue_starts_at, ",
            $alias,
            "issue_ends_at AS c_issue_ends_at, ",
            $alias,
            "valid_days AS c_valid_days, ",
            $alias,
            "created_at AS c_created_at"
        )
    };
}
pub(super) use coupon_columns;

#[derive(sqlx::FromRow)]
pub(super) struct CouponRow {
    pub(super) c_id: CouponId,
    c_name: String,
    c_discount_type: String,
    c_discount_amount: Option<i64>,
    c_discount_percent: Option<i16>,
    c_max_discount: Option<i64>,
    c_min_order_amount: Won,
    c_total_quantity: i64,
    c_issue_starts_at: DateTime<Utc>,
    c_issue_ends_at: DateTime<Utc>,
    c_valid_days: i32,
    c_created_at: DateTime<Utc>,
}

impl CouponRow {
    pub(super) fn into_coupon(self) -> Result<Coupon, StoreError> {
        let id = self.c_id;
        let corrupt = |what: &str| StoreError::Inconsistent(format!("coupon {id}: {what}"));
        let discount = match (
            self.c_discount_type.as_str(),
            self.c_discount_amount,
            self.c_discount_percent,
        ) {
            ("FIXED", Some(amount), None) => Discount::Fixed {
                amount: Won::new(amount),
            },
            ("PERCENT", None, Some(percent)) => Discount::Percent {
                percent: u8::try_from(percent).map_err(|_| corrupt("percent"))?,
                max_discount: self.c_max_discount.map(Won::new),
            },
            _ => return Err(corrupt("discount shape")),
        };
        Ok(Coupon {
            id,
            terms: CouponTerms {
                name: DisplayName::parse(self.c_name, "name").map_err(|_| corrupt("name"))?,
                discount,
                min_order_amount: self.c_min_order_amount,
                valid_days: ValidDays::parse(self.c_valid_days)
                    .map_err(|_| corrupt("valid_days"))?,
            },
            total_quantity: self.c_total_quantity,
            window: IssueWindow::parse(self.c_issue_starts_at, self.c_issue_ends_at)
                .map_err(|_| corrupt("window"))?,
            created_at: self.c_created_at,
        })
    }
}

/// The columns of a [`UserCouponRow`], from `user_coupons uc JOIN coupons c`.
macro_rules! user_coupon_columns {
    () => {
        concat!(
            "uc.id, uc.coupon_id, uc.user_id, uc.status, uc.order_id, uc.issued_at, uc.expires_at, ",
            $crate::store::postgres::coupons::coupon_columns!("c.")
        )
    };
}
pub(super) use user_coupon_columns;

#[derive(sqlx::FromRow)]
pub(super) struct UserCouponRow {
    id: UserCouponId,
    coupon_id: CouponId,
    user_id: UserId,
    status: UserCouponStatus,
    order_id: Option<OrderId>,
    issued_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    #[sqlx(flatten)]
    coupon: CouponRow,
}

impl UserCouponRow {
    pub(super) fn into_user_coupon(self) -> Result<UserCoupon, StoreError> {
        Ok(UserCoupon {
            id: self.id,
            coupon_id: self.coupon_id,
            user_id: self.user_id,
            status: self.status,
            order_id: self.order_id,
            issued_at: self.issued_at,
            expires_at: self.expires_at,
            terms: self.coupon.into_coupon()?.terms,
        })
    }
}

pub async fn create(db: impl PgExecutor<'_>, new: NewCoupon) -> Result<Coupon, StoreError> {
    let (kind, amount, percent, max) = match new.discount {
        Discount::Fixed { amount } => ("FIXED", Some(amount.get()), None, None),
        Discount::Percent {
            percent,
            max_discount,
        } => (
            "PERCENT",
            None,
            Some(i16::from(percent)),
            max_discount.map(Won::get),
        ),
    };
    let row: CouponRow = sqlx::query_as(concat!(
        "INSERT INTO coupons (name, discount_type, discount_amount, discount_percent,
             max_discount, min_order_amount, total_quantity, issue_starts_at, issue_ends_at,
             valid_days)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         RETURNING ",
        coupon_columns!("")
    ))
    .bind(new.name.as_str())
    .bind(kind)
    .bind(amount)
    .bind(percent)
    .bind(max)
    .bind(new.min_order_amount)
    .bind(new.total_quantity)
    .bind(new.window.starts_at())
    .bind(new.window.ends_at())
    .bind(new.valid_days.get())
    .fetch_one(db)
    .await?;
    row.into_coupon()
}

pub async fn get(db: impl PgExecutor<'_>, id: CouponId) -> Result<Option<Coupon>, StoreError> {
    let row: Option<CouponRow> = sqlx::query_as(concat!(
        "SELECT ",
        coupon_columns!(""),
        " FROM coupons WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await?;
    row.map(CouponRow::into_coupon).transpose()
}

/// The coupon and how many have been issued.
pub async fn get_with_issued(
    db: impl PgExecutor<'_>,
    id: CouponId,
) -> Result<Option<(Coupon, i64)>, StoreError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        coupon: CouponRow,
        issued: i64,
    }
    let row: Option<Row> = sqlx::query_as(concat!(
        "SELECT ",
        coupon_columns!("c."),
        ", (SELECT count(*) FROM user_coupons uc WHERE uc.coupon_id = c.id) AS issued
         FROM coupons c WHERE c.id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await?;
    row.map(|r| Ok((r.coupon.into_coupon()?, r.issued)))
        .transpose()
}

/// Coupons whose issue window has not been closed for long: the ones whose Redis gate may
/// still matter and so may need repair.
pub async fn issuable_around(
    db: impl PgExecutor<'_>,
    now: DateTime<Utc>,
) -> Result<Vec<Coupon>, StoreError> {
    let rows: Vec<CouponRow> = sqlx::query_as(concat!(
        "SELECT ",
        coupon_columns!(""),
        " FROM coupons
         WHERE issue_starts_at <= $1 + interval '1 hour' AND issue_ends_at > $1 - interval '1 hour'
         ORDER BY id"
    ))
    .bind(now)
    .fetch_all(db)
    .await?;
    rows.into_iter().map(CouponRow::into_coupon).collect()
}

/// One seat issued in Postgres, as a gate rebuild installs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct HeldSeat {
    pub user_id: UserId,
    pub seat: i64,
    /// The holder's coupon row: a rebuilt gate answers a repeat call with it.
    pub user_coupon_id: UserCouponId,
}

/// Every seat issued for `coupon_id`, in no particular order.
pub async fn held_seats(
    db: impl PgExecutor<'_>,
    coupon_id: CouponId,
) -> Result<Vec<HeldSeat>, StoreError> {
    let seats = sqlx::query_as(
        "SELECT user_id, seat, id AS user_coupon_id FROM user_coupons WHERE coupon_id = $1",
    )
    .bind(coupon_id)
    .fetch_all(db)
    .await?;
    Ok(seats)
}

/// How many coupons of `coupon_id` have been issued.
pub async fn count_issued(db: impl PgExecutor<'_>, coupon_id: CouponId) -> Result<i64, StoreError> {
    let issued = sqlx::query_scalar("SELECT count(*) FROM user_coupons WHERE coupon_id = $1")
        .bind(coupon_id)
        .fetch_one(db)
        .await?;
    Ok(issued)
}

/// The id of `user_id`'s coupon of `coupon_id`, if they hold one.
pub async fn user_coupon_id(
    db: impl PgExecutor<'_>,
    coupon_id: CouponId,
    user_id: UserId,
) -> Result<Option<UserCouponId>, StoreError> {
    let id =
        sqlx::query_scalar("SELECT id FROM user_coupons WHERE coupon_id = $1 AND user_id = $2")
            .bind(coupon_id)
            .bind(user_id)
            .fetch_optional(db)
            .await?;
    Ok(id)
}

/// Which of `users` hold a coupon of `coupon_id`, with the id of that coupon.
pub async fn holders_among(
    db: impl PgExecutor<'_>,
    coupon_id: CouponId,
    users: &[i64],
) -> Result<Vec<(i64, UserCouponId)>, StoreError> {
    let holders = sqlx::query_as(
        "SELECT user_id, id FROM user_coupons WHERE coupon_id = $1 AND user_id = ANY($2)",
    )
    .bind(coupon_id)
    .bind(users)
    .fetch_all(db)
    .await?;
    Ok(holders)
}

/// Why Postgres refused to record a coupon the gate had granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssueRefusal {
    /// The user already holds this coupon.
    AlreadyIssued,
    /// Another user holds this seat (the gate was rebuilt while that insert was in flight).
    SeatTaken,
    /// The seat is beyond the coupon's total quantity.
    SeatBeyondTotal,
    /// No such coupon.
    NoCoupon,
}

/// Records the coupon `seat` for `user_id`, in one statement.
#[tracing::instrument(target = "otel", name = "coupons.insert", skip_all, fields(db.system = "postgresql"))]
pub async fn issue(
    db: impl PgExecutor<'_>,
    coupon_id: CouponId,
    user_id: UserId,
    seat: i64,
) -> Result<Result<UserCoupon, IssueRefusal>, StoreError> {
    let inserted = sqlx::query_as::<_, UserCouponRow>(concat!(
        // FOR KEY SHARE (which the foreign key check takes anyway, but only after the row is
        // in the seat index): an UpdateCoupon that is renumbering seats holds the coupon FOR
        // UPDATE, and the insert must wait for it before taking a seat, not hold one it waits on.
        "WITH c AS (SELECT * FROM coupons WHERE id = $1 FOR KEY SHARE),
         ins AS (
             INSERT INTO user_coupons (coupon_id, user_id, seat, expires_at)
             SELECT c.id, $2, $3, now() + make_interval(days => c.valid_days) FROM c
             RETURNING id, coupon_id, user_id, status, order_id, issued_at, expires_at
         )
         SELECT ins.*, ",
        coupon_columns!("c."),
        " FROM ins CROSS JOIN c"
    ))
    .bind(coupon_id)
    .bind(user_id)
    .bind(seat)
    .fetch_optional(db)
    .await;
    match inserted {
        Ok(Some(row)) => Ok(Ok(row.into_user_coupon()?)),
        Ok(None) => Ok(Err(IssueRefusal::NoCoupon)),
        Err(e) => {
            let error = StoreError::from_commit(e);
            match error.violated_constraint() {
                Some("user_coupons_one_per_user") => Ok(Err(IssueRefusal::AlreadyIssued)),
                Some("user_coupons_seat_unique") => Ok(Err(IssueRefusal::SeatTaken)),
                Some("user_coupons_seat_within_total") => Ok(Err(IssueRefusal::SeatBeyondTotal)),
                _ => Err(error),
            }
        }
    }
}

/// A seat the gate granted, to be recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeatGrant {
    pub coupon_id: CouponId,
    pub user_id: UserId,
    pub seat: i64,
}

/// Records several grants in one statement, so they share one transaction and one WAL flush
/// (each coupon locked FOR KEY SHARE first, as in [`issue`]).
/// A grant that a unique constraint refuses (the user already holds the coupon, the seat is
/// taken) is left out of the result; [`issue`] tells why, one by one. Any other failure fails
/// the whole statement.
#[tracing::instrument(target = "otel", name = "coupons.insert_winners", skip_all, fields(db.system = "postgresql"))]
pub async fn issue_many(
    db: impl PgExecutor<'_>,
    grants: &[SeatGrant],
) -> Result<Vec<UserCoupon>, StoreError> {
    let coupon_ids: Vec<CouponId> = grants.iter().map(|g| g.coupon_id).collect();
    let user_ids: Vec<UserId> = grants.iter().map(|g| g.user_id).collect();
    let seats: Vec<i64> = grants.iter().map(|g| g.seat).collect();
    let rows: Vec<UserCouponRow> = sqlx::query_as(concat!(
        "WITH ins AS (
             INSERT INTO user_coupons (coupon_id, user_id, seat, expires_at)
             SELECT g.coupon_id, g.user_id, g.seat, now() + make_interval(days => c.valid_days)
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS g(coupon_id, user_id, seat)
             JOIN coupons c ON c.id = g.coupon_id
             FOR KEY SHARE OF c
             ON CONFLICT DO NOTHING
             RETURNING id, coupon_id, user_id, status, order_id, issued_at, expires_at
         )
         SELECT ins.*, ",
        coupon_columns!("c."),
        " FROM ins JOIN coupons c ON c.id = ins.coupon_id"
    ))
    .bind(&coupon_ids)
    .bind(&user_ids)
    .bind(&seats)
    .fetch_all(db)
    .await
    .map_err(StoreError::from_commit)?;
    rows.into_iter()
        .map(UserCouponRow::into_user_coupon)
        .collect()
}

/// A user's coupons, newest first.
pub async fn user_coupons_page(
    db: impl PgExecutor<'_>,
    user_id: UserId,
    page_size: PageSize,
    after: Option<PageToken>,
) -> Result<(Vec<UserCoupon>, Option<PageToken>), StoreError> {
    let mut rows: Vec<UserCouponRow> = sqlx::query_as(concat!(
        "SELECT ",
        user_coupon_columns!(),
        " FROM user_coupons uc JOIN coupons c ON c.id = uc.coupon_id
         WHERE uc.user_id = $1 AND uc.id < $2
         ORDER BY uc.id DESC
         LIMIT $3"
    ))
    .bind(user_id)
    .bind(after.map_or(i64::MAX, PageToken::last_key))
    .bind(page_size.get() + 1)
    .fetch_all(db)
    .await?;
    let next = split_page(&mut rows, page_size, |r| r.id.get());
    let coupons = rows
        .into_iter()
        .map(UserCouponRow::into_user_coupon)
        .collect::<Result<_, _>>()?;
    Ok((coupons, next))
}
