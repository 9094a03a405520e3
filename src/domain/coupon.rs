//! Coupon terms and rules: how much a coupon takes off an order, when it can be issued, and
//! what a held coupon's status is at a given moment.

use chrono::{DateTime, Utc};

use super::{
    CouponId, DisplayName, OrderId, UserCouponId, UserId, ValidationError, Won, macros::text_enum,
};

/// How many coupons of one kind can exist: 1..=1,000,000.
pub fn parse_total_quantity(raw: i64) -> Result<i64, ValidationError> {
    if (1..=1_000_000).contains(&raw) {
        Ok(raw)
    } else {
        Err(ValidationError::new(
            "total_quantity",
            "must be between 1 and 1000000",
        ))
    }
}

/// What a coupon takes off an order total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discount {
    /// `amount` won off, never more than the total.
    Fixed { amount: Won },
    /// `percent`% of the total, rounded down, capped by `max_discount` when set.
    Percent {
        percent: u8,
        max_discount: Option<Won>,
    },
}

impl Discount {
    pub fn fixed(amount: i64) -> Result<Self, ValidationError> {
        Ok(Self::Fixed {
            amount: Won::parse_positive(amount, "discount.fixed.amount")?,
        })
    }

    /// `max_discount` 0 means "no cap".
    pub fn percent(percent: i32, max_discount: i64) -> Result<Self, ValidationError> {
        if !(1..=100).contains(&percent) {
            return Err(ValidationError::new(
                "discount.percent.percent",
                "must be between 1 and 100",
            ));
        }
        let max = Won::parse_non_negative(max_discount, "discount.percent.max_discount")?;
        Ok(Self::Percent {
            percent: percent as u8,
            max_discount: (max > Won::ZERO).then_some(max),
        })
    }

    /// The discount on `total`. Never negative and never more than `total`.
    pub fn apply(&self, total: Won) -> Won {
        let total = total.max(Won::ZERO);
        match *self {
            Discount::Fixed { amount } => amount.min(total),
            Discount::Percent {
                percent,
                max_discount,
            } => {
                // i128 so that total * percent cannot overflow before the division.
                let raw = i128::from(total.get()) * i128::from(percent) / 100;
                let discount = Won::new(raw as i64);
                match max_discount {
                    Some(cap) => discount.min(cap),
                    None => discount,
                }
            }
        }
    }
}

/// A coupon to create, validated.
pub struct NewCoupon {
    pub name: DisplayName,
    pub discount: Discount,
    pub min_order_amount: Won,
    pub total_quantity: i64,
    pub window: IssueWindow,
    pub valid_days: ValidDays,
}

/// How long an issued coupon stays usable: 1..=3650 days.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidDays(i32);

impl ValidDays {
    pub fn parse(raw: i32) -> Result<Self, ValidationError> {
        if (1..=3650).contains(&raw) {
            Ok(Self(raw))
        } else {
            Err(ValidationError::new(
                "valid_days",
                "must be between 1 and 3650",
            ))
        }
    }

    pub fn get(self) -> i32 {
        self.0
    }
}

/// What a coupon gives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CouponTerms {
    pub name: DisplayName,
    pub discount: Discount,
    pub min_order_amount: Won,
    pub valid_days: ValidDays,
}

impl CouponTerms {
    /// The discount this coupon gives on an order of `total`, or `None` when the order is below
    /// the minimum amount.
    pub fn discount_for(&self, total: Won) -> Option<Won> {
        (total >= self.min_order_amount).then(|| self.discount.apply(total))
    }
}

/// When a coupon can be issued: `starts_at <= now < ends_at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IssueWindow {
    starts_at: DateTime<Utc>,
    ends_at: DateTime<Utc>,
}

impl IssueWindow {
    pub fn parse(
        starts_at: DateTime<Utc>,
        ends_at: DateTime<Utc>,
    ) -> Result<Self, ValidationError> {
        if starts_at < ends_at {
            Ok(Self { starts_at, ends_at })
        } else {
            Err(ValidationError::new(
                "issue_ends_at",
                "must be later than issue_starts_at",
            ))
        }
    }

    pub fn starts_at(self) -> DateTime<Utc> {
        self.starts_at
    }

    pub fn ends_at(self) -> DateTime<Utc> {
        self.ends_at
    }

    pub fn contains(self, now: DateTime<Utc>) -> bool {
        self.starts_at <= now && now < self.ends_at
    }
}

/// A held coupon's status. `Expired` is not stored: an AVAILABLE coupon past its expiry is
/// expired, so no job has to flip rows at midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UserCouponStatus {
    Available,
    Reserved,
    Used,
    Expired,
}

text_enum!(UserCouponStatus {
    Available => "AVAILABLE",
    Reserved => "RESERVED",
    Used => "USED",
    Expired => "EXPIRED",
});

impl UserCouponStatus {
    /// The status a caller sees for a stored status at `now`.
    pub fn effective(self, expires_at: DateTime<Utc>, now: DateTime<Utc>) -> Self {
        match self {
            UserCouponStatus::Available if expires_at <= now => UserCouponStatus::Expired,
            other => other,
        }
    }
}

/// An admin's change to a coupon; fields left `None` keep their value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CouponChanges {
    pub name: Option<DisplayName>,
    /// The new end of the issue window; its start never moves.
    pub issue_ends_at: Option<DateTime<Utc>>,
    /// Already checked by [`parse_total_quantity`]; whether it covers the coupons issued is
    /// for the use case to tell (it needs the count).
    pub total_quantity: Option<i64>,
}

impl CouponChanges {
    /// The issue window once the change applies to `current`.
    pub fn window(&self, current: IssueWindow) -> Result<IssueWindow, ValidationError> {
        match self.issue_ends_at {
            Some(ends_at) => IssueWindow::parse(current.starts_at(), ends_at),
            None => Ok(current),
        }
    }
}

/// A coupon definition: its terms, how many exist, and when they can be issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coupon {
    pub id: CouponId,
    pub terms: CouponTerms,
    pub total_quantity: i64,
    pub window: IssueWindow,
    pub created_at: DateTime<Utc>,
}

/// One coupon issued to one user. `status` is as stored; see [`UserCouponStatus::effective`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserCoupon {
    pub id: UserCouponId,
    pub coupon_id: CouponId,
    pub user_id: UserId,
    pub status: UserCouponStatus,
    pub order_id: Option<OrderId>,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub terms: CouponTerms,
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    fn won(v: i64) -> Won {
        Won::new(v)
    }

    #[test]
    fn a_change_moves_only_the_end_of_the_window() {
        let starts = Utc::now();
        let window = IssueWindow::parse(starts, starts + Duration::hours(1)).unwrap();
        assert_eq!(CouponChanges::default().window(window), Ok(window));
        let sooner = CouponChanges {
            issue_ends_at: Some(starts + Duration::minutes(1)),
            ..Default::default()
        };
        let moved = sooner.window(window).unwrap();
        assert_eq!(
            (moved.starts_at(), moved.ends_at()),
            (starts, starts + Duration::minutes(1))
        );
        let before_start = CouponChanges {
            issue_ends_at: Some(starts),
            ..Default::default()
        };
        assert_eq!(
            before_start.window(window).unwrap_err().field,
            "issue_ends_at"
        );
    }

    #[test]
    fn fixed_discount_never_exceeds_the_total() {
        let d = Discount::fixed(5_000).unwrap();
        assert_eq!(d.apply(won(20_000)), won(5_000));
        assert_eq!(d.apply(won(3_000)), won(3_000));
        assert_eq!(d.apply(won(0)), won(0));
        assert!(Discount::fixed(0).is_err());
        assert!(Discount::fixed(-1).is_err());
    }

    #[test]
    fn percent_discount_rounds_down_and_respects_the_cap() {
        let d = Discount::percent(15, 0).unwrap();
        assert_eq!(d.apply(won(9_999)), won(1_499));
        let capped = Discount::percent(50, 10_000).unwrap();
        assert_eq!(capped.apply(won(8_000)), won(4_000));
        assert_eq!(capped.apply(won(100_000)), won(10_000));
        let all = Discount::percent(100, 0).unwrap();
        assert_eq!(all.apply(won(i64::MAX)), won(i64::MAX));
        assert!(Discount::percent(0, 0).is_err());
        assert!(Discount::percent(101, 0).is_err());
        assert!(Discount::percent(10, -1).is_err());
    }

    #[test]
    fn minimum_order_amount_gates_the_discount() {
        let terms = CouponTerms {
            name: DisplayName::parse("welcome".into(), "name").unwrap(),
            discount: Discount::fixed(1_000).unwrap(),
            min_order_amount: won(10_000),
            valid_days: ValidDays::parse(7).unwrap(),
        };
        assert_eq!(terms.discount_for(won(9_999)), None);
        assert_eq!(terms.discount_for(won(10_000)), Some(won(1_000)));
    }

    #[test]
    fn window_is_half_open() {
        let start = DateTime::from_timestamp(1_000, 0).unwrap();
        let end = DateTime::from_timestamp(2_000, 0).unwrap();
        let w = IssueWindow::parse(start, end).unwrap();
        assert!(!w.contains(start - Duration::seconds(1)));
        assert!(w.contains(start));
        assert!(!w.contains(end));
        assert!(IssueWindow::parse(end, start).is_err());
        assert!(IssueWindow::parse(start, start).is_err());
    }

    #[test]
    fn available_coupons_past_expiry_read_as_expired() {
        let now = DateTime::from_timestamp(5_000, 0).unwrap();
        let past = now - Duration::seconds(1);
        let future = now + Duration::days(1);
        use UserCouponStatus::*;
        assert_eq!(Available.effective(past, now), Expired);
        assert_eq!(Available.effective(future, now), Available);
        assert_eq!(Used.effective(past, now), Used);
        assert_eq!(Reserved.effective(past, now), Reserved);
    }

    #[test]
    fn valid_days_bounds() {
        assert!(ValidDays::parse(0).is_err());
        assert!(ValidDays::parse(3651).is_err());
    }
}
