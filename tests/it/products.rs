//! The catalog as buyers read it: listings page through selling products only, in id order,
//! without gaps or repeats; a single product is found whatever its status.

use std::collections::HashSet;

use ecommerce::proto::{
    GetProductRequest, ListProductsRequest, ProductStatus, UpdateProductRequest,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::support::{assert_error, invalid_field, shop::create_product_with_status, spawn_app};

#[sqlx::test(migrations = false)]
async fn listing_pages_through_selling_products_only(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let mut selling = Vec::new();
    for i in 0..250 {
        let status = match i % 5 {
            3 => ProductStatus::Stopped,
            4 => ProductStatus::SoldOut,
            _ => ProductStatus::Selling,
        };
        let id =
            create_product_with_status(&app, &format!("product {i}"), 1_000 + i, 10, status).await;
        if status == ProductStatus::Selling {
            selling.push(id);
        }
    }

    for page_size in [0, 1, 7, 100] {
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = app
                .products()
                .list_products(ListProductsRequest {
                    page_size,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            let expected_max = if page_size == 0 {
                20
            } else {
                page_size as usize
            };
            assert!(page.products.len() <= expected_max);
            for p in &page.products {
                assert_eq!(p.status(), ProductStatus::Selling);
            }
            seen.extend(page.products.iter().map(|p| p.id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(
            seen, selling,
            "page size {page_size}: no gap, no repeat, in id order"
        );
        assert_eq!(seen.iter().collect::<HashSet<_>>().len(), seen.len());
    }

    // A product stopped between pages disappears from the listing.
    app.admin()
        .update_product(UpdateProductRequest {
            product_id: selling[0],
            status: Some(ProductStatus::Stopped.into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let first = app
        .products()
        .list_products(ListProductsRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.products[0].id, selling[1]);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn get_product_returns_any_status_and_not_found(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let id = create_product_with_status(&app, "retired", 500, 0, ProductStatus::Stopped).await;
    let product = app
        .products()
        .get_product(GetProductRequest { product_id: id })
        .await
        .unwrap()
        .into_inner()
        .product
        .unwrap();
    assert_eq!(
        (product.name.as_str(), product.status()),
        ("retired", ProductStatus::Stopped)
    );

    let missing = app
        .products()
        .get_product(GetProductRequest {
            product_id: id + 1000,
        })
        .await;
    assert_error(missing, Code::NotFound, "PRODUCT_NOT_FOUND");
    let bad = app
        .products()
        .get_product(GetProductRequest { product_id: 0 })
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&bad), "product_id");

    let bad_token = app
        .products()
        .list_products(ListProductsRequest {
            page_size: 10,
            page_token: "not-a-token".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&bad_token), "page_token");
    app.stop().await;
}
