use std::collections::BTreeMap;

use ecommerce::proto::{ChargeBalanceRequest, GetBalanceRequest, ListBalanceHistoryRequest};
use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::support::{
    assert_error, invalid_field, shop::assert_ledger_matches, spawn_app, spawn_app_with,
};

fn charge(user_id: i64, amount: i64, key: &str) -> ChargeBalanceRequest {
    ChargeBalanceRequest {
        user_id,
        amount,
        idempotency_key: key.into(),
    }
}

/// Hundreds of ChargeBalance calls at once (batched together): a hundred plain ones on one user,
/// and on six new users a mix of plain charges, keyed ones each sent three times at once, and
/// amounts past the maximum, alone or once the balance fills up. Every OK answer's ledger entry
/// exists exactly once with the answered balance, every entry was answered OK, the copies of a
/// key share one entry, and every balance equals its ledger and stays within the maximum.
#[sqlx::test(migrations = false)]
async fn hundreds_of_concurrent_charges_all_land_exactly_once(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    const MAX: i64 = 1_000_000;
    let app = spawn_app_with(db, |s| {
        s.set("MAX_BALANCE", MAX);
    })
    .await;
    let mut requests: Vec<ChargeBalanceRequest> = (0..100).map(|_| charge(7, 1_000, "")).collect();
    for n in 0..300 {
        let user = 1 + n % 6;
        let amount = 10_000 + n * 7_919 % 90_000;
        match n % 5 {
            0 => requests.extend((0..3).map(|_| charge(user, amount, &format!("k-{n}")))),
            1 if n % 15 == 1 => requests.push(charge(user, MAX + n, "")),
            _ => requests.push(charge(user, amount, "")),
        }
    }
    let calls = requests.iter().map(|request| {
        let mut client = app.balance();
        let request = request.clone();
        async move { client.charge_balance(request).await }
    });
    let results = join_all(calls).await;

    // Each OK answer's entry, by id: user, amount, balance; and each key's entry.
    let mut answered: BTreeMap<i64, (i64, i64, i64)> = BTreeMap::new();
    let mut by_key: BTreeMap<String, i64> = BTreeMap::new();
    let mut refused = 0;
    for (request, result) in requests.iter().zip(results) {
        let response = match result {
            Ok(response) => response.into_inner(),
            Err(status) => {
                assert_error::<()>(Err(status), Code::OutOfRange, "BALANCE_LIMIT_EXCEEDED");
                assert_ne!(request.user_id, 7, "user 7 stays far below the maximum");
                refused += 1;
                continue;
            }
        };
        let entry = (request.user_id, request.amount, response.balance);
        assert_eq!(response.user_id, request.user_id);
        let first = answered.insert(response.history_id, entry);
        assert!(
            first.is_none() || !request.idempotency_key.is_empty(),
            "two unkeyed charges answered with entry {}",
            response.history_id
        );
        assert!(first.is_none_or(|f| f == entry), "{first:?} vs {entry:?}");
        if !request.idempotency_key.is_empty() {
            let id = *by_key
                .entry(request.idempotency_key.clone())
                .or_insert(response.history_id);
            assert_eq!(id, response.history_id, "one key, two entries");
        }
    }
    assert!(refused >= 20, "only {refused} charges passed the maximum");
    let ledger: BTreeMap<i64, (i64, i64, i64)> = sqlx::query_as::<_, (i64, i64, i64, i64)>(
        "SELECT id, user_id, amount, balance_after FROM balance_history",
    )
    .fetch_all(&app.pg)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, user, amount, after)| (id, (user, amount, after)))
    .collect();
    assert_eq!(
        ledger, answered,
        "the ledger is exactly the charges answered OK"
    );
    for user in 1..=7 {
        let balance = assert_ledger_matches(&app, user).await;
        assert!(balance <= MAX, "user {user}: {balance} past the maximum");
    }
    assert_eq!(assert_ledger_matches(&app, 7).await, 100_000);
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
