//! Three servers on one database and one Redis key prefix, as three Kubernetes replicas: what
//! one gives back, the others sell within 100 ms, and a stampede spread over them stays exact.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use ecommerce::{ProductId, Redis, Restock, SoldOutMarkers};
use futures::{StreamExt, stream};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::support::{
    assert_error,
    coupons::{create_coupon, gate_agrees, issue, issued_in_postgres, sold_out},
    reason, redis_url, replicas,
    shop::{charge, create_product, place},
};

#[sqlx::test(migrations = false)]
async fn a_unit_cancelled_on_one_replica_sells_on_the_others_within_100ms(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let [a, b, c] = replicas(db).await;
    let product = create_product(&a, "last console", 500_000, 1).await;
    for user in 1..=3 {
        charge(&a, user, 10_000_000).await;
    }
    let held = place(&a, 1, &[(product, 1)]).await.expect("the only unit");
    // B and C learn it is sold out: Postgres first, then their local memory and the marker.
    for replica in [&b, &c] {
        for _ in 0..5 {
            assert_error(
                place(replica, 2, &[(product, 1)]).await,
                Code::FailedPrecondition,
                "OUT_OF_STOCK",
            );
        }
    }

    a.orders()
        .cancel_order(ecommerce::proto::CancelOrderRequest {
            order_id: held.id,
            user_id: 1,
        })
        .await
        .expect("cancelled on A");
    let cancelled = Instant::now();
    let mut attempts = 0;
    let bought = loop {
        attempts += 1;
        let replica = if attempts % 2 == 0 { &b } else { &c };
        match place(replica, 3, &[(product, 1)]).await {
            Ok(order) => break order,
            Err(status) => {
                assert_eq!(
                    reason(&status),
                    (Code::FailedPrecondition, "OUT_OF_STOCK".into())
                );
                assert!(
                    cancelled.elapsed() < Duration::from_secs(2),
                    "the unit never came back"
                );
            }
        }
    };
    let took = cancelled.elapsed();
    eprintln!(
        "the cancelled unit sold through B or C {took:?} after the cancel ({attempts} attempts)"
    );
    assert_eq!(bought.user_id, 3);
    assert!(
        took <= Duration::from_millis(100),
        "the cancelled unit sold on B or C after {took:?} ({attempts} attempts)"
    );
    for app in [a, b, c] {
        app.stop().await;
    }
}

#[sqlx::test(migrations = false)]
async fn a_stampede_spread_over_three_replicas_is_exact(_: PgPoolOptions, db: PgConnectOptions) {
    let apps = replicas(db).await;
    let coupon = create_coupon(&apps[0], 1_000).await;
    let results: Vec<(i64, Result<i64, tonic::Status>)> = stream::iter(1..=3_000_i64)
        .map(|user| {
            let app = &apps[user as usize % 3];
            async move { (user, issue(app, coupon, user).await) }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let mut winners: Vec<i64> = Vec::new();
    let mut refusals: HashMap<(Code, String), usize> = HashMap::new();
    for (user, result) in results {
        match result {
            Ok(_) => winners.push(user),
            Err(status) => *refusals.entry(reason(&status)).or_default() += 1,
        }
    }
    winners.sort_unstable();
    assert_eq!(winners.len(), 1_000);
    assert_eq!(refusals, HashMap::from([(sold_out(), 2_000)]));
    assert_eq!(issued_in_postgres(&apps[0], coupon).await, winners);
    assert!(gate_agrees(&apps[0], coupon, 1_000).await);
    for app in apps {
        app.stop().await;
    }
}

/// The race a generation closes: an order that read "none left" before a release must not mark
/// the product sold out after the release cleared the marker.
#[tokio::test]
async fn a_marker_from_before_a_release_is_refused() {
    let prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
    let redis = Redis::connect(&redis_url(), 1, Duration::from_secs(1), &prefix).unwrap();
    assert!(redis.wait_connected(Duration::from_secs(5)).await);
    let markers = SoldOutMarkers::new(redis.clone());
    let product = ProductId::parse(7, "product_id").unwrap();
    let ttl = Duration::from_secs(5);

    assert!(markers.mark(product, 3, ttl).await.unwrap());
    assert_eq!(
        markers.first_marked(&[product]).await.unwrap(),
        Some(product)
    );
    markers
        .clear(&[Restock {
            product,
            stock_gen: 4,
        }])
        .await
        .unwrap();
    assert_eq!(markers.first_marked(&[product]).await.unwrap(), None);
    // The slow order that read generation 3 comes back to mark it: refused.
    assert!(!markers.mark(product, 3, ttl).await.unwrap());
    assert_eq!(markers.first_marked(&[product]).await.unwrap(), None);
    // Sold out again after the release: marked.
    assert!(markers.mark(product, 4, ttl).await.unwrap());
    assert_eq!(
        markers.first_marked(&[product]).await.unwrap(),
        Some(product)
    );

    let client = fred::prelude::Builder::from_config(
        fred::types::config::Config::from_url(&redis_url()).unwrap(),
    )
    .build()
    .unwrap();
    fred::interfaces::ClientLike::init(&client).await.unwrap();
    crate::support::delete_keys(&client, &prefix).await;
    redis.quit().await;
}
