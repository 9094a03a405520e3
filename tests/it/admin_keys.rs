//! Admin retries are safe: AdjustStock, CreateProduct and CreateCoupon with an idempotency key
//! happen once however they are retried (one after another, all at once, after a timeout),
//! and a key reused with another request is refused.

use std::time::Duration;

use ecommerce::proto::{
    AdjustStockRequest, AdminServiceListProductsRequest, ChargeBalanceRequest, CreateCouponRequest,
    CreateProductRequest, IssueCouponRequest, ProductStatus,
};
use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::{Code, Request};

use crate::support::{
    TestApp, assert_error,
    coupons::coupon_request,
    lists::admin_products,
    shop::{create_product, lock_product, stock},
    spawn_app, spawn_app_with,
};

fn adjustment(product_id: i64, delta: i64, key: &str) -> AdjustStockRequest {
    AdjustStockRequest {
        product_id,
        delta,
        idempotency_key: key.into(),
    }
}

async fn adjust(app: &TestApp, request: AdjustStockRequest) -> Result<i64, tonic::Status> {
    app.admin()
        .adjust_stock(request)
        .await
        .map(|r| r.into_inner().product.expect("product").id)
}

#[sqlx::test(migrations = false)]
async fn an_adjustment_retried_with_its_key_is_applied_once(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app_with(db, |s| {
        s.set("DATABASE_ACQUIRE_TIMEOUT_MS", 30_000);
    })
    .await;
    let product = create_product(&app, "crate", 100, 10).await;

    // One after another.
    for _ in 0..3 {
        let id = adjust(&app, adjustment(product, 5, "restock-1"))
            .await
            .unwrap();
        assert_eq!(id, product);
    }
    assert_eq!(stock(&app, product).await, 15);

    // All at once: one applies, the others wait for it and replay it.
    let app_ref = &app;
    let results = join_all(
        (0..20).map(|_| async move { adjust(app_ref, adjustment(product, -4, "pick-7")).await }),
    )
    .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(stock(&app, product).await, 11);

    // The same key with another request is refused and changes nothing.
    for other in [
        adjustment(product, 6, "restock-1"),
        adjustment(product + 1, 5, "restock-1"),
    ] {
        assert_error(
            adjust(&app, other).await,
            Code::InvalidArgument,
            "IDEMPOTENCY_KEY_REUSED",
        );
    }
    assert_eq!(stock(&app, product).await, 11);

    // A refusal keeps no key: the same request succeeds once it can.
    assert_error(
        adjust(&app, adjustment(product, -20, "pick-8")).await,
        Code::FailedPrecondition,
        "OUT_OF_STOCK",
    );
    adjust(&app, adjustment(product, 20, "restock-2"))
        .await
        .unwrap();
    adjust(&app, adjustment(product, -20, "pick-8"))
        .await
        .unwrap();
    adjust(&app, adjustment(product, -20, "pick-8"))
        .await
        .unwrap();
    assert_eq!(stock(&app, product).await, 11);

    // Admin keys and a buyer's keys are apart: the same string is two keys.
    app.balance()
        .charge_balance(ChargeBalanceRequest {
            user_id: 1,
            amount: 1_000,
            idempotency_key: "restock-1".into(),
        })
        .await
        .expect("a buyer's key of the same text is another key");
    let scopes: Vec<(i64, String)> = sqlx::query_as(
        "SELECT user_id, operation FROM idempotency_keys
         WHERE idempotency_key = 'restock-1' ORDER BY user_id",
    )
    .fetch_all(&app.pg)
    .await
    .unwrap();
    assert_eq!(
        scopes,
        vec![(0, "ADJUST_STOCK".to_string()), (1, "CHARGE".to_string())]
    );
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn an_adjustment_retried_after_a_timeout_is_applied_once(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db.clone()).await;
    let product = create_product(&app, "barrel", 100, 10).await;

    // The first attempt waits on the product's row lock until its deadline passes: the caller
    // hears DEADLINE_EXCEEDED and cannot know whether it was applied.
    let lock = lock_product(&db, product).await;
    let mut request = Request::new(adjustment(product, 7, "after-timeout"));
    request.set_timeout(Duration::from_millis(300));
    let first = app.admin().adjust_stock(request).await;
    // The server answers DEADLINE_EXCEEDED; on a loaded machine tonic's own timer (it sends
    // the deadline as grpc-timeout and times the call out itself) may answer first, CANCELLED.
    let code = first.unwrap_err().code();
    assert!(
        matches!(code, Code::DeadlineExceeded | Code::Cancelled),
        "{code:?}"
    );
    // The retry, sent while the first attempt may still be in Postgres, waits for it.
    let retry = tokio::spawn({
        let mut admin = app.admin();
        async move {
            admin
                .adjust_stock(adjustment(product, 7, "after-timeout"))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(lock);
    retry.await.unwrap().expect("the retry succeeds");
    let again = adjust(&app, adjustment(product, 7, "after-timeout")).await;
    assert_eq!(again.unwrap(), product);
    assert_eq!(stock(&app, product).await, 17, "applied exactly once");

    // A caller that gives up without telling the server (no deadline sent): whatever the first
    // attempt did, the retry settles it.
    let lock = lock_product(&db, product).await;
    let mut admin = app.admin();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        admin.adjust_stock(adjustment(product, -3, "client-gave-up")),
    )
    .await;
    assert!(gave_up.is_err(), "the call was still waiting");
    drop(lock);
    adjust(&app, adjustment(product, -3, "client-gave-up"))
        .await
        .unwrap();
    adjust(&app, adjustment(product, -3, "client-gave-up"))
        .await
        .unwrap();
    assert_eq!(stock(&app, product).await, 14, "applied exactly once");
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn creations_retried_with_their_key_create_once(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let product = |key: &str| CreateProductRequest {
        name: "retried lamp".into(),
        price: 3_000,
        stock: 4,
        status: ProductStatus::Stopped.into(),
        idempotency_key: key.into(),
    };
    let app_ref = &app;
    let created = join_all((0..10).map(|_| async move {
        app_ref
            .admin()
            .create_product(product("lamp-1"))
            .await
            .map(|r| r.into_inner().product.unwrap().id)
    }))
    .await;
    let ids: Vec<i64> = created.into_iter().map(Result::unwrap).collect();
    assert!(ids.iter().all(|&id| id == ids[0]), "{ids:?}");
    let again = app.admin().create_product(product("lamp-1")).await.unwrap();
    assert_eq!(again.into_inner().product.unwrap().id, ids[0]);
    let reused = app
        .admin()
        .create_product(CreateProductRequest {
            price: 3_001,
            ..product("lamp-1")
        })
        .await;
    assert_error(reused, Code::InvalidArgument, "IDEMPOTENCY_KEY_REUSED");
    let listed = admin_products(&app, AdminServiceListProductsRequest::default())
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "one product: {listed:?}");

    // One request (its window is drawn from the clock once), sent again.
    let terms = coupon_request(3);
    let coupon = |key: &str| CreateCouponRequest {
        idempotency_key: key.into(),
        ..terms.clone()
    };
    let first = app.admin().create_coupon(coupon("sale-1")).await.unwrap();
    let first = first.into_inner().coupon.unwrap();
    // A seat taken between the two calls: the replay shows the coupon as it is now.
    app.coupons()
        .issue_coupon(IssueCouponRequest {
            user_id: 1,
            coupon_id: first.id,
        })
        .await
        .unwrap();
    let replay = app.admin().create_coupon(coupon("sale-1")).await.unwrap();
    let replay = replay.into_inner().coupon.unwrap();
    assert_eq!(
        (replay.id, replay.remaining_quantity),
        (first.id, 2),
        "the same coupon, as it is now"
    );
    let reused = app
        .admin()
        .create_coupon(CreateCouponRequest {
            valid_days: 8,
            ..coupon("sale-1")
        })
        .await;
    assert_error(reused, Code::InvalidArgument, "IDEMPOTENCY_KEY_REUSED");
    let coupons: i64 = sqlx::query_scalar("SELECT count(*) FROM coupons")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(coupons, 1);
    // Without a key, each call creates (what existing callers rely on).
    app.admin().create_product(product("")).await.unwrap();
    app.admin().create_product(product("")).await.unwrap();
    let listed = admin_products(&app, AdminServiceListProductsRequest::default())
        .await
        .unwrap();
    assert_eq!(listed.len(), 3);
    app.stop().await;
}
