//! A holder asking again: once their row is known to be committed the gate itself answers
//! COUPON_ALREADY_ISSUED with the row's id (no Postgres); a holder the gate has not yet seen
//! recorded is looked up in Postgres, and the gate learns the id from that answer; a gate
//! rebuilt from Postgres carries every holder's id; a full refund gives the same row back, so
//! the id stays true. A replica that saw a holder's row answers them from memory (no Redis),
//! and every replica answers a holder as a holder after the window and the seats are gone.
//!
//! Postgres is reached through a proxy the tests cut: a call that still needed it could not
//! answer ALREADY_EXISTS.

use std::{net::SocketAddr, time::Duration};

use ecommerce::proto::{IssueCouponRequest, UpdateCouponRequest};
use fred::interfaces::{HashesInterface, KeysInterface, SortedSetsInterface};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tonic::{Code, Request};
use tonic_types::StatusExt;

use crate::support::{
    TestApp,
    coupons::{create_coupon, issue, sold_out, ts},
    eventually,
    private::PrivateRedis,
    proxy::TcpProxy,
    reason,
    refunds::{paid_order, refund},
    shop::create_product,
    spawn_app_with,
};

/// A server whose Postgres is behind a proxy, and a pool that reaches Postgres directly.
async fn app_behind_proxy(db: PgConnectOptions) -> (TestApp, TcpProxy, PgPool) {
    let target = SocketAddr::from(([127, 0, 0, 1], db.get_port()));
    let proxy = TcpProxy::start(target).await;
    let app = spawn_app_with(proxied(&db, &proxy), |_| {}).await;
    let direct = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(db)
        .await
        .unwrap();
    (app, proxy, direct)
}

fn proxied(db: &PgConnectOptions, proxy: &TcpProxy) -> PgConnectOptions {
    db.clone().port(proxy.addr.port())
}

/// Another replica of `app` (its Redis keys, its Postgres address): one that saw none of
/// `app`'s answers.
async fn other_replica(app: &TestApp, db: PgConnectOptions) -> TestApp {
    let prefix = app.redis_prefix.clone();
    spawn_app_with(db, move |s| {
        s.set("REDIS_KEY_PREFIX", prefix);
    })
    .await
}

fn key(app: &TestApp, coupon: i64, name: &str) -> String {
    format!("{}coupon:{{{coupon}}}:{name}", app.redis_prefix)
}

async fn holder_value(app: &TestApp, coupon: i64, user: i64) -> Option<String> {
    app.redis
        .hget(key(app, coupon, "holders"), user.to_string())
        .await
        .unwrap()
}

/// The gate carries `user`'s coupon id (the win may stay pending until the reconciliation job
/// settles it).
async fn gate_knows(app: &TestApp, coupon: i64, user: i64, id: i64) -> bool {
    let value = holder_value(app, coupon, user).await.unwrap_or_default();
    value.ends_with(&format!(":{id}")) && value.matches(':').count() == 2
}

/// The coupon id an ALREADY_EXISTS answer names.
fn already_issued(answer: Result<i64, tonic::Status>) -> i64 {
    let status = answer.expect_err("the user already holds the coupon");
    assert_eq!(
        reason(&status),
        (Code::AlreadyExists, "COUPON_ALREADY_ISSUED".to_string()),
        "{status:?}"
    );
    status.get_details_error_info().unwrap().metadata["user_coupon_id"]
        .parse()
        .unwrap()
}

async fn seat_and_id(direct: &PgPool, coupon: i64, user: i64) -> (i64, i64) {
    sqlx::query_as("SELECT seat, id FROM user_coupons WHERE coupon_id = $1 AND user_id = $2")
        .bind(coupon)
        .bind(user)
        .fetch_one(direct)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn a_settled_holders_repeat_is_answered_by_the_gate_without_postgres(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let (app, proxy, direct) = app_behind_proxy(db.clone()).await;
    // User 2 asks again at a replica that did not record their win.
    let other = other_replica(&app, proxied(&db, &proxy)).await;
    let coupon = create_coupon(&app, 10).await;
    let first = issue(&app, coupon, 1).await.expect("user 1 wins");
    let second = issue(&app, coupon, 2).await.expect("user 2 wins");
    // The winners' rows committed: the gate learns their ids right after the answers.
    for (user, id) in [(1, first), (2, second)] {
        assert!(
            eventually(Duration::from_secs(5), || gate_knows(
                &app, coupon, user, id
            ))
            .await,
            "the gate carries user {user}'s coupon {id}: {:?}",
            holder_value(&app, coupon, user).await
        );
    }
    // User 2's win as the gate holds it before it learns the row (the gate's write was lost):
    // no id, still pending.
    let (seat, _) = seat_and_id(&direct, coupon, 2).await;
    let won = chrono::Utc::now().timestamp_millis();
    let _: i64 = app
        .redis
        .hset(key(&app, coupon, "holders"), ("2", format!("{seat}:{won}")))
        .await
        .unwrap();
    let _: i64 = app
        .redis
        .zadd(
            key(&app, coupon, "pending"),
            None,
            None,
            false,
            false,
            (won as f64, "2"),
        )
        .await
        .unwrap();

    proxy.cut().await;
    // Postgres is unreachable: the settled holder is answered by the gate alone, truthfully.
    for replica in [&app, &other] {
        assert_eq!(already_issued(issue(replica, coupon, 1).await), first);
    }
    // The replica that recorded user 2's row knows it; the gate's pending win changes nothing.
    assert_eq!(already_issued(issue(&app, coupon, 2).await), second);
    // Elsewhere the holder still pending needs Postgres: never ALREADY_EXISTS without it.
    let mut request = Request::new(IssueCouponRequest {
        user_id: 2,
        coupon_id: coupon,
    });
    request.set_timeout(Duration::from_secs(3));
    let pending = tokio::time::timeout(
        Duration::from_secs(4),
        other.coupons().issue_coupon(request),
    )
    .await;
    if let Ok(answer) = pending {
        let status = answer.expect_err("no coupon without Postgres");
        assert_ne!(status.code(), Code::AlreadyExists, "{status:?}");
    }

    // Postgres back: the pending holder's repeat reads the row, and the gate learns its id.
    proxy.restore().await;
    let answered = loop {
        match issue(&other, coupon, 2).await {
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other,
        }
    };
    assert_eq!(already_issued(answered), second);
    assert!(gate_knows(&app, coupon, 2, second).await);
    proxy.cut().await;
    assert_eq!(already_issued(issue(&other, coupon, 2).await), second);
    proxy.restore().await;
    app.stop().await;
    other.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_rebuilt_gate_answers_every_holder_with_their_coupon_id(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let (app, proxy, direct) = app_behind_proxy(db).await;
    let coupon = create_coupon(&app, 10).await;
    let mut ids = Vec::new();
    for user in 1..=3 {
        ids.push(issue(&app, coupon, user).await.expect("a seat is left"));
    }
    // Redis forgets the gate; the next call rebuilds it from Postgres.
    let keys: Vec<String> = ["state", "holders", "free", "pending"]
        .iter()
        .map(|name| key(&app, coupon, name))
        .collect();
    let _: i64 = app.redis.del(keys).await.unwrap();
    issue(&app, coupon, 4)
        .await
        .expect("the rebuilt gate issues");
    for (user, id) in (1..=3).zip(&ids) {
        let (seat, row) = seat_and_id(&direct, coupon, user).await;
        assert_eq!(row, *id);
        assert_eq!(
            holder_value(&app, coupon, user).await,
            Some(format!("{seat}:0:{id}")),
            "the rebuild loaded user {user}'s coupon id"
        );
    }
    proxy.cut().await;
    for (user, id) in (1..=3).zip(&ids) {
        assert_eq!(already_issued(issue(&app, coupon, user).await), *id);
    }
    proxy.restore().await;
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_coupon_given_back_by_a_full_refund_keeps_its_id_at_the_gate(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let (app, proxy, direct) = app_behind_proxy(db).await;
    let coupon = create_coupon(&app, 10).await;
    let id = issue(&app, coupon, 1).await.expect("user 1 wins");
    let kettle = create_product(&app, "kettle", 50_000, 10).await;
    let order = paid_order(&app, 1, &[(kettle, 1)], id).await;
    let (_, refunded) = refund(&app, order.id, &[], false, "full")
        .await
        .expect("a full refund");
    assert!(refunded.coupon_returned);
    // The same row is the user's again, AVAILABLE: the id the gate carries is still true.
    let status: String = sqlx::query_scalar("SELECT status::text FROM user_coupons WHERE id = $1")
        .bind(id)
        .fetch_one(&direct)
        .await
        .unwrap();
    assert_eq!(status, "AVAILABLE");
    assert!(
        eventually(Duration::from_secs(5), || gate_knows(&app, coupon, 1, id)).await,
        "the gate carries user 1's coupon {id}"
    );
    proxy.cut().await;
    assert_eq!(already_issued(issue(&app, coupon, 1).await), id);
    proxy.restore().await;
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_holder_is_told_so_everywhere_after_the_window_and_while_redis_is_down(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let mut redis = PrivateRedis::start().await;
    let prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
    let replica = || {
        let (url, prefix) = (redis.url(), prefix.clone());
        spawn_app_with(db.clone(), move |s| {
            s.set("REDIS_URL", url)
                .set("REDIS_KEY_PREFIX", prefix)
                .set("REDIS_COMMAND_TIMEOUT_MS", 300);
        })
    };
    let (a, b) = (replica().await, replica().await);
    let coupon = create_coupon(&a, 2).await;
    let first = issue(&a, coupon, 1).await.expect("user 1 wins at A");
    let second = issue(&b, coupon, 2).await.expect("user 2 wins at B");
    assert_eq!(
        reason(&issue(&b, coupon, 3).await.expect_err("no seat left")),
        sold_out()
    );
    // Sold out: a holder is still told what they hold, by the gate (user 2 at A), and by a
    // replica that knows it (user 2 at B), although B just saw the coupon sold out.
    assert_eq!(already_issued(issue(&a, coupon, 2).await), second);
    assert_eq!(already_issued(issue(&b, coupon, 2).await), second);

    let now = chrono::Utc::now();
    a.admin()
        .update_coupon(UpdateCouponRequest {
            coupon_id: coupon,
            issue_ends_at: ts(now),
            ..Default::default()
        })
        .await
        .expect("window ended");
    // The window is over for newcomers (once B's moment of "sold out" has passed); a holder is
    // still told what they hold, by the gate (user 1 at B) as by a replica that remembers them.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let not_issuable = (Code::FailedPrecondition, "COUPON_NOT_ISSUABLE".to_string());
    for replica in [&a, &b] {
        assert_eq!(
            reason(&issue(replica, coupon, 4).await.unwrap_err()),
            not_issuable
        );
    }
    assert_eq!(already_issued(issue(&b, coupon, 1).await), first);
    assert_eq!(already_issued(issue(&a, coupon, 1).await), first);

    // Without Redis: the holders A saw are answered by A alone; nobody else is.
    redis.kill().await;
    assert_eq!(already_issued(issue(&a, coupon, 1).await), first);
    assert_eq!(already_issued(issue(&a, coupon, 2).await), second);
    let newcomer = issue(&a, coupon, 4).await.unwrap_err();
    assert_eq!(newcomer.code(), Code::Unavailable, "{newcomer:?}");
    a.stop().await;
    b.stop().await;
}
