//! A Postgres that answers but is not a writable primary, and a commit whose answer is lost:
//! what a failover looks like to the service between its machines going and coming.
//!
//! - a primary made read-only while serving (`default_transaction_read_only`, what an operator
//!   sets before a switchover): every write answers UNAVAILABLE (never INTERNAL), readiness turns
//!   NOT_SERVING, nothing changes, and both recover by themselves once it is writable again;
//! - a service pointed at a standby with migrations off: writes and reads UNAVAILABLE (the pool
//!   refuses a standby: money is never read from a server that may lag), NOT_SERVING, until the
//!   standby is promoted;
//! - a connection cut at COMMIT, before the server got it or after it committed: the caller is
//!   told OUTCOME_UNKNOWN, and a retry with the same key runs the call in the first case and
//!   returns the first result in the second.

use std::time::Duration;

use ecommerce::proto::{
    ChargeBalanceRequest, GetBalanceRequest, IssueCouponRequest, PayRequest, PlaceOrderRequest,
    SetItemRequest,
};
use sqlx::{Connection, PgConnection, postgres::PgPoolOptions};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{
    TestApp,
    coupons::create_coupon,
    eventually,
    private::PrivatePostgres,
    proxy::{CommitCut, TcpProxy},
    reason,
    shop::{balance, charge, create_product, lines, place},
    spawn_app_with,
};

async fn becomes(app: &TestApp, wanted: ServingStatus) -> bool {
    app.becomes("", wanted, Duration::from_secs(15)).await
}

/// Every kind of write the shop takes, once each; their answers.
async fn writes(
    app: &TestApp,
    user: i64,
    product: i64,
    coupon: i64,
    order: i64,
) -> Vec<(&'static str, Result<(), Status>)> {
    let key = uuid::Uuid::new_v4().simple().to_string();
    vec![
        (
            "ChargeBalance",
            app.balance()
                .charge_balance(ChargeBalanceRequest {
                    user_id: user,
                    amount: 1_000,
                    idempotency_key: key.clone(),
                })
                .await
                .map(|_| ()),
        ),
        (
            "PlaceOrder",
            app.orders()
                .place_order(PlaceOrderRequest {
                    user_id: user,
                    items: lines(&[(product, 1)]),
                    user_coupon_id: 0,
                    idempotency_key: key.clone(),
                })
                .await
                .map(|_| ()),
        ),
        (
            "Pay",
            app.payments()
                .pay(PayRequest {
                    order_id: order,
                    user_id: user,
                    idempotency_key: key.clone(),
                })
                .await
                .map(|_| ()),
        ),
        (
            "IssueCoupon",
            app.coupons()
                .issue_coupon(IssueCouponRequest {
                    user_id: user,
                    coupon_id: coupon,
                })
                .await
                .map(|_| ()),
        ),
        (
            "SetItem",
            app.carts()
                .set_item(SetItemRequest {
                    user_id: user,
                    product_id: product,
                    quantity: 1,
                })
                .await
                .map(|_| ()),
        ),
    ]
}

fn assert_all_unavailable(answers: &[(&str, Result<(), Status>)]) {
    for (method, answer) in answers {
        let status = answer.as_ref().expect_err(method);
        assert_eq!(
            reason(status),
            (Code::Unavailable, "DEPENDENCY_UNAVAILABLE".to_string()),
            "{method}: {status:?}"
        );
    }
}

async fn set_read_only(postgres: &PrivatePostgres, on: bool) {
    let mut admin = PgConnection::connect_with(&postgres.options())
        .await
        .unwrap();
    sqlx::query("SET default_transaction_read_only = off")
        .execute(&mut admin)
        .await
        .unwrap();
    let statement = if on {
        "ALTER SYSTEM SET default_transaction_read_only = on"
    } else {
        "ALTER SYSTEM RESET default_transaction_read_only"
    };
    sqlx::query(statement).execute(&mut admin).await.unwrap();
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&mut admin)
        .await
        .unwrap();
}

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_made_read_only_refuses_every_write_and_is_not_ready_until_writable() {
    let postgres = PrivatePostgres::start().await;
    let app = spawn_app_with(postgres.options(), |_| {}).await;
    let product = create_product(&app, "lamp", 1_000, 100).await;
    let coupon = create_coupon(&app, 10).await;
    charge(&app, 1, 100_000).await;
    let order = place(&app, 1, &[(product, 1)]).await.unwrap().id;
    assert!(becomes(&app, ServingStatus::Serving).await);

    set_read_only(&postgres, true).await;
    assert!(
        becomes(&app, ServingStatus::NotServing).await,
        "a read-only database is not ready"
    );
    let before = (
        count(&app, "SELECT count(*) FROM balance_history").await,
        count(&app, "SELECT count(*) FROM orders").await,
    );
    assert_all_unavailable(&writes(&app, 1, product, coupon, order).await);
    // Reads go on, and nothing was written.
    let reply = app
        .balance()
        .get_balance(GetBalanceRequest { user_id: 1 })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().balance, 100_000);
    let after = (
        count(&app, "SELECT count(*) FROM balance_history").await,
        count(&app, "SELECT count(*) FROM orders").await,
    );
    assert_eq!(before, after);

    set_read_only(&postgres, false).await;
    assert!(
        becomes(&app, ServingStatus::Serving).await,
        "ready again by itself"
    );
    for (method, answer) in writes(&app, 1, product, coupon, order).await {
        assert!(answer.is_ok(), "{method} after recovery: {answer:?}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_pointed_at_a_standby_refuses_writes_until_it_is_promoted() {
    let primary = PrivatePostgres::start().await;
    // The schema and a customer, made through the primary.
    let first = spawn_app_with(primary.options(), |_| {}).await;
    let product = create_product(&first, "lamp", 1_000, 100).await;
    let coupon = create_coupon(&first, 10).await;
    charge(&first, 1, 100_000).await;
    let order = place(&first, 1, &[(product, 1)]).await.unwrap().id;
    first.stop().await;

    let standby = primary.standby().await;
    let app = spawn_app_with(standby.options(), |s| {
        s.set("RUN_MIGRATIONS", false)
            .set("DATABASE_ACQUIRE_TIMEOUT_MS", 500);
    })
    .await;
    assert!(
        !eventually(Duration::from_secs(3), || async {
            app.health("").await == Some(ServingStatus::Serving)
        })
        .await,
        "a standby is never ready"
    );
    assert_all_unavailable(&writes(&app, 1, product, coupon, order).await);
    let read = app
        .balance()
        .get_balance(GetBalanceRequest { user_id: 1 })
        .await;
    assert_eq!(
        reason(&read.expect_err("no money is read from a standby")).0,
        Code::Unavailable
    );

    standby.promote().await;
    assert!(
        becomes(&app, ServingStatus::Serving).await,
        "ready once promoted"
    );
    for (method, answer) in writes(&app, 1, product, coupon, order).await {
        assert!(answer.is_ok(), "{method} once promoted: {answer:?}");
    }
    // Charged 1,000 and paid the 1,000 order.
    assert_eq!(balance(&app, 1).await, 100_000);
    app.stop().await;
}

async fn keyed_charge(app: &TestApp, user: i64, amount: i64, key: &str) -> Result<i64, Status> {
    app.balance()
        .charge_balance(ChargeBalanceRequest {
            user_id: user,
            amount,
            idempotency_key: key.into(),
        })
        .await
        .map(|r| r.into_inner().history_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_outcome_unknown_and_a_keyed_retry_settles_it() {
    let postgres = PrivatePostgres::start().await;
    let proxy = TcpProxy::start(([127, 0, 0, 1], postgres.port).into()).await;
    let app = spawn_app_with(postgres.options().port(proxy.addr.port()), |_| {}).await;
    let direct = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(postgres.options())
        .await
        .unwrap();
    let ledger = |user: i64| {
        let direct = direct.clone();
        async move {
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT id, amount FROM balance_history WHERE user_id = $1 ORDER BY id",
            )
            .bind(user)
            .fetch_all(&direct)
            .await
            .unwrap()
        }
    };

    // The COMMIT never reaches the server: nothing happened, and the retry does it.
    proxy.cut_at_commit_after("outcome-lost", CommitCut::Before);
    let unknown = keyed_charge(&app, 1, 300, "outcome-lost")
        .await
        .expect_err("cut at COMMIT");
    assert!(proxy.commit_cut_done());
    assert_eq!(
        reason(&unknown),
        (Code::Unavailable, "OUTCOME_UNKNOWN".to_string())
    );
    assert!(
        ledger(1).await.is_empty(),
        "the cut COMMIT committed nothing"
    );
    let retried = keyed_charge(&app, 1, 300, "outcome-lost")
        .await
        .expect("the retry runs the call");
    assert_eq!(ledger(1).await, vec![(retried, 300)]);

    // The server commits, its answer is lost: the retry returns the first result.
    proxy.cut_at_commit_after("outcome-kept", CommitCut::After);
    let unknown = keyed_charge(&app, 2, 500, "outcome-kept")
        .await
        .expect_err("cut after COMMIT");
    assert!(proxy.commit_cut_done());
    assert_eq!(
        reason(&unknown),
        (Code::Unavailable, "OUTCOME_UNKNOWN".to_string())
    );
    let committed = ledger(2).await;
    assert_eq!(committed.len(), 1, "the COMMIT went through");
    let retried = keyed_charge(&app, 2, 500, "outcome-kept")
        .await
        .expect("the retry replays");
    assert_eq!(
        retried, committed[0].0,
        "the first result, not a second charge"
    );
    assert_eq!(ledger(2).await, committed);
    assert_eq!(balance(&app, 2).await, 500);
    app.stop().await;
}
