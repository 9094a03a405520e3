//! Events sent to the data platform: one per order transition, each the JSON mapping of its
//! message in `proto/ecommerce/v1/events.proto`. Their JSON shape is a contract with the
//! teams that consume them: add fields (to the proto first), never rename or remove them.
//!
//! The JSON is the proto3 JSON mapping as its parsers read it, written the way the first
//! payment events were: proto field names, every field present, 64-bit integers as JSON numbers
//! (the mapping prints them as strings but its parsers accept both; ids and won amounts stay
//! far below 2^53). The tests below parse each payload as its message and print it back.

use chrono::{DateTime, Utc};
use serde::Serializer;
use uuid::Uuid;

use super::{
    Order, OrderId, OrderItem, PaymentId, RefundedLine, UserCouponId, UserId, ValidationError, Won,
};

/// An order's events are numbered 1, 2, 3... in the order of its transitions, so a consumer
/// can order them (delivery order is not promised). Each transition takes its number under
/// the order's row lock.
pub type EventSequence = i32;

/// The payload of one order transition's event.
pub trait OrderEvent: serde::Serialize {
    /// The name of its message in events.proto: the outbox row's `event_type`, and the
    /// CloudEvents `type` after `ecommerce.v1.`.
    const TYPE: &'static str;

    /// The order it is about: the CloudEvents `subject`.
    fn order_id(&self) -> OrderId;

    /// The outbox row's `aggregate_id`: the order, except for a payment (below).
    fn aggregate_id(&self) -> i64 {
        self.order_id().get()
    }

    /// An id the payload itself carries, which the event must then have.
    fn event_id(&self) -> Option<Uuid> {
        None
    }
}

/// A user coupon id in an event: 0 for none, as in the API.
fn id_or_zero<S: Serializer>(id: &Option<UserCouponId>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_i64(id.map_or(0, UserCouponId::get))
}

/// An order was placed; its stock and coupon are reserved.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OrderPlaced {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub sequence: EventSequence,
    pub items: Vec<OrderItem>,
    pub total_amount: Won,
    pub discount_amount: Won,
    pub final_amount: Won,
    #[serde(serialize_with = "id_or_zero")]
    pub user_coupon_id: Option<UserCouponId>,
    pub placed_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl OrderPlaced {
    /// Placing is an order's first event (the schema's default of `orders.event_sequence`).
    pub const SEQUENCE: EventSequence = 1;

    pub fn of(order: &Order) -> Self {
        Self {
            order_id: order.id,
            user_id: order.user_id,
            sequence: Self::SEQUENCE,
            items: order.items.clone(),
            total_amount: order.pricing.total,
            discount_amount: order.pricing.discount,
            final_amount: order.pricing.final_amount,
            user_coupon_id: order.user_coupon_id,
            placed_at: order.created_at,
            expires_at: order.expires_at,
        }
    }
}

impl OrderEvent for OrderPlaced {
    const TYPE: &'static str = "OrderPlaced";

    fn order_id(&self) -> OrderId {
        self.order_id
    }
}

/// An open order was cancelled by its buyer; its stock and coupon were given back.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OrderCancelled {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub sequence: EventSequence,
    pub items: Vec<OrderItem>,
    #[serde(serialize_with = "id_or_zero")]
    pub user_coupon_id: Option<UserCouponId>,
    pub cancelled_at: DateTime<Utc>,
}

impl OrderCancelled {
    pub fn of(order: &Order, sequence: EventSequence, at: DateTime<Utc>) -> Self {
        Self {
            order_id: order.id,
            user_id: order.user_id,
            sequence,
            items: order.items.clone(),
            user_coupon_id: order.user_coupon_id,
            cancelled_at: at,
        }
    }
}

impl OrderEvent for OrderCancelled {
    const TYPE: &'static str = "OrderCancelled";

    fn order_id(&self) -> OrderId {
        self.order_id
    }
}

/// An open order passed its deadline unpaid and was closed; its stock and coupon were given
/// back.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OrderExpired {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub sequence: EventSequence,
    pub items: Vec<OrderItem>,
    #[serde(serialize_with = "id_or_zero")]
    pub user_coupon_id: Option<UserCouponId>,
    pub expired_at: DateTime<Utc>,
}

impl OrderExpired {
    pub fn of(order: &Order, sequence: EventSequence, at: DateTime<Utc>) -> Self {
        Self {
            order_id: order.id,
            user_id: order.user_id,
            sequence,
            items: order.items.clone(),
            user_coupon_id: order.user_coupon_id,
            expired_at: at,
        }
    }
}

impl OrderEvent for OrderExpired {
    const TYPE: &'static str = "OrderExpired";

    fn order_id(&self) -> OrderId {
        self.order_id
    }
}

/// A payment committed. `event_id` is the idempotency key the receiver deduplicates on (the
/// CloudEvents `id` too); the fields before `sequence` are those of the first release.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PaymentCompleted {
    pub event_id: Uuid,
    pub payment_id: PaymentId,
    pub order_id: OrderId,
    pub user_id: UserId,
    pub amount: Won,
    pub items: Vec<OrderItem>,
    pub paid_at: DateTime<Utc>,
    pub sequence: EventSequence,
}

impl OrderEvent for PaymentCompleted {
    const TYPE: &'static str = "PaymentCompleted";

    fn order_id(&self) -> OrderId {
        self.order_id
    }

    /// The payment: what `ListParkedEvents` has named since the first release.
    fn aggregate_id(&self) -> i64 {
        self.payment_id.get()
    }

    fn event_id(&self) -> Option<Uuid> {
        Some(self.event_id)
    }
}

/// A paid order was refunded, in part or in full. Written by the refund flow through
/// `app::events::record`, which numbers it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OrderRefunded {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub sequence: EventSequence,
    pub refund_id: i64,
    /// Credited by this refund.
    pub amount: Won,
    /// Refunded on the order so far, this refund included.
    pub refunded_amount: Won,
    pub fully_refunded: bool,
    pub lines: Vec<RefundedLine>,
    pub restocked: bool,
    pub reason: String,
    pub refunded_at: DateTime<Utc>,
}

impl OrderEvent for OrderRefunded {
    const TYPE: &'static str = "OrderRefunded";

    fn order_id(&self) -> OrderId {
        self.order_id
    }
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
    /// The payment of a PaymentCompleted; none for the order events.
    pub payment_id: Option<PaymentId>,
    /// The order it is about (its CloudEvents `subject`).
    pub order_id: Option<OrderId>,
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
    use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};

    use super::*;
    use crate::domain::{OrderStatus, Pricing, ProductId};

    fn id<T>(parse: fn(i64, &'static str) -> Result<T, ValidationError>, raw: i64) -> T {
        parse(raw, "id").unwrap()
    }

    fn items() -> Vec<OrderItem> {
        vec![OrderItem {
            product_id: id(ProductId::parse, 5),
            name: "pen".into(),
            unit_price: Won::new(4_500),
            quantity: 2,
            refunded_quantity: 0,
        }]
    }

    fn at(secs: i64, nanos: u32) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, nanos).unwrap()
    }

    fn order(coupon: Option<i64>) -> Order {
        Order {
            id: id(OrderId::parse, 2),
            user_id: id(UserId::parse, 1),
            status: OrderStatus::PendingPayment,
            items: items(),
            pricing: Pricing::new(Won::new(9_000), Won::new(1_000)),
            refunded: Won::ZERO,
            user_coupon_id: coupon.map(|c| id(UserCouponId::parse, c)),
            created_at: at(1_700_000_000, 123_456_000),
            expires_at: at(1_700_000_900, 123_456_000),
            paid_at: None,
            cancelled_at: None,
        }
    }

    fn payment() -> PaymentCompleted {
        PaymentCompleted {
            event_id: Uuid::nil(),
            payment_id: id(PaymentId::parse, 3),
            order_id: id(OrderId::parse, 2),
            user_id: id(UserId::parse, 1),
            amount: Won::new(9_000),
            items: items(),
            paid_at: DateTime::from_timestamp(0, 0).unwrap(),
            sequence: 2,
        }
    }

    fn refund() -> OrderRefunded {
        OrderRefunded {
            order_id: id(OrderId::parse, 2),
            user_id: id(UserId::parse, 1),
            sequence: 3,
            refund_id: 11,
            amount: Won::new(4_000),
            refunded_amount: Won::new(4_000),
            fully_refunded: false,
            lines: vec![RefundedLine {
                product_id: id(ProductId::parse, 5),
                quantity: 1,
                amount: Won::new(4_000),
            }],
            restocked: true,
            reason: "damaged".into(),
            refunded_at: at(1_700_000_500, 0),
        }
    }

    #[test]
    fn payment_completed_keeps_the_agreed_shape() {
        let json = serde_json::to_value(payment()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "event_id": "00000000-0000-0000-0000-000000000000",
                "payment_id": 3,
                "order_id": 2,
                "user_id": 1,
                "amount": 9000,
                "items": [{"product_id": 5, "name": "pen", "unit_price": 4500, "quantity": 2}],
                "paid_at": "1970-01-01T00:00:00Z",
                "sequence": 2
            })
        );
    }

    /// Parses `event`'s JSON as the events.proto message of its type (unknown fields refused)
    /// and prints it back with the options the payloads are written with: the same JSON, so
    /// every field exists in the proto with its type, and every proto field is written.
    fn assert_is_its_message<E: OrderEvent>(event: &E) -> serde_json::Value {
        let pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let message = pool
            .get_message_by_name(&format!("ecommerce.v1.{}", E::TYPE))
            .unwrap_or_else(|| panic!("{} is a message of events.proto", E::TYPE));
        let json = serde_json::to_value(event).unwrap();
        let parsed = DynamicMessage::deserialize_with_options(
            message,
            json.clone(),
            &DeserializeOptions::new().deny_unknown_fields(true),
        )
        .unwrap_or_else(|e| panic!("{} does not parse: {e}\n{json}", E::TYPE));
        let options = SerializeOptions::new()
            .use_proto_field_name(true)
            .stringify_64_bit_integers(false)
            .skip_default_fields(false);
        let printed = parsed
            .serialize_with_options(serde_json::value::Serializer, &options)
            .unwrap();
        assert_eq!(printed, json, "{} prints back as written", E::TYPE);
        json
    }

    #[test]
    fn every_payload_is_the_json_mapping_of_its_message() {
        let placed = assert_is_its_message(&OrderPlaced::of(&order(Some(7))));
        assert_eq!(placed["sequence"], 1);
        assert_eq!(placed["user_coupon_id"], 7);
        assert_eq!(placed["placed_at"], "2023-11-14T22:13:20.123456Z");
        let no_coupon = assert_is_its_message(&OrderPlaced::of(&order(None)));
        assert_eq!(no_coupon["user_coupon_id"], 0);
        assert_is_its_message(&OrderCancelled::of(
            &order(Some(7)),
            2,
            at(1_700_000_100, 0),
        ));
        assert_is_its_message(&OrderExpired::of(&order(None), 2, at(1_700_000_901, 5)));
        assert_is_its_message(&payment());
        assert_is_its_message(&refund());
    }

    #[test]
    fn each_event_names_its_order_and_the_row_it_is_filed_under() {
        assert_eq!(payment().order_id().get(), 2);
        assert_eq!(
            payment().aggregate_id(),
            3,
            "a payment is filed under its payment"
        );
        assert_eq!(payment().event_id(), Some(Uuid::nil()));
        let placed = OrderPlaced::of(&order(None));
        assert_eq!((placed.aggregate_id(), placed.event_id()), (2, None));
        assert_eq!(refund().aggregate_id(), 2);
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
