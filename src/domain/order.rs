//! Order lines, pricing and the order life cycle:
//! PENDING_PAYMENT -> PAID | CANCELLED | EXPIRED; PAID -> PARTIALLY_REFUNDED | REFUNDED;
//! PARTIALLY_REFUNDED -> PARTIALLY_REFUNDED | REFUNDED; nothing leaves REFUNDED, CANCELLED or
//! EXPIRED.

use std::collections::HashSet;

use chrono::{DateTime, Utc};

use super::{
    OrderId, PaymentId, ProductId, UserCouponId, UserId, ValidationError, Won, macros::text_enum,
};

/// Lines of one order, and so of one cart (a cart must always make a valid order).
pub const MAX_ORDER_LINES: usize = 50;
pub const MAX_QUANTITY: i32 = 1000;

/// Units of one product in one order or cart line: 1..=1000.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity(i32);

impl Quantity {
    /// Accepts 1..=1000; `field` names the request field in the error.
    pub fn parse(raw: i32, field: &'static str) -> Result<Self, ValidationError> {
        if (1..=MAX_QUANTITY).contains(&raw) {
            Ok(Self(raw))
        } else {
            Err(ValidationError::new(field, "must be between 1 and 1000"))
        }
    }

    pub fn get(self) -> i32 {
        self.0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrderLine {
    pub product_id: ProductId,
    pub quantity: Quantity,
}

/// The lines of an order: 1..=50 of them, each product once, sorted by product id so that
/// every transaction locks products in the same order and two orders never deadlock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderLines(Vec<OrderLine>);

impl OrderLines {
    pub fn parse(raw: impl ExactSizeIterator<Item = (i64, i32)>) -> Result<Self, ValidationError> {
        Self::parse_field(raw, "items")
    }

    /// The lines of request field `field` (`items` of an order, `lines` of a refund).
    pub fn parse_field(
        raw: impl ExactSizeIterator<Item = (i64, i32)>,
        field: &'static str,
    ) -> Result<Self, ValidationError> {
        if raw.len() == 0 {
            return Err(ValidationError::new(
                field,
                "must contain at least one line",
            ));
        }
        if raw.len() > MAX_ORDER_LINES {
            return Err(ValidationError::new(field, "must contain at most 50 lines"));
        }
        let mut seen = HashSet::with_capacity(raw.len());
        let mut lines = Vec::with_capacity(raw.len());
        for (i, (product_id, quantity)) in raw.enumerate() {
            let product_id = ProductId::parse(product_id, "product_id")
                .map_err(|e| ValidationError::new(format!("{field}[{i}].product_id"), e.message))?;
            let quantity = Quantity::parse(quantity, "quantity")
                .map_err(|e| ValidationError::new(format!("{field}[{i}].quantity"), e.message))?;
            if !seen.insert(product_id) {
                return Err(ValidationError::new(
                    format!("{field}[{i}].product_id"),
                    "repeats a product; name each product once with its total quantity",
                ));
            }
            lines.push(OrderLine {
                product_id,
                quantity,
            });
        }
        lines.sort_by_key(|line| line.product_id);
        Ok(Self(lines))
    }

    pub fn as_slice(&self) -> &[OrderLine] {
        &self.0
    }

    /// A canonical text of the lines, used to recognise a retried request.
    pub fn fingerprint(&self) -> String {
        self.0
            .iter()
            .map(|l| format!("{}x{}", l.product_id, l.quantity.get()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OrderStatus {
    PendingPayment,
    Paid,
    PartiallyRefunded,
    Refunded,
    Cancelled,
    Expired,
}

text_enum!(OrderStatus {
    PendingPayment => "PENDING_PAYMENT",
    Paid => "PAID",
    PartiallyRefunded => "PARTIALLY_REFUNDED",
    Refunded => "REFUNDED",
    Cancelled => "CANCELLED",
    Expired => "EXPIRED",
});

impl OrderStatus {
    /// Only an order awaiting payment can be paid, cancelled or expired.
    pub fn is_open(self) -> bool {
        self == OrderStatus::PendingPayment
    }

    /// Only a paid order with units left to refund can be refunded.
    pub fn is_refundable(self) -> bool {
        matches!(self, OrderStatus::Paid | OrderStatus::PartiallyRefunded)
    }
}

/// What an order costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pricing {
    pub total: Won,
    pub discount: Won,
    pub final_amount: Won,
}

impl Pricing {
    /// Sums `unit_price * quantity` over the items; `None` when the total overflows.
    pub fn total_of(items: &[OrderItem]) -> Option<Won> {
        items.iter().try_fold(Won::ZERO, |sum, item| {
            sum.checked_add(item.unit_price.checked_mul(i64::from(item.quantity))?)
        })
    }

    /// `discount` must come from [`super::Discount::apply`], so it never exceeds `total`.
    pub fn new(total: Won, discount: Won) -> Self {
        let discount = discount.min(total);
        Self {
            total,
            discount,
            final_amount: Won::new(total.get() - discount.get()),
        }
    }
}

/// One line of a placed order, with the name and price as they were when it was placed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct OrderItem {
    pub product_id: ProductId,
    pub name: String,
    pub unit_price: Won,
    pub quantity: i32,
    /// Units refunded so far (0..=quantity). Not part of an event's item: a payment's event
    /// describes the order as it was paid.
    #[serde(skip)]
    pub refunded_quantity: i32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Order {
    pub id: OrderId,
    pub user_id: UserId,
    pub status: OrderStatus,
    pub items: Vec<OrderItem>,
    pub pricing: Pricing,
    /// What refunds gave back so far (0..=final amount).
    pub refunded: Won,
    pub user_coupon_id: Option<UserCouponId>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Payment {
    pub id: PaymentId,
    pub order_id: OrderId,
    pub user_id: UserId,
    pub amount: Won,
    pub balance_after: Won,
    pub paid_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(lines: &[(i64, i32)]) -> Result<OrderLines, ValidationError> {
        OrderLines::parse(lines.iter().copied())
    }

    #[test]
    fn lines_are_validated_and_sorted() {
        let lines = parse(&[(3, 1), (1, 2)]).unwrap();
        let ids: Vec<i64> = lines
            .as_slice()
            .iter()
            .map(|l| l.product_id.get())
            .collect();
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(lines.fingerprint(), "1x2,3x1");
    }

    #[test]
    fn invalid_lines_name_the_field() {
        assert_eq!(parse(&[]).unwrap_err().field, "items");
        let many: Vec<(i64, i32)> = (1..=51).map(|i| (i, 1)).collect();
        assert_eq!(parse(&many).unwrap_err().field, "items");
        assert_eq!(
            parse(&[(1, 1), (0, 1)]).unwrap_err().field,
            "items[1].product_id"
        );
        assert_eq!(parse(&[(1, 0)]).unwrap_err().field, "items[0].quantity");
        assert_eq!(parse(&[(1, 1001)]).unwrap_err().field, "items[0].quantity");
        assert_eq!(parse(&[(1, -1)]).unwrap_err().field, "items[0].quantity");
        assert_eq!(
            parse(&[(1, 1), (2, 1), (1, 3)]).unwrap_err().field,
            "items[2].product_id"
        );
        assert!(parse(&[(1, 1000)]).is_ok());
    }

    fn item(product: i64, price: i64, quantity: i32) -> OrderItem {
        OrderItem {
            product_id: ProductId::parse(product, "id").unwrap(),
            name: format!("product {product}"),
            unit_price: Won::new(price),
            quantity,
            refunded_quantity: 0,
        }
    }

    #[test]
    fn pricing_sums_lines_and_subtracts_the_discount() {
        let total = Pricing::total_of(&[item(1, 1_000, 3), item(2, 2_500, 2)]).unwrap();
        assert_eq!(total, Won::new(8_000));
        let p = Pricing::new(total, Won::new(1_500));
        assert_eq!(p.final_amount, Won::new(6_500));
        assert_eq!(Pricing::new(total, Won::new(9_000)).final_amount, Won::ZERO);
        assert_eq!(Pricing::total_of(&[item(1, i64::MAX, 2)]), None);
        assert_eq!(
            Pricing::total_of(&[item(1, i64::MAX, 1), item(2, 1, 1)]),
            None
        );
    }

    #[test]
    fn only_pending_orders_are_open_and_only_paid_ones_refundable() {
        use OrderStatus::*;
        for s in [
            PendingPayment,
            Paid,
            PartiallyRefunded,
            Refunded,
            Cancelled,
            Expired,
        ] {
            assert_eq!(s.is_open(), s == PendingPayment, "{s}");
            assert_eq!(
                s.is_refundable(),
                matches!(s, Paid | PartiallyRefunded),
                "{s}"
            );
            assert_eq!(s.as_str().parse::<OrderStatus>(), Ok(s));
        }
    }
}
