use std::time::Duration;

use ecommerce::proto::{GetPopularProductsRequest, PopularProduct};
use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::support::{
    TestApp, delete_keys, eventually, invalid_field,
    shop::{charge, create_product, pay, place},
    spawn_app_with,
};

/// Fast ranking job and a short cache, so tests see the job's work quickly.
fn fast_ranking(s: &mut crate::support::TestSettings) {
    s.set("RANKING_RECONCILE_INTERVAL_SECS", 1)
        .set("POPULAR_CACHE_TTL_MS", 20);
}

async fn popular(app: &TestApp, days: i32, limit: i32) -> Vec<(i64, i64)> {
    popular_items(app, days, limit)
        .await
        .into_iter()
        .map(|p| (p.product.unwrap().id, p.sold_quantity))
        .collect()
}

async fn popular_items(app: &TestApp, days: i32, limit: i32) -> Vec<PopularProduct> {
    app.products()
        .get_popular_products(GetPopularProductsRequest { days, limit })
        .await
        .expect("popular products")
        .into_inner()
        .items
}

/// Buys and pays `quantity` of `product` for `user`; returns the order id.
async fn buy(app: &TestApp, user: i64, product: i64, quantity: i32) -> i64 {
    charge(app, user, 100_000_000).await;
    let order = place(app, user, &[(product, quantity)]).await.unwrap();
    pay(app, user, order.id).await.unwrap();
    order.id
}

/// Moves a paid order's payment `days` days into the past.
async fn paid_days_ago(app: &TestApp, order: i64, days: i32) {
    sqlx::query(
        "UPDATE payments SET paid_at = paid_at - make_interval(days => $2) WHERE order_id = $1",
    )
    .bind(order)
    .bind(days)
    .execute(&app.pg)
    .await
    .unwrap();
}

async fn settles_to(app: &TestApp, days: i32, limit: i32, expected: &[(i64, i64)]) -> bool {
    eventually(Duration::from_secs(10), || async {
        popular(app, days, limit).await == expected
    })
    .await
}

#[sqlx::test(migrations = false)]
async fn only_the_window_and_only_paid_orders_count(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, fast_ranking).await;
    let hit = create_product(&app, "hit", 1_000, 10_000).await;
    let other = create_product(&app, "other", 1_000, 10_000).await;
    for (quantity, days_ago) in [(10, 2), (20, 1), (30, 0), (75, 4)] {
        let order = buy(&app, 1, hit, quantity).await;
        paid_days_ago(&app, order, days_ago).await;
    }
    let order = buy(&app, 2, other, 50).await;
    paid_days_ago(&app, order, 3).await;
    // Unpaid and cancelled orders never count.
    charge(&app, 3, 1_000_000).await;
    place(&app, 3, &[(other, 500)]).await.unwrap();
    let cancelled = place(&app, 3, &[(hit, 100)]).await.unwrap();
    app.orders()
        .cancel_order(ecommerce::proto::CancelOrderRequest {
            order_id: cancelled.id,
            user_id: 3,
        })
        .await
        .unwrap();

    assert!(
        settles_to(&app, 3, 5, &[(hit, 60)]).await,
        "{:?}",
        popular(&app, 3, 5).await
    );
    assert!(settles_to(&app, 4, 5, &[(hit, 60), (other, 50)]).await);
    assert!(settles_to(&app, 5, 5, &[(hit, 135), (other, 50)]).await);
    let default_window = popular_items(&app, 0, 0).await;
    assert_eq!(default_window.len(), 1, "the default is 3 days");
    assert_eq!(default_window[0].rank, 1);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn top_n_is_cut_and_ties_go_to_the_lower_id(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, fast_ranking).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(create_product(&app, &format!("p{i}"), 100, 1_000).await);
    }
    for (product, quantity) in [
        (ids[0], 5),
        (ids[1], 9),
        (ids[2], 9),
        (ids[3], 1),
        (ids[4], 7),
        (ids[5], 9),
    ] {
        buy(&app, 1, product, quantity).await;
    }
    assert!(settles_to(&app, 1, 3, &[(ids[1], 9), (ids[2], 9), (ids[5], 9)]).await);
    let top = popular_items(&app, 1, 100).await;
    let ranks: Vec<i32> = top.iter().map(|p| p.rank).collect();
    assert_eq!(ranks, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(top[3].product.as_ref().unwrap().name, "p4");

    for (days, limit, field) in [
        (31, 5, "days"),
        (-1, 5, "days"),
        (3, 101, "limit"),
        (3, -5, "limit"),
    ] {
        let status = app
            .products()
            .get_popular_products(GetPopularProductsRequest { days, limit })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(invalid_field(&status), field);
    }
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn concurrent_payments_are_counted_exactly(_: PgPoolOptions, db: PgConnectOptions) {
    // No ranking job during the run: the counts come from the payments' own bumps.
    let app = spawn_app_with(db, |s| {
        s.set("RANKING_RECONCILE_INTERVAL_SECS", 3600)
            .set("POPULAR_CACHE_TTL_MS", 20)
            // 100 payments share a handful of connections: on a loaded machine a pool wait can
            // pass the default 2 s, and this test is about counts, not capacity.
            .set("DATABASE_ACQUIRE_TIMEOUT_MS", 30_000);
    })
    .await;
    let product = create_product(&app, "flash deal", 1_000, 1_000).await;
    let side = create_product(&app, "side", 1_000, 1_000).await;
    let mut orders = Vec::new();
    for user in 1..=100 {
        charge(&app, user, 10_000).await;
        let items: &[(i64, i32)] = if user % 4 == 0 {
            &[(product, 1), (side, 2)]
        } else {
            &[(product, 1)]
        };
        orders.push((user, place(&app, user, items).await.unwrap().id));
    }
    let paid = join_all(orders.iter().map(|(user, order)| pay(&app, *user, *order))).await;
    assert!(paid.iter().all(Result::is_ok));
    assert!(
        settles_to(&app, 1, 5, &[(product, 100), (side, 50)]).await,
        "{:?}",
        popular(&app, 1, 5).await
    );
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn the_job_rebuilds_lost_and_corrupted_buckets(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, fast_ranking).await;
    let a = create_product(&app, "a", 100, 1_000).await;
    let b = create_product(&app, "b", 100, 1_000).await;
    for (user, product, quantity, days_ago) in
        [(1, a, 4, 0), (2, b, 6, 1), (3, a, 3, 2), (4, b, 2, 10)]
    {
        let order = buy(&app, user, product, quantity).await;
        paid_days_ago(&app, order, days_ago).await;
    }
    let truth = [(b, 8), (a, 7)];
    assert!(settles_to(&app, 30, 100, &truth).await);

    // Redis loses everything of this test.
    assert!(delete_keys(&app.redis, &app.redis_prefix).await > 0);
    assert!(
        settles_to(&app, 30, 100, &truth).await,
        "rebuilt after the wipe"
    );

    // A doubled bump inflates today's bucket; the job puts the true count back.
    let today = chrono::Utc::now()
        .with_timezone(&chrono_tz::Asia::Seoul)
        .format("%Y%m%d");
    let bucket = format!("{}rank:{{products}}:{today}", app.redis_prefix);
    let _: f64 = fred::interfaces::SortedSetsInterface::zincrby(&app.redis, &bucket, 40.0, a)
        .await
        .unwrap();
    assert!(
        settles_to(&app, 30, 100, &truth).await,
        "corruption repaired"
    );
    app.stop().await;
}
