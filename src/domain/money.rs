//! Money is an integer number of won. Arithmetic is checked: an overflow is a refused request,
//! never a wrapped or saturated amount.

use std::fmt;

use super::ValidationError;

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, sqlx::Type,
)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct Won(i64);

impl Won {
    pub const ZERO: Won = Won(0);

    pub const fn new(amount: i64) -> Self {
        Self(amount)
    }

    /// An amount > 0, such as a charge.
    pub fn parse_positive(raw: i64, field: &'static str) -> Result<Self, ValidationError> {
        if raw > 0 {
            Ok(Self(raw))
        } else {
            Err(ValidationError::new(field, "must be greater than 0"))
        }
    }

    /// An amount >= 0, such as a price.
    pub fn parse_non_negative(raw: i64, field: &'static str) -> Result<Self, ValidationError> {
        if raw >= 0 {
            Ok(Self(raw))
        } else {
            Err(ValidationError::new(field, "must not be negative"))
        }
    }

    pub const fn get(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Won) -> Option<Won> {
        self.0.checked_add(other.0).map(Won)
    }

    pub fn checked_sub(self, other: Won) -> Option<Won> {
        self.0.checked_sub(other.0).map(Won)
    }

    pub fn checked_mul(self, factor: i64) -> Option<Won> {
        self.0.checked_mul(factor).map(Won)
    }
}

impl fmt::Display for Won {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} won", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_enforces_the_sign() {
        assert!(Won::parse_positive(1, "amount").is_ok());
        assert!(Won::parse_positive(0, "amount").is_err());
        assert!(Won::parse_positive(-5, "amount").is_err());
        assert!(Won::parse_non_negative(0, "price").is_ok());
        assert_eq!(
            Won::parse_non_negative(-1, "price").unwrap_err().field,
            "price"
        );
    }

    #[test]
    fn arithmetic_is_checked() {
        assert_eq!(Won::new(2).checked_add(Won::new(3)), Some(Won::new(5)));
        assert_eq!(Won::new(i64::MAX).checked_add(Won::new(1)), None);
        assert_eq!(Won::new(i64::MIN).checked_sub(Won::new(1)), None);
        assert_eq!(Won::new(i64::MAX / 2).checked_mul(3), None);
        assert_eq!(Won::new(1500).checked_mul(3), Some(Won::new(4500)));
    }
}
