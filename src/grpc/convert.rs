//! Domain values to wire messages and back. Pure mapping: no rules live here.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

use crate::{
    app::{CouponStock, PopularProduct},
    domain::{
        Cart, CouponTerms, Discount, LedgerEntry, LedgerKind, Order, OrderId, OrderStatus,
        ParkedEvent, Payment, PaymentId, Product, ProductStatus, Refund, StatusSet, UserCoupon,
        UserCouponId, UserCouponStatus, UserId, ValidationError,
    },
    proto,
};

pub fn timestamp(at: DateTime<Utc>) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    })
}

pub fn optional_timestamp(at: Option<DateTime<Utc>>) -> Option<Timestamp> {
    at.and_then(timestamp)
}

/// The range `google.protobuf.Timestamp` defines: 0001-01-01T00:00:00Z ..= 9999-12-31T23:59:59Z.
/// chrono reaches much further (±262,143 years) than Postgres stores (4713 BC .. 294276 AD), so
/// without this bound a year like -200000 passed validation and failed in Postgres as INTERNAL.
const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

/// A required timestamp field.
pub fn parse_timestamp(
    ts: Option<Timestamp>,
    field: &'static str,
) -> Result<DateTime<Utc>, ValidationError> {
    let ts = ts.ok_or_else(|| ValidationError::new(field, "is required"))?;
    // Nanos past 999,999,999 are not a Timestamp, though chrono reads them as a leap second.
    let nanos = u32::try_from(ts.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000);
    nanos
        .filter(|_| TIMESTAMP_SECONDS.contains(&ts.seconds))
        .and_then(|nanos| DateTime::from_timestamp(ts.seconds, nanos))
        .ok_or_else(|| {
            ValidationError::new(
                field,
                "is not a valid timestamp (0001-01-01 to 9999-12-31, nanos 0..=999999999)",
            )
        })
}

pub fn product_status(status: ProductStatus) -> proto::ProductStatus {
    match status {
        ProductStatus::Selling => proto::ProductStatus::Selling,
        ProductStatus::Stopped => proto::ProductStatus::Stopped,
        ProductStatus::SoldOut => proto::ProductStatus::SoldOut,
    }
}

/// A required product status (UNSPECIFIED and unknown numbers are refused).
pub fn parse_product_status(
    raw: i32,
    field: &'static str,
) -> Result<ProductStatus, ValidationError> {
    match proto::ProductStatus::try_from(raw) {
        Ok(proto::ProductStatus::Selling) => Ok(ProductStatus::Selling),
        Ok(proto::ProductStatus::Stopped) => Ok(ProductStatus::Stopped),
        Ok(proto::ProductStatus::SoldOut) => Ok(ProductStatus::SoldOut),
        _ => Err(ValidationError::new(
            field,
            "must be SELLING, STOPPED or SOLD_OUT",
        )),
    }
}

pub fn product(p: Product) -> proto::Product {
    proto::Product {
        id: p.id.get(),
        name: p.name,
        price: p.price.get(),
        stock: p.stock,
        status: product_status(p.status).into(),
        created_at: timestamp(p.created_at),
        updated_at: timestamp(p.updated_at),
    }
}

pub fn cart(user_id: UserId, c: Cart) -> proto::Cart {
    proto::Cart {
        user_id: user_id.get(),
        total: c.total().map(|t| t.get()),
        purchasable: c.purchasable(),
        lines: c
            .lines
            .into_iter()
            .map(|l| proto::CartLine {
                product_id: l.product_id.get(),
                quantity: l.quantity.get(),
                purchasable: l.purchasable(),
                line_total: l.total().map(|t| t.get()),
                status: product_status(l.status).into(),
                unit_price: l.unit_price.get(),
                name: l.name,
            })
            .collect(),
    }
}

/// The coupon an order is to use: 0 means none.
pub fn parse_user_coupon(raw: i64) -> Result<Option<UserCouponId>, ValidationError> {
    match raw {
        0 => Ok(None),
        id => UserCouponId::parse(id, "user_coupon_id").map(Some),
    }
}

pub fn ledger_entry(e: LedgerEntry) -> proto::BalanceHistoryEntry {
    let kind = match e.kind {
        LedgerKind::Charge => proto::BalanceHistoryType::Charge,
        LedgerKind::Use => proto::BalanceHistoryType::Use,
        LedgerKind::Refund => proto::BalanceHistoryType::Refund,
    };
    proto::BalanceHistoryEntry {
        id: e.id,
        r#type: kind.into(),
        amount: e.amount.get(),
        balance_after: e.balance_after.get(),
        order_id: e.order_id.map_or(0, |id| id.get()),
        created_at: timestamp(e.created_at),
    }
}

pub fn discount(d: Discount) -> proto::Discount {
    let kind = match d {
        Discount::Fixed { amount } => proto::discount::Kind::Fixed(proto::FixedDiscount {
            amount: amount.get(),
        }),
        Discount::Percent {
            percent,
            max_discount,
        } => proto::discount::Kind::Percent(proto::PercentDiscount {
            percent: i32::from(percent),
            max_discount: max_discount.map_or(0, |m| m.get()),
        }),
    };
    proto::Discount { kind: Some(kind) }
}

pub fn parse_discount(d: Option<proto::Discount>) -> Result<Discount, ValidationError> {
    match d.and_then(|d| d.kind) {
        Some(proto::discount::Kind::Fixed(f)) => Discount::fixed(f.amount),
        Some(proto::discount::Kind::Percent(p)) => Discount::percent(p.percent, p.max_discount),
        None => Err(ValidationError::new(
            "discount",
            "is required: set fixed or percent",
        )),
    }
}

pub fn coupon_terms(t: CouponTerms) -> proto::CouponTerms {
    proto::CouponTerms {
        name: t.name.into_inner(),
        discount: Some(discount(t.discount)),
        min_order_amount: t.min_order_amount.get(),
        valid_days: t.valid_days.get(),
    }
}

pub fn coupon(stock: CouponStock) -> proto::Coupon {
    let c = stock.coupon;
    proto::Coupon {
        id: c.id.get(),
        terms: Some(coupon_terms(c.terms)),
        total_quantity: c.total_quantity,
        remaining_quantity: stock.remaining,
        issued_quantity: stock.issued,
        issue_starts_at: timestamp(c.window.starts_at()),
        issue_ends_at: timestamp(c.window.ends_at()),
        created_at: timestamp(c.created_at),
    }
}

pub fn user_coupon(uc: UserCoupon, now: DateTime<Utc>) -> proto::UserCoupon {
    let status = match uc.status.effective(uc.expires_at, now) {
        UserCouponStatus::Available => proto::UserCouponStatus::Available,
        UserCouponStatus::Reserved => proto::UserCouponStatus::Reserved,
        UserCouponStatus::Used => proto::UserCouponStatus::Used,
        UserCouponStatus::Expired => proto::UserCouponStatus::Expired,
    };
    proto::UserCoupon {
        id: uc.id.get(),
        coupon_id: uc.coupon_id.get(),
        user_id: uc.user_id.get(),
        status: status.into(),
        issued_at: timestamp(uc.issued_at),
        expires_at: timestamp(uc.expires_at),
        terms: Some(coupon_terms(uc.terms)),
        order_id: uc.order_id.map_or(0, |id| id.get()),
    }
}

pub fn order_status(status: OrderStatus) -> proto::OrderStatus {
    match status {
        OrderStatus::PendingPayment => proto::OrderStatus::PendingPayment,
        OrderStatus::Paid => proto::OrderStatus::Paid,
        OrderStatus::PartiallyRefunded => proto::OrderStatus::PartiallyRefunded,
        OrderStatus::Refunded => proto::OrderStatus::Refunded,
        OrderStatus::Cancelled => proto::OrderStatus::Cancelled,
        OrderStatus::Expired => proto::OrderStatus::Expired,
    }
}

pub fn order(o: Order) -> proto::Order {
    let status = order_status(o.status);
    proto::Order {
        id: o.id.get(),
        user_id: o.user_id.get(),
        status: status.into(),
        items: o
            .items
            .into_iter()
            .map(|i| proto::OrderItem {
                product_id: i.product_id.get(),
                name: i.name,
                unit_price: i.unit_price.get(),
                quantity: i.quantity,
                refunded_quantity: i.refunded_quantity,
            })
            .collect(),
        total_amount: o.pricing.total.get(),
        discount_amount: o.pricing.discount.get(),
        final_amount: o.pricing.final_amount.get(),
        user_coupon_id: o.user_coupon_id.map_or(0, |id| id.get()),
        created_at: timestamp(o.created_at),
        expires_at: timestamp(o.expires_at),
        paid_at: optional_timestamp(o.paid_at),
        cancelled_at: optional_timestamp(o.cancelled_at),
        refunded_amount: o.refunded.get(),
    }
}

pub fn refund(r: Refund) -> proto::Refund {
    proto::Refund {
        id: r.id.get(),
        order_id: r.order_id.get(),
        user_id: r.user_id.get(),
        lines: r
            .lines
            .into_iter()
            .map(|l| proto::refund::Line {
                product_id: l.product_id.get(),
                quantity: l.quantity,
                amount: l.amount.get(),
            })
            .collect(),
        amount: r.amount.get(),
        balance_after: r.balance_after.get(),
        restocked: r.restocked,
        coupon_returned: r.coupon_returned,
        reason: r.reason,
        created_at: timestamp(r.created_at),
    }
}

/// The statuses a list keeps (`field`: the repeated field's name); UNSPECIFIED and unknown
/// numbers are refused, naming the element.
pub fn parse_order_statuses(
    raw: &[i32],
    field: &'static str,
) -> Result<StatusSet<OrderStatus>, ValidationError> {
    let statuses = raw.iter().enumerate().map(|(i, &n)| {
        // Every proto value is named, so a status added to the contract must be mapped here.
        match proto::OrderStatus::try_from(n) {
            Ok(proto::OrderStatus::PendingPayment) => Ok(OrderStatus::PendingPayment),
            Ok(proto::OrderStatus::Paid) => Ok(OrderStatus::Paid),
            Ok(proto::OrderStatus::PartiallyRefunded) => Ok(OrderStatus::PartiallyRefunded),
            Ok(proto::OrderStatus::Refunded) => Ok(OrderStatus::Refunded),
            Ok(proto::OrderStatus::Cancelled) => Ok(OrderStatus::Cancelled),
            Ok(proto::OrderStatus::Expired) => Ok(OrderStatus::Expired),
            Ok(proto::OrderStatus::Unspecified) | Err(_) => Err(ValidationError::new(
                format!("{field}[{i}]"),
                "must be an order status other than UNSPECIFIED",
            )),
        }
    });
    Ok(StatusSet::orders(statuses.collect::<Result<Vec<_>, _>>()?))
}

/// The product statuses a list keeps, as [`parse_order_statuses`] for orders.
pub fn parse_product_statuses(
    raw: &[i32],
    field: &'static str,
) -> Result<StatusSet<ProductStatus>, ValidationError> {
    let statuses = raw.iter().enumerate().map(|(i, &n)| {
        parse_product_status(n, field)
            .map_err(|e| ValidationError::new(format!("{field}[{i}]"), e.message))
    });
    Ok(StatusSet::products(
        statuses.collect::<Result<Vec<_>, _>>()?,
    ))
}

/// An optional timestamp field: unset is `None`; a set one must be valid.
pub fn parse_optional_timestamp(
    ts: Option<Timestamp>,
    field: &'static str,
) -> Result<Option<DateTime<Utc>>, ValidationError> {
    ts.map(|ts| parse_timestamp(Some(ts), field)).transpose()
}

pub fn payment(p: Payment) -> proto::Payment {
    proto::Payment {
        id: p.id.get(),
        order_id: p.order_id.get(),
        user_id: p.user_id.get(),
        amount: p.amount.get(),
        balance_after: p.balance_after.get(),
        paid_at: timestamp(p.paid_at),
    }
}

pub fn parked_event(e: ParkedEvent) -> proto::ParkedEvent {
    proto::ParkedEvent {
        event_id: e.event_id.to_string(),
        event_type: e.event_type,
        payment_id: e.payment_id.map_or(0, PaymentId::get),
        order_id: e.order_id.map_or(0, OrderId::get),
        attempts: e.attempts,
        reason: e.reason,
        created_at: timestamp(e.created_at),
        parked_at: timestamp(e.parked_at),
    }
}

pub fn popular_product(p: PopularProduct) -> proto::PopularProduct {
    proto::PopularProduct {
        rank: p.rank as i32,
        product: Some(product(p.product)),
        sold_quantity: p.sold,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_garbage_is_refused() {
        let at = DateTime::from_timestamp(1_700_000_000, 123_000_000).unwrap();
        assert_eq!(parse_timestamp(timestamp(at), "t").unwrap(), at);
        assert!(parse_timestamp(None, "t").is_err());
        let bad = Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        };
        assert!(parse_timestamp(Some(bad), "t").is_err());
        let negative_nanos = Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert!(parse_timestamp(Some(negative_nanos), "t").is_err());
    }

    #[test]
    fn timestamps_outside_the_protobuf_range_are_refused() {
        let at = |seconds, nanos| parse_timestamp(Some(Timestamp { seconds, nanos }), "t");
        assert!(at(-62_135_596_800, 0).is_ok(), "0001-01-01T00:00:00Z");
        assert!(
            at(253_402_300_799, 999_999_999).is_ok(),
            "9999-12-31T23:59:59.999999999Z"
        );
        assert!(at(-62_135_596_801, 0).is_err());
        assert!(at(253_402_300_800, 0).is_err());
        // chrono accepts these, Postgres does not store them.
        assert!(at(DateTime::<Utc>::MIN_UTC.timestamp(), 0).is_err());
        assert!(at(DateTime::<Utc>::MAX_UTC.timestamp(), 0).is_err());
        // chrono's leap second (nanos >= 1e9 at :59) is not a protobuf Timestamp.
        assert!(at(1_700_000_039, 1_500_000_000).is_err());
        assert!(at(1_700_000_039, 1_000_000_000).is_err());
    }

    #[test]
    fn unknown_statuses_are_refused() {
        assert_eq!(
            parse_product_status(1, "status").unwrap(),
            ProductStatus::Selling
        );
        for raw in [0, 4, -1, i32::MAX] {
            assert!(parse_product_status(raw, "status").is_err());
        }
    }

    #[test]
    fn status_lists_name_the_bad_element() {
        let kept = parse_order_statuses(&[2, 2, 3], "statuses").unwrap().kept();
        assert_eq!(kept, vec![OrderStatus::Paid, OrderStatus::Cancelled]);
        assert_eq!(
            parse_order_statuses(&[], "statuses").unwrap().kept(),
            OrderStatus::ALL.to_vec()
        );
        for (raw, field) in [(vec![0], "statuses[0]"), (vec![1, 99], "statuses[1]")] {
            let err = parse_order_statuses(&raw, "statuses").unwrap_err();
            assert_eq!(err.field, field);
        }
        let err = parse_product_statuses(&[1, -1], "statuses").unwrap_err();
        assert_eq!(err.field, "statuses[1]");
        assert!(parse_optional_timestamp(None, "t").unwrap().is_none());
    }
}
