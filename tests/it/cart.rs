//! Carts: lines shown with the products as they are now, the line and quantity limits, and a
//! checkout that is PlaceOrder on the cart's lines (same rules, same errors) emptying the cart
//! in the same transaction; retried with its key it returns the same order. Carts live in
//! Postgres, so wiping the test's Redis keys loses nothing.

use std::collections::HashMap;

use ecommerce::proto::{
    CheckoutRequest, ClearRequest, OrderStatus, ProductStatus, RemoveItemRequest,
    UpdateProductRequest,
};
use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::support::{
    TestApp, assert_error,
    coupons::{create_coupon, issue},
    delete_keys, invalid_field, reason,
    shop::{
        balance, charge, checkout, checkout_with, create_product, create_product_with_status,
        get_cart, set_item, stock,
    },
    spawn_app,
};

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pg).await.unwrap()
}

/// A line as GetCart shows it: product, quantity, name, unit price, purchasable, line total.
type Shown<'a> = (i64, i32, &'a str, i64, bool, Option<i64>);

#[sqlx::test(migrations = false)]
async fn a_cart_shows_each_product_as_it_is_now(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let mug = create_product(&app, "mug", 1_000, 5).await;
    let lamp = create_product(&app, "lamp", 2_500, 1).await;
    let stopped = create_product_with_status(&app, "retired", 700, 9, ProductStatus::Stopped).await;

    set_item(&app, 1, lamp, 2).await.unwrap();
    let cart = set_item(&app, 1, mug, 3).await.unwrap();
    assert_eq!(cart.user_id, 1);
    let lines: Vec<Shown<'_>> = cart
        .lines
        .iter()
        .map(|l| {
            (
                l.product_id,
                l.quantity,
                l.name.as_str(),
                l.unit_price,
                l.purchasable,
                l.line_total,
            )
        })
        .collect();
    assert_eq!(
        lines,
        vec![
            (mug, 3, "mug", 1_000, true, Some(3_000)),
            // Two wanted, one in stock: shown, but not purchasable now.
            (lamp, 2, "lamp", 2_500, false, Some(5_000)),
        ]
    );
    assert_eq!(cart.total, Some(8_000));
    assert!(!cart.purchasable);

    // The price and status shown are today's, not those of the day the line was added.
    app.admin()
        .update_product(UpdateProductRequest {
            product_id: mug,
            price: Some(1_200),
            name: Some("big mug".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    set_item(&app, 1, lamp, 1).await.unwrap();
    let cart = get_cart(&app, 1).await;
    assert_eq!(cart.lines[0].name, "big mug");
    assert_eq!(cart.lines[0].unit_price, 1_200);
    assert_eq!(cart.total, Some(3 * 1_200 + 2_500));
    assert!(cart.purchasable);

    let cart = set_item(&app, 1, stopped, 1).await.unwrap();
    let line = cart.lines.iter().find(|l| l.product_id == stopped).unwrap();
    assert_eq!(line.status(), ProductStatus::Stopped);
    assert!(!line.purchasable);

    // 0 removes a line, RemoveItem too (also of a product not in the cart), Clear empties.
    let cart = set_item(&app, 1, stopped, 0).await.unwrap();
    assert_eq!(cart.lines.len(), 2);
    let cart = app
        .carts()
        .remove_item(RemoveItemRequest {
            user_id: 1,
            product_id: lamp,
        })
        .await
        .unwrap()
        .into_inner()
        .cart
        .unwrap();
    assert_eq!(cart.lines.len(), 1);
    app.carts()
        .remove_item(RemoveItemRequest {
            user_id: 1,
            product_id: lamp,
        })
        .await
        .expect("removing what is not there is not an error");
    assert_eq!(get_cart(&app, 2).await.lines, vec![], "other users' carts");
    let cart = app
        .carts()
        .clear(ClearRequest { user_id: 1 })
        .await
        .unwrap()
        .into_inner()
        .cart
        .unwrap();
    assert!(cart.lines.is_empty());
    assert_eq!(cart.total, Some(0));
    assert!(get_cart(&app, 1).await.lines.is_empty());
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn totals_that_overflow_are_absent_and_their_checkout_is_refused(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;
    let dear = create_product(&app, "very dear", i64::MAX / 2, 10).await;
    let cheap = create_product(&app, "cheap", 1, 10).await;
    let cart = set_item(&app, 1, dear, 2).await.unwrap();
    assert_eq!(cart.lines[0].line_total, Some(i64::MAX / 2 * 2));
    assert_eq!(cart.total, Some(i64::MAX - 1));
    let cart = set_item(&app, 1, cheap, 2).await.unwrap();
    assert_eq!(cart.total, None, "i64::MAX + 1 does not fit");
    let cart = set_item(&app, 1, dear, 3).await.unwrap();
    assert_eq!(cart.lines[0].line_total, None);
    assert_eq!(cart.lines[1].line_total, Some(2));

    charge(&app, 1, 1_000).await;
    let refused = checkout(&app, 1, "").await.unwrap_err();
    assert_eq!(invalid_field(&refused), "items");
    assert_eq!(stock(&app, dear).await, 10, "nothing reserved");
    assert_eq!(get_cart(&app, 1).await.lines.len(), 2, "nothing emptied");
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn lines_and_quantities_are_bounded(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "thing", 10, 100).await;
    for bad in [-1, 1_001, i32::MAX] {
        let refused = set_item(&app, 1, product, bad).await.unwrap_err();
        assert_eq!(invalid_field(&refused), "quantity", "{bad}");
    }
    assert_eq!(
        invalid_field(&set_item(&app, 0, product, 1).await.unwrap_err()),
        "user_id"
    );
    assert_eq!(
        invalid_field(&set_item(&app, 1, 0, 1).await.unwrap_err()),
        "product_id"
    );
    assert_error(
        set_item(&app, 1, 987_654, 1).await,
        Code::NotFound,
        "PRODUCT_NOT_FOUND",
    );
    assert_error(
        checkout(&app, 1, "").await,
        Code::FailedPrecondition,
        "CART_EMPTY",
    );
    assert_error(
        checkout(&app, 1, "k").await,
        Code::FailedPrecondition,
        "CART_EMPTY",
    );

    // 60 new lines at once on an empty cart: exactly as many as an order may hold are kept.
    let mut products = Vec::new();
    for i in 0..60 {
        products.push(create_product(&app, &format!("item {i}"), 10, 100).await);
    }
    let results = join_all(products.iter().map(|p| set_item(&app, 2, *p, 1))).await;
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for result in results {
        let outcome = match result {
            Ok(_) => "OK".to_string(),
            Err(status) => {
                let (code, reason) = reason(&status);
                assert_eq!(code, Code::FailedPrecondition);
                reason
            }
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    assert_eq!(
        outcomes,
        HashMap::from([("OK".to_string(), 50), ("CART_FULL".to_string(), 10)])
    );
    let cart = get_cart(&app, 2).await;
    assert_eq!(cart.lines.len(), 50);
    // A full cart still changes the quantity of a line it holds, or takes a new one once one
    // is removed.
    let held = cart.lines[0].product_id;
    let absent = *products
        .iter()
        .find(|p| cart.lines.iter().all(|l| l.product_id != **p))
        .unwrap();
    set_item(&app, 2, held, 7).await.expect("changing a line");
    assert_error(
        set_item(&app, 2, absent, 1).await,
        Code::FailedPrecondition,
        "CART_FULL",
    );
    set_item(&app, 2, held, 0).await.unwrap();
    set_item(&app, 2, absent, 1).await.expect("room again");

    // A full cart is a valid order.
    charge(&app, 2, 1_000_000).await;
    let order = checkout(&app, 2, "").await.expect("50 lines check out");
    assert_eq!(order.items.len(), 50);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn checkout_is_place_order_on_the_cart_and_empties_it(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;
    let mug = create_product(&app, "mug", 1_000, 5).await;
    let lamp = create_product(&app, "lamp", 20_000, 1).await;
    let coupon = create_coupon(&app, 10).await;
    let user_coupon = issue(&app, coupon, 1).await.unwrap();

    set_item(&app, 1, mug, 3).await.unwrap();
    set_item(&app, 1, lamp, 1).await.unwrap();
    // The same errors as PlaceOrder, and a refusal leaves everything as it was.
    assert_error(
        checkout(&app, 1, "").await,
        Code::FailedPrecondition,
        "INSUFFICIENT_BALANCE",
    );
    assert_eq!(get_cart(&app, 1).await.lines.len(), 2);
    assert_eq!((stock(&app, mug).await, stock(&app, lamp).await), (5, 1));

    charge(&app, 1, 100_000).await;
    let order = checkout_with(
        &app,
        CheckoutRequest {
            user_id: 1,
            user_coupon_id: user_coupon,
            idempotency_key: String::new(),
        },
    )
    .await
    .expect("checkout");
    assert_eq!(order.status(), OrderStatus::PendingPayment);
    let items: Vec<(i64, i32, i64)> = order
        .items
        .iter()
        .map(|i| (i.product_id, i.quantity, i.unit_price))
        .collect();
    assert_eq!(items, vec![(mug, 3, 1_000), (lamp, 1, 20_000)]);
    assert_eq!(order.total_amount, 23_000);
    assert_eq!(order.discount_amount, 5_000);
    assert_eq!(order.user_coupon_id, user_coupon);
    assert!(get_cart(&app, 1).await.lines.is_empty());
    assert_eq!((stock(&app, mug).await, stock(&app, lamp).await), (2, 0));
    assert_eq!(balance(&app, 1).await, 100_000, "Pay deducts, not checkout");

    // Stock gone since the line was added: OUT_OF_STOCK, the cart kept for the buyer to edit.
    set_item(&app, 1, lamp, 1).await.unwrap();
    assert_error(
        checkout(&app, 1, "").await,
        Code::FailedPrecondition,
        "OUT_OF_STOCK",
    );
    assert_eq!(get_cart(&app, 1).await.lines.len(), 1);
    // The coupon is held by the first order.
    set_item(&app, 1, lamp, 0).await.unwrap();
    set_item(&app, 1, mug, 1).await.unwrap();
    let reserved = assert_error(
        checkout_with(
            &app,
            CheckoutRequest {
                user_id: 1,
                user_coupon_id: user_coupon,
                idempotency_key: String::new(),
            },
        )
        .await,
        Code::FailedPrecondition,
        "COUPON_UNUSABLE",
    );
    assert!(format!("{reserved:?}").contains("reserved"));
    assert_eq!(count(&app, "SELECT count(*) FROM orders").await, 1);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_checkout_retried_with_its_key_returns_the_same_order(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "mug", 1_000, 100).await;
    charge(&app, 1, 1_000_000).await;
    set_item(&app, 1, product, 2).await.unwrap();

    // Ten copies of one checkout at once: one order, every copy answered with it.
    let results = join_all((0..10).map(|_| checkout(&app, 1, "checkout-1"))).await;
    let ids: Vec<i64> = results
        .into_iter()
        .map(|r| r.expect("checkout").id)
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(stock(&app, product).await, 98);

    // A later retry, after the cart was filled again, still gets the first order and leaves
    // the new cart alone.
    set_item(&app, 1, product, 5).await.unwrap();
    let again = checkout(&app, 1, "checkout-1").await.unwrap();
    assert_eq!(again.id, ids[0]);
    assert_eq!(again.items[0].quantity, 2);
    assert_eq!(get_cart(&app, 1).await.lines[0].quantity, 5);
    assert_eq!(stock(&app, product).await, 98);

    // The same key for another request (a coupon now) is refused; a new key checks out.
    let coupon = create_coupon(&app, 10).await;
    let user_coupon = issue(&app, coupon, 1).await.unwrap();
    assert_error(
        checkout_with(
            &app,
            CheckoutRequest {
                user_id: 1,
                user_coupon_id: user_coupon,
                idempotency_key: "checkout-1".into(),
            },
        )
        .await,
        Code::InvalidArgument,
        "IDEMPOTENCY_KEY_REUSED",
    );
    let second = checkout(&app, 1, "checkout-2").await.unwrap();
    assert_ne!(second.id, ids[0]);
    assert_eq!(count(&app, "SELECT count(*) FROM orders").await, 2);
    assert_eq!(stock(&app, product).await, 93);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn carts_survive_losing_every_redis_key(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "mug", 1_000, 10).await;
    set_item(&app, 1, product, 4).await.unwrap();
    let before = get_cart(&app, 1).await;
    delete_keys(&app.redis, &app.redis_prefix).await;
    assert_eq!(get_cart(&app, 1).await, before);
    charge(&app, 1, 10_000).await;
    let order = checkout(&app, 1, "after-the-wipe").await.unwrap();
    assert_eq!(order.items[0].quantity, 4);
    app.stop().await;
}
