use std::{net::SocketAddr, time::Duration};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{TestApp, eventually, proxy::TcpProxy, redis_url, spawn_app, spawn_app_with};

async fn status(app: &TestApp, service: &str) -> Option<ServingStatus> {
    let mut client = HealthClient::new(app.channel.clone());
    let response = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    Some(response.into_inner().status())
}

async fn becomes(app: &TestApp, service: &str, wanted: ServingStatus) -> bool {
    eventually(Duration::from_secs(10), || async {
        status(app, service).await == Some(wanted)
    })
    .await
}

fn redis_addr() -> SocketAddr {
    let url = redis_url();
    let host_port = url.trim_start_matches("redis://").trim_end_matches('/');
    host_port
        .parse()
        .expect("TEST_REDIS_URL is redis://ip:port")
}

#[sqlx::test(migrations = false)]
async fn every_service_reports_serving(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    for service in [
        "",
        "ecommerce.v1.BalanceService",
        "ecommerce.v1.ProductService",
        "ecommerce.v1.CouponService",
        "ecommerce.v1.OrderService",
        "ecommerce.v1.PaymentService",
        "ecommerce.v1.AdminService",
    ] {
        assert!(
            becomes(&app, service, ServingStatus::Serving).await,
            "{service}"
        );
    }
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn redis_outage_flips_health_and_recovers(_: PgPoolOptions, db: PgConnectOptions) {
    let proxy = TcpProxy::start(redis_addr()).await;
    let app = spawn_app_with(db, |s| {
        s.set("REDIS_URL", format!("redis://{}", proxy.addr))
            .set("REDIS_COMMAND_TIMEOUT_MS", 300);
    })
    .await;
    assert!(becomes(&app, "", ServingStatus::Serving).await);

    proxy.cut().await;
    assert!(becomes(&app, "", ServingStatus::NotServing).await);
    assert!(
        becomes(
            &app,
            "ecommerce.v1.CouponService",
            ServingStatus::NotServing
        )
        .await
    );
    // Balances need only Postgres.
    assert_eq!(
        status(&app, "ecommerce.v1.BalanceService").await,
        Some(ServingStatus::Serving)
    );

    proxy.restore().await;
    assert!(becomes(&app, "", ServingStatus::Serving).await);
    assert!(becomes(&app, "ecommerce.v1.CouponService", ServingStatus::Serving).await);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn postgres_outage_flips_health_and_recovers(_: PgPoolOptions, db: PgConnectOptions) {
    let target: SocketAddr = format!("{}:{}", db.get_host(), db.get_port())
        .parse()
        .expect("DATABASE_URL host is an ip address");
    let proxy = TcpProxy::start(target).await;
    let through_proxy = db.clone().host("127.0.0.1").port(proxy.addr.port());
    let app = spawn_app_with(db, |s| {
        s.database = through_proxy;
        s.set("DATABASE_ACQUIRE_TIMEOUT_MS", 500);
    })
    .await;
    assert!(becomes(&app, "", ServingStatus::Serving).await);

    proxy.cut().await;
    assert!(becomes(&app, "", ServingStatus::NotServing).await);
    assert!(
        becomes(
            &app,
            "ecommerce.v1.BalanceService",
            ServingStatus::NotServing
        )
        .await
    );
    let during = app
        .balance()
        .get_balance(ecommerce::proto::GetBalanceRequest { user_id: 1 })
        .await;
    crate::support::assert_error(during, tonic::Code::Unavailable, "DEPENDENCY_UNAVAILABLE");

    proxy.restore().await;
    assert!(becomes(&app, "", ServingStatus::Serving).await);
    let after = app
        .balance()
        .get_balance(ecommerce::proto::GetBalanceRequest { user_id: 1 })
        .await;
    assert!(after.is_ok(), "recovers by itself: {after:?}");
    app.stop().await;
}
