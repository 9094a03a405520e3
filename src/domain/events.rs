//! Events sent to the data platform. Their JSON shape is a contract with that team: add
//! fields, never rename or remove them.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{OrderId, OrderItem, PaymentId, UserId, ValidationError, Won};

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

/// An outbox event parked for an operator: the data platform refused it for good, or it kept
/// failing for longer than the parking horizon. `reason` names the sink's last answer
/// (`HTTP 400`, `timed out`, ...).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct ParkedEvent {
    /// The outbox row, the cursor of the listing.
    pub id: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub payment_id: PaymentId,
    pub attempts: i32,
    pub reason: String,
    pub created_at: DateTime<Utc>,
    pub parked_at: DateTime<Utc>,
}

/// Which parked events a re-drive queues again: the ones named, or every one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedriveSelection {
    Events(Vec<Uuid>),
    All,
}

impl RedriveSelection {
    /// Ids one call may name; more are re-driven with `all`, or in several calls.
    pub const MAX_EVENTS: usize = 1000;

    /// Exactly one of `event_ids` (1..=1000 UUIDs) and `all` must be given.
    pub fn parse(event_ids: Vec<String>, all: bool) -> Result<Self, ValidationError> {
        match (event_ids.is_empty(), all) {
            (true, true) => Ok(Self::All),
            (false, false) if event_ids.len() <= Self::MAX_EVENTS => event_ids
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    Uuid::try_parse(id).map_err(|_| {
                        ValidationError::new(format!("event_ids[{i}]"), "is not a UUID")
                    })
                })
                .collect::<Result<_, _>>()
                .map(Self::Events),
            (false, false) => Err(ValidationError::new(
                "event_ids",
                "at most 1000 ids per call (or set all)",
            )),
            _ => Err(ValidationError::new(
                "event_ids",
                "set exactly one of event_ids and all",
            )),
        }
    }
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
                refunded_quantity: 0,
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

    #[test]
    fn a_redrive_names_events_or_all_but_not_both() {
        let id = Uuid::new_v4();
        assert_eq!(
            RedriveSelection::parse(vec![id.to_string()], false),
            Ok(RedriveSelection::Events(vec![id]))
        );
        assert_eq!(
            RedriveSelection::parse(vec![], true),
            Ok(RedriveSelection::All)
        );
        for (ids, all) in [(vec![], false), (vec![id.to_string()], true)] {
            let refused = RedriveSelection::parse(ids, all).unwrap_err();
            assert_eq!(refused.field, "event_ids");
        }
        let refused = RedriveSelection::parse(vec![id.to_string(), "x".into()], false).unwrap_err();
        assert_eq!(refused.field, "event_ids[1]");
        let too_many = vec![id.to_string(); RedriveSelection::MAX_EVENTS + 1];
        assert!(RedriveSelection::parse(too_many, false).is_err());
    }
}
