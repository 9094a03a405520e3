//! Products: names and sale status. Only SELLING products can be ordered or listed.

use chrono::{DateTime, Utc};

use super::{DisplayName, ProductId, ValidationError, Won, macros::text_enum};

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

/// The most units an admin can put in stock.
///
/// Cancelling or expiring an order adds its units back on top of whatever the stock is then, and
/// the admin may have set it outright in between. Bounded far below `i64::MAX`, that addition
/// cannot overflow (it would take ~9 quintillion units held by open orders); unbounded, a product
/// restocked to `i64::MAX` made every release of its units fail, and with it the expiry job's
/// whole batch, on every run.
pub const MAX_STOCK: i64 = 1_000_000_000_000;

/// Units in stock, as the admin sets them: 0..=[`MAX_STOCK`].
pub fn parse_stock(raw: i64, field: &'static str) -> Result<i64, ValidationError> {
    if (0..=MAX_STOCK).contains(&raw) {
        Ok(raw)
    } else {
        Err(ValidationError::new(
            field,
            "must be between 0 and 1000000000000",
        ))
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

/// A product to create, validated.
pub struct NewProduct {
    pub name: DisplayName,
    pub price: Won,
    pub stock: i64,
    pub status: ProductStatus,
}

/// An admin's change to a product; fields left `None` keep their value.
#[derive(Default)]
pub struct ProductChanges {
    pub name: Option<DisplayName>,
    pub price: Option<Won>,
    pub stock: Option<i64>,
    pub status: Option<ProductStatus>,
    /// Change nothing unless the stock is exactly this (an optimistic check).
    pub expected_stock: Option<i64>,
}

/// A product's stock went up, at this stock generation (every increase bumps it). Sold-out
/// shortcuts older than the generation no longer hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restock {
    pub product: ProductId,
    pub stock_gen: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stock_is_bounded_so_released_units_fit() {
        assert_eq!(parse_stock(0, "stock"), Ok(0));
        assert_eq!(parse_stock(MAX_STOCK, "stock"), Ok(MAX_STOCK));
        for bad in [-1, MAX_STOCK + 1, i64::MAX, i64::MIN] {
            assert_eq!(parse_stock(bad, "stock").unwrap_err().field, "stock");
        }
        // A maximal restock plus a billion open orders of the largest line still fits.
        let held = i64::from(crate::domain::order::MAX_QUANTITY) * 1_000_000_000;
        assert!(MAX_STOCK.checked_add(held).is_some());
    }

    #[test]
    fn status_round_trips_through_text() {
        for status in &[
            ProductStatus::Selling,
            ProductStatus::Stopped,
            ProductStatus::SoldOut,
        ] {
            assert_eq!(status.as_str().parse::<ProductStatus>(), Ok(*status));
        }
        assert!("selling".parse::<ProductStatus>().is_err());
    }
}
