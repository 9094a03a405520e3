//! Products: names and sale status. Only SELLING products can be ordered or listed.

use chrono::{DateTime, Utc};

use super::{ProductId, ValidationError, Won, macros::text_enum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProductStatus {
    Selling,
    Stopped,
    SoldOut,
}

text_enum!(ProductStatus {
    Selling => "SELLING",
    Stopped => "STOPPED",
    SoldOut => "SOLD_OUT",
});

/// Units in stock: never negative.
pub fn parse_stock(raw: i64, field: &'static str) -> Result<i64, ValidationError> {
    if raw >= 0 {
        Ok(raw)
    } else {
        Err(ValidationError::new(field, "must not be negative"))
    }
}

/// A catalog entry.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Product {
    pub id: ProductId,
    pub name: String,
    pub price: Won,
    pub stock: i64,
    pub status: ProductStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_through_text() {
        for status in ProductStatus::ALL {
            assert_eq!(status.as_str().parse::<ProductStatus>(), Ok(*status));
        }
        assert!("selling".parse::<ProductStatus>().is_err());
    }
}
