use std::{collections::HashMap, time::Duration};

use ecommerce::proto::{
    CancelOrderRequest, CreateCouponRequest, OrderStatus, PlaceOrderRequest, ProductStatus,
    UpdateProductRequest,
};
use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::support::{
    TestApp, assert_error,
    coupons::{coupon_request, create_coupon_with, issue, percent},
    eventually, invalid_field, reason,
    shop::{
        assert_ledger_matches, balance, charge, create_product, create_product_with_status,
        get_order, lines, pay, pay_with_key, place, place_with, stock,
    },
    spawn_app, spawn_app_with,
};

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pg).await.unwrap()
}

/// Issues a coupon made from `request` to `user` and returns the user coupon id.
async fn coupon_for(app: &TestApp, user: i64, request: CreateCouponRequest) -> i64 {
    let coupon = create_coupon_with(app, request).await;
    issue(app, coupon, user).await.expect("issue coupon")
}

async fn coupon_status(app: &TestApp, user_coupon: i64) -> (String, Option<i64>) {
    sqlx::query_as("SELECT status, order_id FROM user_coupons WHERE id = $1")
        .bind(user_coupon)
        .fetch_one(&app.pg)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn a_hundred_buyers_for_ten_units(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "limited sneakers", 10_000, 10).await;
    for user in 1..=100 {
        charge(&app, user, 10_000).await;
    }
    let one = [(product, 1)];
    let results = join_all((1..=100).map(|user| place(&app, user, &one))).await;
    let mut outcomes: HashMap<(Code, String), usize> = HashMap::new();
    let mut placed = 0;
    for result in results {
        match result {
            Ok(order) => {
                assert_eq!(order.status(), OrderStatus::PendingPayment);
                placed += 1;
            }
            Err(status) => *outcomes.entry(reason(&status)).or_default() += 1,
        }
    }
    assert_eq!(placed, 10);
    assert_eq!(
        outcomes,
        HashMap::from([((Code::FailedPrecondition, "OUT_OF_STOCK".to_string()), 90)])
    );
    assert_eq!(stock(&app, product).await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM orders").await, 10);
    assert_eq!(
        count(&app, "SELECT sum(quantity)::bigint FROM order_items").await,
        10
    );
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn fifty_concurrent_payments_of_one_order_pay_once(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "lamp", 7_000, 5).await;
    charge(&app, 1, 100_000).await;
    let order = place(&app, 1, &[(product, 2)]).await.unwrap();
    assert_eq!(order.final_amount, 14_000);

    let results = join_all((0..50).map(|_| pay(&app, 1, order.id))).await;
    let paid: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
    assert_eq!(paid.len(), 1);
    for refused in results.into_iter().filter_map(Result::err) {
        assert_eq!(
            reason(&refused),
            (Code::AlreadyExists, "ORDER_ALREADY_PAID".to_string())
        );
    }
    assert_eq!(count(&app, "SELECT count(*) FROM payments").await, 1);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM balance_history WHERE kind = 'USE'"
        )
        .await,
        1
    );
    let events = "SELECT count(*) FROM outbox_events WHERE event_type = 'PaymentCompleted'";
    assert_eq!(count(&app, events).await, 1);
    assert_eq!(count(&app, "SELECT count(*) FROM outbox_events").await, 2);
    assert_eq!(assert_ledger_matches(&app, 1).await, 86_000);
    let order = get_order(&app, 1, order.id).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Paid);
    assert!(order.paid_at.is_some());
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn money_for_three_orders_pays_three(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "book", 12_000, 100).await;
    charge(&app, 3, 36_000).await;
    let attempts = (0..10).map(|_| async {
        let order = place(&app, 3, &[(product, 1)]).await?;
        pay(&app, 3, order.id).await
    });
    let results = join_all(attempts).await;
    let paid = results.iter().filter(|r| r.is_ok()).count();
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(
            reason(refused),
            (Code::FailedPrecondition, "INSUFFICIENT_BALANCE".to_string())
        );
    }
    assert_eq!(paid, 3);
    assert_eq!(assert_ledger_matches(&app, 3).await, 0);
    assert_eq!(
        count(&app, "SELECT count(*) FROM orders WHERE status = 'PAID'").await,
        3
    );
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn coupons_discount_orders_or_are_refused(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "headphones", 50_000, 100).await;
    charge(&app, 1, 1_000_000).await;
    charge(&app, 2, 1_000_000).await;

    // Fixed: 5,000 off.
    let fixed = coupon_for(&app, 1, coupon_request(10)).await;
    let order = place_with(
        &app,
        PlaceOrderRequest {
            user_id: 1,
            items: lines(&[(product, 2)]),
            user_coupon_id: fixed,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (
            order.total_amount,
            order.discount_amount,
            order.final_amount
        ),
        (100_000, 5_000, 95_000)
    );
    assert_eq!(
        coupon_status(&app, fixed).await,
        ("RESERVED".into(), Some(order.id))
    );
    pay(&app, 1, order.id).await.unwrap();
    assert_eq!(
        coupon_status(&app, fixed).await,
        ("USED".into(), Some(order.id))
    );

    // Percent, capped: 30% of 150,000 is 45,000, capped at 20,000.
    let capped = coupon_for(
        &app,
        1,
        CreateCouponRequest {
            discount: percent(30, 20_000),
            ..coupon_request(10)
        },
    )
    .await;
    let order = place_with(
        &app,
        PlaceOrderRequest {
            user_id: 1,
            items: lines(&[(product, 3)]),
            user_coupon_id: capped,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (order.discount_amount, order.final_amount),
        (20_000, 130_000)
    );

    let place_with_coupon = |user: i64, coupon: i64, quantity: i32| {
        place_with(
            &app,
            PlaceOrderRequest {
                user_id: user,
                items: lines(&[(product, quantity)]),
                user_coupon_id: coupon,
                ..Default::default()
            },
        )
    };
    // The capped coupon is now held by that pending order.
    assert_error(
        place_with_coupon(1, capped, 1).await,
        Code::FailedPrecondition,
        "COUPON_UNUSABLE",
    );
    // Below the minimum order amount.
    let minimum = coupon_for(
        &app,
        1,
        CreateCouponRequest {
            min_order_amount: 200_000,
            ..coupon_request(10)
        },
    )
    .await;
    assert_error(
        place_with_coupon(1, minimum, 3).await,
        Code::FailedPrecondition,
        "COUPON_UNUSABLE",
    );
    place_with_coupon(1, minimum, 4)
        .await
        .expect("200,000 meets the minimum");
    // Expired.
    let expired = coupon_for(&app, 1, coupon_request(10)).await;
    sqlx::query("UPDATE user_coupons SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(expired)
        .execute(&app.pg)
        .await
        .unwrap();
    assert_error(
        place_with_coupon(1, expired, 1).await,
        Code::FailedPrecondition,
        "COUPON_UNUSABLE",
    );
    // Someone else's, and one that does not exist.
    let theirs = coupon_for(&app, 2, coupon_request(10)).await;
    for coupon in [theirs, 999_999] {
        assert_error(
            place_with_coupon(1, coupon, 1).await,
            Code::FailedPrecondition,
            "COUPON_UNUSABLE",
        );
    }
    assert_eq!(
        coupon_status(&app, theirs).await,
        ("AVAILABLE".into(), None)
    );
    assert_ledger_matches(&app, 1).await;
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_failing_line_leaves_nothing_behind(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let plenty = create_product(&app, "socks", 3_000, 50).await;
    let scarce = create_product(&app, "rare vinyl", 40_000, 1).await;
    let stopped =
        create_product_with_status(&app, "old model", 1_000, 10, ProductStatus::Stopped).await;
    charge(&app, 1, 500_000).await;
    let coupon = coupon_for(&app, 1, coupon_request(5)).await;
    let order_of = |items: &[(i64, i32)]| PlaceOrderRequest {
        user_id: 1,
        items: lines(items),
        user_coupon_id: coupon,
        ..Default::default()
    };

    let status = assert_error(
        place_with(&app, order_of(&[(plenty, 4), (scarce, 2)])).await,
        Code::FailedPrecondition,
        "OUT_OF_STOCK",
    );
    let info = tonic_types::StatusExt::get_details_error_info(&status).unwrap();
    assert_eq!(info.metadata["product_id"], scarce.to_string());
    assert_error(
        place_with(&app, order_of(&[(plenty, 1), (stopped, 1)])).await,
        Code::FailedPrecondition,
        "PRODUCT_NOT_SELLING",
    );
    assert_error(
        place_with(&app, order_of(&[(plenty, 1), (plenty + 1000, 1)])).await,
        Code::NotFound,
        "PRODUCT_NOT_FOUND",
    );

    assert_eq!(stock(&app, plenty).await, 50);
    assert_eq!(stock(&app, scarce).await, 1);
    assert_eq!(
        coupon_status(&app, coupon).await,
        ("AVAILABLE".into(), None)
    );
    assert_eq!(balance(&app, 1).await, 500_000);
    assert_eq!(count(&app, "SELECT count(*) FROM orders").await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM order_items").await, 0);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn cancel_releases_stock_and_coupon_but_not_a_paid_order(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "kettle", 20_000, 3).await;
    charge(&app, 1, 200_000).await;
    let coupon = coupon_for(&app, 1, coupon_request(5)).await;
    let order = place_with(
        &app,
        PlaceOrderRequest {
            user_id: 1,
            items: lines(&[(product, 3)]),
            user_coupon_id: coupon,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(stock(&app, product).await, 0);
    // Sold out now: the next order is refused (from Redis).
    assert_error(
        place(&app, 1, &[(product, 1)]).await,
        Code::FailedPrecondition,
        "OUT_OF_STOCK",
    );

    let cancel = |user_id: i64, order_id: i64| {
        let mut client = app.orders();
        async move {
            client
                .cancel_order(CancelOrderRequest { order_id, user_id })
                .await
                .map(|r| r.into_inner().order.unwrap())
        }
    };
    assert_error(
        cancel(2, order.id).await,
        Code::PermissionDenied,
        "NOT_ORDER_OWNER",
    );
    let cancelled = cancel(1, order.id).await.unwrap();
    assert_eq!(cancelled.status(), OrderStatus::Cancelled);
    assert!(cancelled.cancelled_at.is_some());
    assert_eq!(stock(&app, product).await, 3);
    assert_eq!(
        coupon_status(&app, coupon).await,
        ("AVAILABLE".into(), None)
    );
    assert_error(
        cancel(1, order.id).await,
        Code::FailedPrecondition,
        "ORDER_CLOSED",
    );
    assert_error(
        pay(&app, 1, order.id).await,
        Code::FailedPrecondition,
        "ORDER_CLOSED",
    );

    // The stock is back, and so is the product on sale: no stale sold-out marker.
    let again = place(&app, 1, &[(product, 1)])
        .await
        .expect("stock came back");
    pay(&app, 1, again.id).await.unwrap();
    assert_error(
        cancel(1, again.id).await,
        Code::FailedPrecondition,
        "ORDER_CLOSED",
    );
    assert_eq!(stock(&app, product).await, 2);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn unpaid_orders_expire_and_give_everything_back(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, |s| {
        s.set("ORDER_TTL_SECS", 1)
            .set("ORDER_EXPIRY_INTERVAL_SECS", 1);
    })
    .await;
    let product = create_product(&app, "umbrella", 9_000, 4).await;
    charge(&app, 1, 100_000).await;
    let coupon = coupon_for(&app, 1, coupon_request(5)).await;
    let order = place_with(
        &app,
        PlaceOrderRequest {
            user_id: 1,
            items: lines(&[(product, 4)]),
            user_coupon_id: coupon,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(stock(&app, product).await, 0);

    let expired = eventually(Duration::from_secs(10), || async {
        get_order(&app, 1, order.id).await.unwrap().status() == OrderStatus::Expired
    })
    .await;
    assert!(expired, "the expiry job closes the order");
    assert_eq!(stock(&app, product).await, 4);
    assert_eq!(
        coupon_status(&app, coupon).await,
        ("AVAILABLE".into(), None)
    );
    assert_error(
        pay(&app, 1, order.id).await,
        Code::FailedPrecondition,
        "ORDER_CLOSED",
    );
    assert_eq!(balance(&app, 1).await, 100_000);
    place(&app, 1, &[(product, 4)])
        .await
        .expect("the stock is orderable again");
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn an_overdue_order_cannot_be_paid(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "scarf", 15_000, 4).await;
    charge(&app, 1, 100_000).await;
    let order = place(&app, 1, &[(product, 1)]).await.unwrap();
    sqlx::query("UPDATE orders SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(order.id)
        .execute(&app.pg)
        .await
        .unwrap();
    assert_error(
        pay(&app, 1, order.id).await,
        Code::FailedPrecondition,
        "ORDER_EXPIRED",
    );
    assert_eq!(balance(&app, 1).await, 100_000);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn retries_with_one_key_place_and_pay_once(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "mug", 8_000, 100).await;
    charge(&app, 1, 100_000).await;
    let request = PlaceOrderRequest {
        user_id: 1,
        items: lines(&[(product, 2)]),
        user_coupon_id: 0,
        idempotency_key: "order-attempt-1".into(),
    };
    let orders = join_all((0..20).map(|_| place_with(&app, request.clone()))).await;
    let ids: Vec<i64> = orders.into_iter().map(|o| o.unwrap().id).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "one order: {ids:?}");
    assert_eq!(stock(&app, product).await, 98);
    let changed = PlaceOrderRequest {
        items: lines(&[(product, 3)]),
        ..request.clone()
    };
    assert_error(
        place_with(&app, changed).await,
        Code::InvalidArgument,
        "IDEMPOTENCY_KEY_REUSED",
    );

    let payments = join_all((0..20).map(|_| pay_with_key(&app, 1, ids[0], "pay-1"))).await;
    let payments: Vec<_> = payments.into_iter().map(|p| p.unwrap()).collect();
    assert!(
        payments.iter().all(|p| p == &payments[0]),
        "one payment, same answer"
    );
    assert_eq!(payments[0].balance_after, 84_000);
    assert_eq!(assert_ledger_matches(&app, 1).await, 84_000);
    let other = place(&app, 1, &[(product, 1)]).await.unwrap();
    assert_error(
        pay_with_key(&app, 1, other.id, "pay-1").await,
        Code::InvalidArgument,
        "IDEMPOTENCY_KEY_REUSED",
    );
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn invalid_requests_name_the_field(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "pen", 1_000, 10).await;
    let many: Vec<(i64, i32)> = (1..=51).map(|i| (i, 1)).collect();
    let cases: Vec<(PlaceOrderRequest, &str)> = vec![
        (
            PlaceOrderRequest {
                user_id: 1,
                ..Default::default()
            },
            "items",
        ),
        (
            PlaceOrderRequest {
                user_id: 1,
                items: lines(&many),
                ..Default::default()
            },
            "items",
        ),
        (
            PlaceOrderRequest {
                user_id: 0,
                items: lines(&[(product, 1)]),
                ..Default::default()
            },
            "user_id",
        ),
        (
            PlaceOrderRequest {
                user_id: 1,
                items: lines(&[(product, 0)]),
                ..Default::default()
            },
            "items[0].quantity",
        ),
        (
            PlaceOrderRequest {
                user_id: 1,
                items: lines(&[(product, 1001)]),
                ..Default::default()
            },
            "items[0].quantity",
        ),
        (
            PlaceOrderRequest {
                user_id: 1,
                items: lines(&[(product, 1), (0, 1)]),
                ..Default::default()
            },
            "items[1].product_id",
        ),
        (
            PlaceOrderRequest {
                user_id: 1,
                items: lines(&[(product, 1), (product, 2)]),
                ..Default::default()
            },
            "items[1].product_id",
        ),
        (
            PlaceOrderRequest {
                user_id: 1,
                items: lines(&[(product, 1)]),
                user_coupon_id: -3,
                ..Default::default()
            },
            "user_coupon_id",
        ),
        (
            PlaceOrderRequest {
                user_id: 1,
                items: lines(&[(product, 1)]),
                idempotency_key: "a b".into(),
                ..Default::default()
            },
            "idempotency_key",
        ),
    ];
    for (request, field) in cases {
        let status = place_with(&app, request).await.unwrap_err();
        assert_eq!(invalid_field(&status), field);
    }
    charge(&app, 1, 1_000).await;
    let order = place(&app, 1, &[(product, 1)]).await.unwrap();
    assert_error(
        get_order(&app, 2, order.id).await,
        Code::PermissionDenied,
        "NOT_ORDER_OWNER",
    );
    assert_error(
        pay(&app, 2, order.id).await,
        Code::PermissionDenied,
        "NOT_ORDER_OWNER",
    );
    assert_error(
        get_order(&app, 1, order.id + 100).await,
        Code::NotFound,
        "ORDER_NOT_FOUND",
    );
    assert_error(
        pay(&app, 1, order.id + 100).await,
        Code::NotFound,
        "ORDER_NOT_FOUND",
    );
    assert_eq!(
        invalid_field(&pay(&app, 1, 0).await.unwrap_err()),
        "order_id"
    );
    assert_error(
        place(&app, 9, &[(product, 1)]).await,
        Code::FailedPrecondition,
        "INSUFFICIENT_BALANCE",
    );
    assert_eq!(
        stock(&app, product).await,
        9,
        "the refused order released nothing it did not take"
    );
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn restocking_clears_the_sold_out_marker(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "console", 500_000, 1).await;
    charge(&app, 1, 10_000_000).await;
    place(&app, 1, &[(product, 1)]).await.unwrap();
    for _ in 0..3 {
        assert_error(
            place(&app, 1, &[(product, 1)]).await,
            Code::FailedPrecondition,
            "OUT_OF_STOCK",
        );
    }
    app.admin()
        .update_product(UpdateProductRequest {
            product_id: product,
            stock: Some(5),
            ..Default::default()
        })
        .await
        .unwrap();
    place(&app, 1, &[(product, 5)]).await.expect("restocked");
    app.stop().await;
}
