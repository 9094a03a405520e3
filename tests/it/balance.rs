use std::collections::HashSet;

use ecommerce::proto::{ChargeBalanceRequest, GetBalanceRequest, ListBalanceHistoryRequest};
use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::support::{assert_error, invalid_field, spawn_app, spawn_app_with};

fn charge(user_id: i64, amount: i64, key: &str) -> ChargeBalanceRequest {
    ChargeBalanceRequest {
        user_id,
        amount,
        idempotency_key: key.into(),
    }
}

#[sqlx::test(migrations = false)]
async fn hundred_concurrent_charges_all_land_exactly_once(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let calls = (0..100).map(|_| {
        let mut client = app.balance();
        async move { client.charge_balance(charge(7, 1_000, "")).await }
    });
    let results = join_all(calls).await;
    let history_ids: HashSet<i64> = results
        .into_iter()
        .map(|r| r.expect("charge succeeds").into_inner().history_id)
        .collect();
    assert_eq!(history_ids.len(), 100);

    let balance = app
        .balance()
        .get_balance(GetBalanceRequest { user_id: 7 })
        .await
        .unwrap()
        .into_inner()
        .balance;
    assert_eq!(balance, 100_000);
    let (entries, ledger_sum): (i64, i64) = sqlx::query_as(
        "SELECT count(*), sum(amount)::bigint FROM balance_history WHERE user_id = 7",
    )
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!((entries, ledger_sum), (100, 100_000));
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn retries_of_one_idempotency_key_credit_once(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let calls = (0..50).map(|_| {
        let mut client = app.balance();
        async move { client.charge_balance(charge(9, 5_000, "top-up-1")).await }
    });
    let responses: Vec<_> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("every retry succeeds").into_inner())
        .collect();
    let first = &responses[0];
    assert!(
        responses.iter().all(|r| r == first),
        "all retries see the first result"
    );
    assert_eq!(first.balance, 5_000);

    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM balance_history WHERE user_id = 9")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(entries, 1);

    // The same key with another amount is a different request.
    let reused = app
        .balance()
        .charge_balance(charge(9, 6_000, "top-up-1"))
        .await;
    assert_error(reused, Code::InvalidArgument, "IDEMPOTENCY_KEY_REUSED");
    // The same key from another user is that user's own key.
    let other = app
        .balance()
        .charge_balance(charge(10, 6_000, "top-up-1"))
        .await;
    assert_eq!(other.unwrap().into_inner().balance, 6_000);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn invalid_charges_are_refused_and_change_nothing(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, |s| {
        s.set("MAX_BALANCE", 10_000);
    })
    .await;
    let mut client = app.balance();
    for (request, field) in [
        (charge(1, 0, ""), "amount"),
        (charge(1, -5, ""), "amount"),
        (charge(1, i64::MIN, ""), "amount"),
        (charge(0, 100, ""), "user_id"),
        (charge(-1, 100, ""), "user_id"),
        (charge(1, 100, "has space"), "idempotency_key"),
        (charge(1, 100, &"k".repeat(129)), "idempotency_key"),
    ] {
        let status = client.charge_balance(request).await.unwrap_err();
        assert_eq!(invalid_field(&status), field);
    }

    client.charge_balance(charge(1, 9_000, "")).await.unwrap();
    let over = client.charge_balance(charge(1, 1_001, "")).await;
    assert_error(over, Code::OutOfRange, "BALANCE_LIMIT_EXCEEDED");
    let huge = client.charge_balance(charge(2, i64::MAX, "")).await;
    assert_error(huge, Code::OutOfRange, "BALANCE_LIMIT_EXCEEDED");
    client
        .charge_balance(charge(1, 1_000, ""))
        .await
        .expect("exactly the maximum is fine");

    let balance = client
        .get_balance(GetBalanceRequest { user_id: 1 })
        .await
        .unwrap()
        .into_inner()
        .balance;
    assert_eq!(balance, 10_000);
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM balance_history")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(entries, 2, "refused charges leave no ledger entry");
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn balance_of_a_new_user_is_zero_and_history_pages_newest_first(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;
    let mut client = app.balance();
    let fresh = client
        .get_balance(GetBalanceRequest { user_id: 42 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((fresh.user_id, fresh.balance), (42, 0));

    for amount in 1..=25 {
        client.charge_balance(charge(42, amount, "")).await.unwrap();
    }
    let mut amounts = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_balance_history(ListBalanceHistoryRequest {
                user_id: 42,
                page_size: 10,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 10);
        amounts.extend(page.entries.iter().map(|e| e.amount));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(amounts, (1..=25).rev().collect::<Vec<_>>());

    let bad = client
        .list_balance_history(ListBalanceHistoryRequest {
            user_id: 42,
            page_size: 101,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&bad), "page_size");
    let bad = client
        .list_balance_history(ListBalanceHistoryRequest {
            user_id: 42,
            page_size: 0,
            page_token: "garbage".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&bad), "page_token");
    app.stop().await;
}
