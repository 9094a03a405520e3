//! Events sent to the data platform. Their JSON shape is a contract with that team: add
//! fields, never rename or remove them.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{OrderId, OrderItem, PaymentId, UserId, Won};

/// A payment committed. `event_id` is the idempotency key the receiver deduplicates on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PaymentCompleted {
    pub event_id: Uuid,
    pub payment_id: PaymentId,
    pub order_id: OrderId,
    pub user_id: UserId,
    pub amount: Won,
    pub items: Vec<OrderItem>,
    pub paid_at: DateTime<Utc>,
}

impl PaymentCompleted {
    pub const EVENT_TYPE: &'static str = "PaymentCompleted";
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ProductId;

    #[test]
    fn payment_completed_serialises_to_the_agreed_shape() {
        let event = PaymentCompleted {
            event_id: Uuid::nil(),
            payment_id: PaymentId::parse(3, "id").unwrap(),
            order_id: OrderId::parse(2, "id").unwrap(),
            user_id: UserId::parse(1, "id").unwrap(),
            amount: Won::new(9_000),
            items: vec![OrderItem {
                product_id: ProductId::parse(5, "id").unwrap(),
                name: "pen".into(),
                unit_price: Won::new(4_500),
                quantity: 2,
            }],
            paid_at: DateTime::from_timestamp(0, 0).unwrap(),
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "event_id": "00000000-0000-0000-0000-000000000000",
                "payment_id": 3,
                "order_id": 2,
                "user_id": 1,
                "amount": 9000,
                "items": [{"product_id": 5, "name": "pen", "unit_price": 4500, "quantity": 2}],
                "paid_at": "1970-01-01T00:00:00Z"
            })
        );
    }
}
