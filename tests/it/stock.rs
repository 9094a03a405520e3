//! Admin stock changes next to orders: atomic adjustments that never oversell, and optimistic
//! updates that refuse to overwrite a stock that moved.

use ecommerce::proto::{AdjustStockRequest, UpdateProductRequest};
use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{
    TestApp, assert_error, invalid_field,
    shop::{charge, create_product, place, stock},
    spawn_app, spawn_app_with,
};

async fn adjust(app: &TestApp, product_id: i64, delta: i64) -> Result<i64, tonic::Status> {
    app.admin()
        .adjust_stock(AdjustStockRequest {
            product_id,
            delta,
            idempotency_key: String::new(),
        })
        .await
        .map(|r| r.into_inner().product.expect("product").stock)
}

#[sqlx::test(migrations = false)]
async fn adjustments_under_two_hundred_orders_add_up(_: PgPoolOptions, db: PgConnectOptions) {
    // 240 calls queue on one row lock with a handful of connections: on a loaded machine a
    // pool wait can pass the default 2 s, and this test is about the answers, not capacity.
    let app = spawn_app_with(db, |s| {
        s.set("DATABASE_ACQUIRE_TIMEOUT_MS", 30_000);
    })
    .await;
    let product = create_product(&app, "flash sale sneakers", 1_000, 100).await;
    for user in 1..=200 {
        charge(&app, user, 100_000).await;
    }
    // 200 buyers of one unit each, and the admin adding and removing stock meanwhile: some
    // removals must fail rather than take the stock below zero.
    let deltas: Vec<i64> = [30, -20, 50, -40, -60, 25, -80, 10, -5, 40]
        .into_iter()
        .cycle()
        .take(40)
        .collect();
    let app_ref = &app;
    let orders =
        join_all((1..=200).map(|user| async move { place(app_ref, user, &[(product, 1)]).await }));
    let adjustments = join_all(deltas.iter().map(|d| adjust(&app, product, *d)));
    let (orders, adjustments) = tokio::join!(orders, adjustments);

    let sold = orders.iter().filter(|o| o.is_ok()).count() as i64;
    for refused in orders.iter().filter_map(|o| o.as_ref().err()) {
        assert_eq!(
            crate::support::reason(refused),
            (Code::FailedPrecondition, "OUT_OF_STOCK".into())
        );
    }
    let mut applied = 0;
    for (delta, result) in deltas.iter().zip(&adjustments) {
        match result {
            Ok(after) => {
                assert!(*after >= 0);
                applied += delta;
            }
            Err(status) => {
                assert!(*delta < 0, "an increase was refused: {status:?}");
                assert_eq!(
                    crate::support::reason(status),
                    (Code::FailedPrecondition, "OUT_OF_STOCK".into())
                );
            }
        }
    }
    let left = stock(&app, product).await;
    assert!(left >= 0);
    assert_eq!(
        left,
        100 + applied - sold,
        "sold {sold}, adjusted by {applied}"
    );
    let in_orders: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(quantity), 0)::bigint FROM order_items WHERE product_id = $1",
    )
    .bind(product)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(in_orders, sold);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn adjustments_refuse_zero_negative_stock_and_the_limit(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "mug", 1_000, 5).await;
    assert_eq!(
        invalid_field(&adjust(&app, product, 0).await.unwrap_err()),
        "delta"
    );
    assert_error(
        adjust(&app, product, -6).await,
        Code::FailedPrecondition,
        "OUT_OF_STOCK",
    );
    assert_error(
        adjust(&app, product, i64::MIN).await,
        Code::FailedPrecondition,
        "OUT_OF_STOCK",
    );
    for too_many in [1_000_000_000_000, i64::MAX] {
        assert_error(
            adjust(&app, product, too_many).await,
            Code::OutOfRange,
            "STOCK_LIMIT_EXCEEDED",
        );
    }
    assert_error(
        adjust(&app, 999_999, 1).await,
        Code::NotFound,
        "PRODUCT_NOT_FOUND",
    );
    assert_eq!(adjust(&app, product, -5).await.unwrap(), 0);
    assert_error(
        place(&app, 1, &[(product, 1)]).await,
        Code::FailedPrecondition,
        "OUT_OF_STOCK",
    );
    // An increase clears the sold-out shortcut at once.
    charge(&app, 1, 10_000).await;
    assert_eq!(adjust(&app, product, 1).await.unwrap(), 1);
    place(&app, 1, &[(product, 1)]).await.expect("restocked");
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn updates_with_an_expected_stock_refuse_a_stock_that_moved(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "lamp", 1_000, 10).await;
    charge(&app, 1, 10_000).await;
    place(&app, 1, &[(product, 3)]).await.unwrap();
    let update = |expected: i64| {
        let mut admin = app.admin();
        async move {
            admin
                .update_product(UpdateProductRequest {
                    product_id: product,
                    stock: Some(50),
                    expected_stock: Some(expected),
                    ..Default::default()
                })
                .await
        }
    };
    let status = assert_error(update(10).await, Code::Aborted, "STOCK_CHANGED");
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.metadata["stock"], "7");
    assert_eq!(stock(&app, product).await, 7, "nothing changed");
    let updated = update(7).await.unwrap().into_inner().product.unwrap();
    assert_eq!(updated.stock, 50);
    assert_eq!(
        invalid_field(&update(-1).await.unwrap_err()),
        "expected_stock"
    );
    app.stop().await;
}
