//! Connection ageing (`MAX_CONNECTION_AGE_SECS`): the server moves clients to new connections,
//! so to any replica behind a Service, without failing their calls; a connection still busy one
//! grace after its GOAWAY is closed.
//!
//! Clients connect through a [`TcpProxy`], which counts the connections they open.

use std::{error::Error as _, time::Duration};

use ecommerce::proto::{
    GetBalanceRequest, PlaceOrderRequest, balance_service_client::BalanceServiceClient,
    order_service_client::OrderServiceClient,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::time::Instant;
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::support::{
    TestApp, eventually,
    metrics::{metrics_text, series_value},
    proxy::TcpProxy,
    shop::{charge, create_product, lines, lock_product},
    spawn_app_with,
};

async fn aged_app(db: PgConnectOptions, age_secs: u64, grace_secs: u64) -> (TestApp, TcpProxy) {
    let app = spawn_app_with(db, |s| {
        s.set("MAX_CONNECTION_AGE_SECS", age_secs)
            .set("MAX_CONNECTION_AGE_GRACE_SECS", grace_secs);
    })
    .await;
    let proxy = TcpProxy::start(app.addr).await;
    (app, proxy)
}

fn channel_through(proxy: &TcpProxy) -> Channel {
    Channel::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .connect_lazy()
}

/// tonic 0.14's client fails a call that races a GOAWAY although the server never saw it: a
/// call queued after the GOAWAY arrived but before the connection closed (hyper hands the
/// request back: CANCELLED, "connection closed"), or a stream the client opened after the last
/// stream the server's GOAWAY accepted (INTERNAL, h2 GOAWAY NO_ERROR; HTTP/2 guarantees such a
/// stream was not processed). grpc-go and grpc-java retry exactly these transparently; so does
/// this test, and only these: any call that reached the server and failed is a failure.
fn never_processed(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(error) = source {
        let refused = |e: &h2::Error| {
            e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR)
        };
        let canceled = error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled);
        if canceled || error.downcast_ref::<h2::Error>().is_some_and(refused) {
            return true;
        }
        source = error.source();
    }
    false
}

async fn closed_for(app: &TestApp, reason: &str) -> f64 {
    let series = format!(r#"grpc_server_connections_closed_total{{reason="{reason}"}}"#);
    series_value(&metrics_text(app).await, &series).unwrap_or(0.0)
}

#[sqlx::test(migrations = false)]
async fn calls_move_to_new_connections_at_the_age_and_none_fails(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let (app, proxy) = aged_app(db, 2, 30).await;
    let closed_before = closed_for(&app, "max_age").await;
    // Several callers, so that GOAWAYs find calls under way. Each calls every 20 ms rather than
    // flat out: tests run in parallel, and one that takes every core of a small machine makes
    // the timing checks of others fail.
    const CALLERS: usize = 4;
    let channel = channel_through(&proxy);
    let started = Instant::now();
    let callers = (0..CALLERS).map(|_| {
        let mut client = BalanceServiceClient::new(channel.clone());
        let mut pace = tokio::time::interval(Duration::from_millis(20));
        async move {
            let (mut ok, mut retried, mut failed) = (0, 0, Vec::new());
            while started.elapsed() < Duration::from_secs(8) {
                pace.tick().await;
                match client.get_balance(GetBalanceRequest { user_id: 1 }).await {
                    Ok(_) => ok += 1,
                    Err(status) if never_processed(&status) => retried += 1,
                    Err(status) => failed.push(status),
                }
            }
            (ok, retried, failed)
        }
    });
    let (mut ok, mut retried, mut failed) = (0, 0, Vec::new());
    for (o, r, f) in futures::future::join_all(callers).await {
        (ok, retried) = (ok + o, retried + r);
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} calls failed: {failed:?}",
        failed.len()
    );
    // One connection, then at least one more per age (2 s ±10%) in 8 s.
    let connections = proxy.connections();
    assert!(
        connections >= 4,
        "{connections} connections: the server did not close them at their age"
    );
    // At most the calls under way at each GOAWAY race it.
    assert!(retried <= CALLERS * connections, "{retried} retried");
    assert!(ok > 100, "only {ok} calls in 8 s");
    let closed = closed_for(&app, "max_age").await - closed_before;
    assert!(closed >= 3.0, "{closed} connections closed for their age");
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_call_in_flight_at_the_age_finishes_during_the_grace(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let (app, proxy) = aged_app(db.clone(), 1, 30).await;
    let product = create_product(&app, "slow", 1_000, 10).await;
    charge(&app, 1, 10_000).await;
    let channel = channel_through(&proxy);
    let lock = lock_product(&db, product).await;

    let mut orders = OrderServiceClient::new(channel.clone());
    let slow = tokio::spawn(async move {
        orders
            .place_order(PlaceOrderRequest {
                user_id: 1,
                items: lines(&[(product, 1)]),
                ..Default::default()
            })
            .await
    });
    // Past the age (1 s + 10%), a new call needs a new connection: the old one got GOAWAY.
    let balances = BalanceServiceClient::new(channel);
    let moved = eventually(Duration::from_secs(5), || {
        let (mut balances, proxy) = (balances.clone(), &proxy);
        async move {
            let call = balances.get_balance(GetBalanceRequest { user_id: 1 }).await;
            call.is_ok() && proxy.connections() >= 2
        }
    })
    .await;
    assert!(moved, "no GOAWAY at the age");
    assert!(!slow.is_finished(), "the slow call must still be in flight");

    drop(lock);
    let placed = slow.await.unwrap();
    assert!(placed.is_ok(), "cut during the grace: {placed:?}");
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_stream_still_open_one_grace_after_the_goaway_is_closed(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let (app, proxy) = aged_app(db, 1, 1).await;
    let cut_before = closed_for(&app, "max_age_grace").await;
    let started = Instant::now();
    let mut watch = HealthClient::new(channel_through(&proxy))
        .watch(HealthCheckRequest {
            service: "liveness".into(),
        })
        .await
        .expect("Watch starts")
        .into_inner();
    assert!(watch.message().await.unwrap().is_some());

    // The status never changes, so the stream only ends when the connection does.
    let ended = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the connection was never closed");
    let lived = started.elapsed();
    let status = ended.expect_err("the stream was cut, not finished");
    assert_ne!(status.code(), Code::Ok);
    // Age 1 s ±10%, then the grace of 1 s.
    assert!(
        (Duration::from_millis(1800)..Duration::from_millis(4000)).contains(&lived),
        "closed after {lived:?}"
    );
    let cut = eventually(Duration::from_secs(5), || async {
        closed_for(&app, "max_age_grace").await > cut_before
    })
    .await;
    assert!(cut, "not counted as closed at the end of the grace");
    app.stop().await;
}
