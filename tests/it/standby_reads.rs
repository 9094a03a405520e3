//! Catalog reads on a standby (`DATABASE_READ_URL`), within `READ_MAX_LAG_MS`: served by the
//! standby while it keeps up; by the primary once it has not replayed what the primary had
//! that long ago (replay paused here) or does not answer; and back on the standby once it
//! caught up.

use std::time::Duration;

use ecommerce::proto::{
    GetPopularProductsRequest, GetProductRequest, ListProductsRequest, UpdateProductRequest,
};

use sqlx::Connection;

use crate::support::{
    TestApp, eventually,
    metrics::{metrics_text, series_value},
    private::PrivatePostgres,
    shop::create_product,
    spawn_app_with,
};

const MAX_LAG: Duration = Duration::from_millis(500);

async fn served_by(app: &TestApp, source: &str) -> f64 {
    let text = metrics_text(app).await;
    series_value(
        &text,
        &format!("ecommerce_db_stale_ok_reads_total{{source=\"{source}\"}}"),
    )
    .unwrap_or(0.0)
}

async fn name_of(app: &TestApp, product: i64) -> String {
    app.products()
        .get_product(GetProductRequest {
            product_id: product,
        })
        .await
        .expect("GetProduct")
        .into_inner()
        .product
        .expect("product")
        .name
}

async fn rename(app: &TestApp, product: i64, name: &str) {
    app.admin()
        .update_product(UpdateProductRequest {
            product_id: product,
            name: Some(name.into()),
            ..Default::default()
        })
        .await
        .expect("UpdateProduct");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_reads_use_the_standby_only_while_it_is_fresh_enough() {
    let primary = PrivatePostgres::start().await;
    let standby = primary.standby().await;
    let standby_url = format!("postgres://postgres@127.0.0.1:{}/postgres", standby.port);
    let app = spawn_app_with(primary.options(), |s| {
        s.set("DATABASE_READ_URL", standby_url)
            .set("READ_MAX_LAG_MS", MAX_LAG.as_millis());
    })
    .await;
    let product = create_product(&app, "lamp", 1_000, 10).await;

    // Keeping up: reads go to the standby (once it has replayed the new product).
    assert!(
        eventually(Duration::from_secs(10), || async {
            name_of(&app, product).await == "lamp" && served_by(&app, "standby").await > 0.0
        })
        .await,
        "catalog reads are served by the standby"
    );
    let mut products = app.products();
    products
        .list_products(ListProductsRequest {
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .expect("ListProducts");
    products
        .get_popular_products(GetPopularProductsRequest { days: 3, limit: 5 })
        .await
        .expect("GetPopularProducts");

    // The standby stops replaying: a change is read from the primary once it is older than
    // READ_MAX_LAG_MS (plus one sampling interval), never the old value after that.
    let mut admin = sqlx::PgConnection::connect_with(&standby.options())
        .await
        .unwrap();
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&mut admin)
        .await
        .unwrap();
    rename(&app, product, "desk lamp").await;
    let from_primary = served_by(&app, "primary").await;
    tokio::time::sleep(MAX_LAG + Duration::from_millis(300)).await;
    for _ in 0..20 {
        assert_eq!(name_of(&app, product).await, "desk lamp", "a stale read");
    }
    assert!(served_by(&app, "primary").await >= from_primary + 20.0);

    // Caught up again: back on the standby.
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&mut admin)
        .await
        .unwrap();
    let from_standby = served_by(&app, "standby").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            name_of(&app, product).await == "desk lamp"
                && served_by(&app, "standby").await > from_standby
        })
        .await,
        "reads return to the standby once it caught up"
    );

    // A standby that is gone: the primary serves.
    drop(admin);
    drop(standby);
    for _ in 0..5 {
        assert_eq!(name_of(&app, product).await, "desk lamp");
    }
    app.stop().await;
}
