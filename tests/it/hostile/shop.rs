//! The shop the calls meet: small, but with a row in every state a call can run into.

use chrono::Utc;
use ecommerce::proto::{
    CreateCouponRequest, Discount, OrderLine, PercentDiscount, PlaceOrderRequest, ProductStatus,
    discount,
};
use prost_types::Timestamp;

use crate::support::{
    TestApp,
    coupons::{coupon_request, create_coupon_with, issue},
    shop::{charge, create_product_with_status, pay, place, place_with},
};

/// A few products of each status, coupons that can and cannot be issued, funded and unfunded
/// users, coupons held, a pending order and a paid one. All ids fall in 1..=6, where
/// `fields::id` draws most of its values.
pub(super) async fn build_fixture(app: &TestApp) {
    use ProductStatus::*;
    for (name, price, stock, status) in [
        ("keyboard", 10_000, 100, Selling),
        ("mouse", 3_000, 5, Selling),
        ("lamp", 7_000, 0, Selling),
        ("discontinued radio", 20_000, 10, Stopped),
        ("concert ticket", 90_000, 0, SoldOut),
        ("free sticker", 0, 50, Selling),
    ] {
        create_product_with_status(app, name, price, stock, status).await;
    }
    let fixed = create_coupon_with(app, coupon_request(10)).await;
    let percent = create_coupon_with(
        app,
        CreateCouponRequest {
            name: "10% off, at most 2,000".into(),
            discount: Some(Discount {
                kind: Some(discount::Kind::Percent(PercentDiscount {
                    percent: 10,
                    max_discount: 2_000,
                })),
            }),
            min_order_amount: 5_000,
            ..coupon_request(3)
        },
    )
    .await;
    let now = Utc::now();
    create_coupon_with(
        app,
        CreateCouponRequest {
            name: "starts tomorrow".into(),
            issue_starts_at: Some(Timestamp {
                seconds: (now + chrono::Duration::days(1)).timestamp(),
                nanos: 0,
            }),
            issue_ends_at: Some(Timestamp {
                seconds: (now + chrono::Duration::days(2)).timestamp(),
                nanos: 0,
            }),
            ..coupon_request(5)
        },
    )
    .await;

    charge(app, 1, 1_000_000).await;
    charge(app, 2, 5_000).await;
    let held = issue(app, fixed, 1).await.expect("issue");
    issue(app, percent, 2).await.expect("issue");
    place_with(
        app,
        PlaceOrderRequest {
            user_id: 1,
            items: vec![OrderLine {
                product_id: 1,
                quantity: 2,
            }],
            user_coupon_id: held,
            idempotency_key: String::new(),
        },
    )
    .await
    .expect("pending order");
    let paid = place(app, 1, &[(2, 1)]).await.expect("order to pay");
    pay(app, 1, paid.id).await.expect("paid order");
    place(app, 2, &[(6, 3)]).await.expect("pending free order");
}
