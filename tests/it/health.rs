use std::{net::SocketAddr, time::Duration};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Streaming;
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
    health_client::HealthClient,
};

use crate::support::{
    TestApp, eventually,
    proxy::{TcpProxy, redis_addr},
    spawn_app, spawn_app_on, spawn_app_with,
};

async fn watch(app: &TestApp, service: &str) -> Streaming<HealthCheckResponse> {
    HealthClient::new(app.channel.clone())
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("Watch answers every name")
        .into_inner()
}

/// The next status the stream sends within `within`, if any.
async fn next(
    stream: &mut Streaming<HealthCheckResponse>,
    within: Duration,
) -> Option<ServingStatus> {
    let message = tokio::time::timeout(within, stream.message()).await.ok()?;
    Some(message.expect("the stream stays healthy")?.status())
}

/// Reads the stream until it sends `wanted` (within 10 s).
async fn streams(stream: &mut Streaming<HealthCheckResponse>, wanted: ServingStatus) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Some(status) = next(stream, deadline - tokio::time::Instant::now()).await {
        if status == wanted {
            return true;
        }
    }
    false
}

async fn becomes(app: &TestApp, service: &str, wanted: ServingStatus) -> bool {
    app.becomes(service, wanted, Duration::from_secs(10)).await
}

#[sqlx::test(migrations = false)]
async fn every_service_reports_serving(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    for service in [
        "",
        "liveness",
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
    let mut coupons = watch(&app, "ecommerce.v1.CouponService").await;
    assert_eq!(
        next(&mut coupons, Duration::from_secs(1)).await,
        Some(ServingStatus::Serving)
    );

    proxy.cut().await;
    assert!(becomes(&app, "", ServingStatus::NotServing).await);
    assert!(streams(&mut coupons, ServingStatus::NotServing).await);
    assert_eq!(
        app.health("liveness").await,
        Some(ServingStatus::Serving),
        "a dependency outage never makes the process dead"
    );
    // Balances need only Postgres.
    assert_eq!(
        app.health("ecommerce.v1.BalanceService").await,
        Some(ServingStatus::Serving)
    );

    proxy.restore().await;
    assert!(becomes(&app, "", ServingStatus::Serving).await);
    assert!(streams(&mut coupons, ServingStatus::Serving).await);
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
    let mut liveness = watch(&app, "liveness").await;
    assert_eq!(
        next(&mut liveness, Duration::from_secs(1)).await,
        Some(ServingStatus::Serving)
    );

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
    // Several dependency pings into the outage (every 200 ms in the tests).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(app.health("liveness").await, Some(ServingStatus::Serving));
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
    assert_eq!(
        next(&mut liveness, Duration::from_millis(100)).await,
        None,
        "liveness sent no change through the outage and the recovery"
    );
    assert_eq!(app.health("liveness").await, Some(ServingStatus::Serving));
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn unknown_names_are_not_found_by_check_and_service_unknown_by_watch(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;
    let checked = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await;
    assert_eq!(checked.unwrap_err().code(), tonic::Code::NotFound);

    let mut unknown = watch(&app, "no.such.Service").await;
    assert_eq!(
        next(&mut unknown, Duration::from_secs(1)).await,
        Some(ServingStatus::ServiceUnknown)
    );
    assert_eq!(
        next(&mut unknown, Duration::from_millis(300)).await,
        None,
        "the stream stays open, silent"
    );
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn liveness_turns_not_serving_while_the_runtime_is_wedged(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    const WORKERS: usize = 2;
    // The server gets a runtime of its own, so that wedging it leaves this test's client free.
    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()
        .unwrap();
    let app = spawn_app_on(server_runtime.handle(), db, |s| {
        s.set("LIVENESS_STALL_MS", 400);
    })
    .await;
    assert!(becomes(&app, "liveness", ServingStatus::Serving).await);

    // More blocking tasks than workers, so that every worker gets one whatever the scheduler
    // does: nothing else runs on the server's runtime for at least 1.5 s.
    for _ in 0..WORKERS * 2 {
        server_runtime.spawn(async { std::thread::sleep(Duration::from_millis(1500)) });
    }
    let wedged = tokio::time::Instant::now();
    // Answered only once a worker is free again, with the watchdog's verdict.
    let seen = eventually(Duration::from_secs(10), || async {
        app.health("liveness").await == Some(ServingStatus::NotServing)
    })
    .await;
    assert!(seen, "liveness stayed SERVING through a wedged runtime");
    assert!(
        wedged.elapsed() >= Duration::from_millis(1400),
        "answered while every worker was blocked"
    );
    // One threshold after the heartbeat resumes, the process is alive again.
    assert!(becomes(&app, "liveness", ServingStatus::Serving).await);
    app.stop().await;
    server_runtime.shutdown_background();
}
