//! Refunds: which units of a paid order are given back, and how much of what was paid each gives
//! back ([`allocation`] states the rule).
//!
//! Invariant: whatever refunds an order gets, however many and in whatever order, together they
//! never give back more than its final amount, and once every unit is refunded they have given
//! back exactly that amount; each refund is within 1 won of its exact share.

mod allocation;

use chrono::{DateTime, Utc};

pub use allocation::{RefundPlan, RefundRefusal};

use super::{OrderId, OrderLines, ProductId, RefundId, UserId, ValidationError, Won};

/// What the admin asks to refund.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefundSelection {
    /// Every unit not refunded yet.
    Everything,
    /// These units (each product once, at most 50 lines).
    Lines(OrderLines),
}

impl RefundSelection {
    /// No lines means everything not refunded yet.
    pub fn parse(raw: impl ExactSizeIterator<Item = (i64, i32)>) -> Result<Self, ValidationError> {
        if raw.len() == 0 {
            return Ok(Self::Everything);
        }
        OrderLines::parse_field(raw, "lines").map(Self::Lines)
    }

    /// A canonical text of the selection, used to recognise a retried request.
    pub fn fingerprint(&self) -> String {
        match self {
            Self::Everything => "all".into(),
            Self::Lines(lines) => lines.fingerprint(),
        }
    }
}

/// Why a refund is given, for the records: at most 500 characters, no control characters
/// (empty is allowed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RefundReason(String);

impl RefundReason {
    pub const MAX_CHARS: usize = 500;

    pub fn parse(raw: String) -> Result<Self, ValidationError> {
        // Counting stops early, so a 1 MB string costs no more than 501 characters.
        if raw.chars().nth(Self::MAX_CHARS).is_some() {
            return Err(ValidationError::new(
                "reason",
                "must be at most 500 characters",
            ));
        }
        if raw.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "reason",
                "must not contain control characters",
            ));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}
/// One refunded line: `quantity` units of `product_id`, giving back `amount`. Its JSON is the
/// `RefundedLine` of events.proto (an `OrderRefunded` event carries its refund's lines).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct RefundedLine {
    pub product_id: ProductId,
    pub quantity: i32,
    pub amount: Won,
}

/// A refund as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refund {
    pub id: RefundId,
    pub order_id: OrderId,
    pub user_id: UserId,
    /// By ascending product id.
    pub lines: Vec<RefundedLine>,
    pub amount: Won,
    pub balance_after: Won,
    pub restocked: bool,
    pub coupon_returned: bool,
    pub reason: String,
    pub created_at: DateTime<Utc>,
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_and_reasons_are_validated() {
        assert_eq!(
            RefundSelection::parse(std::iter::empty()).unwrap(),
            RefundSelection::Everything
        );
        let err = RefundSelection::parse([(1, 1), (1, 2)].into_iter()).unwrap_err();
        assert_eq!(err.field, "lines[1].product_id");
        let err = RefundSelection::parse([(1, 0)].into_iter()).unwrap_err();
        assert_eq!(err.field, "lines[0].quantity");
        let many: Vec<(i64, i32)> = (1..=51).map(|i| (i, 1)).collect();
        assert_eq!(
            RefundSelection::parse(many.into_iter()).unwrap_err().field,
            "lines"
        );
        assert_eq!(
            RefundSelection::parse([(3, 1), (1, 2)].into_iter())
                .unwrap()
                .fingerprint(),
            "1x2,3x1"
        );

        assert!(RefundReason::parse(String::new()).is_ok());
        assert!(RefundReason::parse("환불 요청".repeat(100)).is_ok());
        assert!(RefundReason::parse("x".repeat(501)).is_err());
        assert!(RefundReason::parse("tab\there".into()).is_err());
    }
}
