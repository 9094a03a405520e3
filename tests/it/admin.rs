use ecommerce::proto::{CreateProductRequest, ProductStatus, UpdateProductRequest};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::support::{assert_error, invalid_field, shop::create_product, spawn_app};

fn product(name: &str, price: i64, stock: i64, status: i32) -> CreateProductRequest {
    CreateProductRequest {
        name: name.into(),
        price,
        stock,
        status,
        idempotency_key: String::new(),
    }
}

#[sqlx::test(migrations = false)]
async fn admin_calls_need_the_admin_token(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let request = product("keyboard", 1_000, 5, ProductStatus::Selling.into());
    for token in [
        None,
        Some("wrong-token"),
        Some(""),
        Some("test-admin-token-but-longer"),
    ] {
        let result = app
            .admin_with_token(token)
            .create_product(request.clone())
            .await;
        assert_error(result, Code::Unauthenticated, "UNAUTHENTICATED");
    }
    let update = app
        .admin_with_token(Some("nope"))
        .update_product(UpdateProductRequest {
            product_id: 1,
            ..Default::default()
        })
        .await;
    assert_error(update, Code::Unauthenticated, "UNAUTHENTICATED");

    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(count, 0);
    app.admin()
        .create_product(request)
        .await
        .expect("the right token works");
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn every_invalid_field_is_named(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let selling: i32 = ProductStatus::Selling.into();
    let cases = [
        (product("", 1, 1, selling), "name"),
        (product("   ", 1, 1, selling), "name"),
        (product(&"x".repeat(201), 1, 1, selling), "name"),
        (product("tab\tname", 1, 1, selling), "name"),
        (product("ok", -1, 1, selling), "price"),
        (product("ok", 1, -1, selling), "stock"),
        (product("ok", 1, 1, 0), "status"),
        (product("ok", 1, 1, 99), "status"),
    ];
    for (request, field) in cases {
        let status = app.admin().create_product(request).await.unwrap_err();
        assert_eq!(invalid_field(&status), field);
    }

    let id = create_product(&app, "mouse", 2_000, 3).await;
    let update_cases = [
        (
            UpdateProductRequest {
                product_id: 0,
                ..Default::default()
            },
            "product_id",
        ),
        (
            UpdateProductRequest {
                product_id: id,
                price: Some(-5),
                ..Default::default()
            },
            "price",
        ),
        (
            UpdateProductRequest {
                product_id: id,
                stock: Some(-1),
                ..Default::default()
            },
            "stock",
        ),
        (
            UpdateProductRequest {
                product_id: id,
                name: Some(String::new()),
                ..Default::default()
            },
            "name",
        ),
        (
            UpdateProductRequest {
                product_id: id,
                status: Some(0),
                ..Default::default()
            },
            "status",
        ),
    ];
    for (request, field) in update_cases {
        let status = app.admin().update_product(request).await.unwrap_err();
        assert_eq!(invalid_field(&status), field);
    }

    let updated = app
        .admin()
        .update_product(UpdateProductRequest {
            product_id: id,
            price: Some(2_500),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .product
        .unwrap();
    assert_eq!(
        (updated.name.as_str(), updated.price, updated.stock),
        ("mouse", 2_500, 3)
    );

    let missing = app
        .admin()
        .update_product(UpdateProductRequest {
            product_id: id + 100,
            price: Some(1),
            ..Default::default()
        })
        .await;
    assert_error(missing, Code::NotFound, "PRODUCT_NOT_FOUND");
    app.stop().await;
}
