//! Carts: what a shopper means to buy, shown at today's prices.
//!
//! Invariant: a cart holds at most [`MAX_ORDER_LINES`] lines, one per product, each with a
//! valid [`Quantity`], so checking it out always makes a valid order. Totals are checked sums:
//! a total that does not fit in a [`Won`] is reported as absent, never wrapped or saturated.

use super::{MAX_ORDER_LINES, ProductId, ProductStatus, Quantity, ValidationError, Won};

/// What SetItem does to a line: 1..=1000 units, or 0 to remove it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineChange {
    Set(Quantity),
    Remove,
}

impl LineChange {
    pub fn parse(raw: i32, field: &'static str) -> Result<Self, ValidationError> {
        match raw {
            0 => Ok(LineChange::Remove),
            raw => Quantity::parse(raw, field).map(LineChange::Set),
        }
    }
}

/// The most lines a cart holds: as many as one order.
pub const MAX_CART_LINES: usize = MAX_ORDER_LINES;

/// One line of a cart with its product as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CartLine {
    pub product_id: ProductId,
    pub quantity: Quantity,
    pub name: String,
    pub unit_price: Won,
    pub status: ProductStatus,
    pub stock: i64,
}

impl CartLine {
    /// On sale with enough units for this line right now (a checkout may still lose the race).
    pub fn purchasable(&self) -> bool {
        self.status == ProductStatus::Selling && self.stock >= i64::from(self.quantity.get())
    }

    /// `None` when the line's price does not fit in a [`Won`].
    pub fn total(&self) -> Option<Won> {
        self.unit_price.checked_mul(i64::from(self.quantity.get()))
    }
}

/// A user's cart, lines by product id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cart {
    pub lines: Vec<CartLine>,
}

impl Cart {
    /// The sum of the line totals; `None` when it does not fit in a [`Won`].
    pub fn total(&self) -> Option<Won> {
        self.lines
            .iter()
            .try_fold(Won::ZERO, |sum, line| sum.checked_add(line.total()?))
    }

    /// Not empty, and every line purchasable.
    pub fn purchasable(&self) -> bool {
        !self.lines.is_empty() && self.lines.iter().all(CartLine::purchasable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(
        product: i64,
        price: i64,
        quantity: i32,
        status: ProductStatus,
        stock: i64,
    ) -> CartLine {
        CartLine {
            product_id: ProductId::parse(product, "product_id").unwrap(),
            quantity: Quantity::parse(quantity, "quantity").unwrap(),
            name: format!("product {product}"),
            unit_price: Won::new(price),
            status,
            stock,
        }
    }

    #[test]
    fn zero_removes_and_other_quantities_are_bounded() {
        assert_eq!(LineChange::parse(0, "quantity"), Ok(LineChange::Remove));
        assert!(
            matches!(LineChange::parse(1000, "quantity"), Ok(LineChange::Set(q)) if q.get() == 1000)
        );
        for bad in [-1, 1001, i32::MIN, i32::MAX] {
            assert_eq!(
                LineChange::parse(bad, "quantity").unwrap_err().field,
                "quantity"
            );
        }
    }

    #[test]
    fn a_line_is_purchasable_only_on_sale_with_enough_stock() {
        assert!(line(1, 100, 3, ProductStatus::Selling, 3).purchasable());
        assert!(!line(1, 100, 3, ProductStatus::Selling, 2).purchasable());
        assert!(!line(1, 100, 1, ProductStatus::Stopped, 10).purchasable());
        assert!(!line(1, 100, 1, ProductStatus::SoldOut, 10).purchasable());
    }

    #[test]
    fn totals_are_checked_sums() {
        let cart = Cart {
            lines: vec![
                line(1, 1_000, 3, ProductStatus::Selling, 10),
                line(2, 2_500, 2, ProductStatus::Selling, 10),
            ],
        };
        assert_eq!(cart.total(), Some(Won::new(8_000)));
        assert!(cart.purchasable());

        let huge = line(3, i64::MAX / 2, 3, ProductStatus::Selling, 10);
        assert_eq!(huge.total(), None);
        let overflowing = Cart {
            lines: vec![
                line(1, i64::MAX, 1, ProductStatus::Selling, 10),
                line(2, 1, 1, ProductStatus::Selling, 10),
            ],
        };
        assert_eq!(overflowing.total(), None);
        assert!(!Cart { lines: vec![] }.purchasable());
        assert_eq!(Cart { lines: vec![] }.total(), Some(Won::ZERO));
    }
}
