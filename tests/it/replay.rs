//! Keyed retries replay their first success, whatever shortcut would refuse a fresh call.

use ecommerce::proto::PlaceOrderRequest;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::support::{
    assert_error,
    shop::{charge, create_product, lines, pay_with_key, place, place_with},
    spawn_app,
};

#[sqlx::test(migrations = false)]
async fn keyed_retries_replay_after_a_sell_out_and_after_payment(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "last console", 500_000, 1).await;
    charge(&app, 1, 1_000_000).await;
    charge(&app, 2, 1_000_000).await;
    let request = PlaceOrderRequest {
        user_id: 1,
        items: lines(&[(product, 1)]),
        user_coupon_id: 0,
        idempotency_key: "buy-the-last-one".into(),
    };
    let first = place_with(&app, request.clone())
        .await
        .expect("the last unit");

    // Others find it sold out: the sold-out shortcut is now set locally and in Redis.
    for _ in 0..3 {
        assert_error(
            place(&app, 2, &[(product, 1)]).await,
            Code::FailedPrecondition,
            "OUT_OF_STOCK",
        );
    }
    let marker: Option<String> = fred::interfaces::KeysInterface::get(
        &app.redis,
        format!(
            "{}product:{{products}}:{product}:sold-out",
            app.redis_prefix
        ),
    )
    .await
    .unwrap();
    assert!(marker.is_some(), "the product is marked sold out");

    let replayed = place_with(&app, request.clone())
        .await
        .expect("the retry replays the order");
    assert_eq!(replayed, first);

    let payment = pay_with_key(&app, 1, first.id, "pay-the-last-one")
        .await
        .expect("paid");
    let replayed_payment = pay_with_key(&app, 1, first.id, "pay-the-last-one")
        .await
        .expect("the retry replays the payment");
    assert_eq!(replayed_payment, payment);
    // Without its key, the same payment is refused for what it is.
    assert_error(
        pay_with_key(&app, 1, first.id, "").await,
        Code::AlreadyExists,
        "ORDER_ALREADY_PAID",
    );
    let after_payment = place_with(&app, request)
        .await
        .expect("the order's retry still replays");
    assert_eq!(after_payment.id, first.id);
    assert_eq!(
        after_payment.status,
        ecommerce::proto::OrderStatus::Paid as i32
    );
    app.stop().await;
}
