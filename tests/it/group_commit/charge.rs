//! Group commit of charges: charges credited together in one batch get the answers they get one
//! by one, for every kind of charge (no key, a fresh key, a replayed key, a key reused with
//! another amount, the same key twice at once, past the maximum at once or only after the
//! earlier charges, several charges of one user, a new user's first charges), and the books
//! agree; and batches running at once that open the same new users' balances lose nothing.
//!
//! Which of one user's several charges reports which balance depends on the order they run in,
//! which a batch takes from its queue: each user's answers (with the amount asked, not the key)
//! are compared as a multiset, and a user's several charges ask the same amount (or one past
//! the maximum whatever the order).

use std::collections::BTreeMap;

use ecommerce::proto::{ChargeBalanceRequest, ChargeBalanceResponse};
use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::{
    Answer, Keys, answer, assert_batched, drop_database, key_result, keys, second_database,
};
use crate::support::{TestApp, shop::assert_ledger_matches, spawn_app_with};

const USERS: i64 = 120;
const MAX: i64 = 100_000;

/// A charge request: user, amount, key.
type Request = (i64, i64, String);

/// A charge's answer without its ledger id: user, new balance.
type Charged = (i64, i64);

fn charged(r: &ChargeBalanceResponse) -> Charged {
    (r.user_id, r.balance)
}

async fn charge(
    app: &TestApp,
    (user_id, amount, key): &Request,
) -> Result<ChargeBalanceResponse, tonic::Status> {
    app.balance()
        .charge_balance(ChargeBalanceRequest {
            user_id: *user_id,
            amount: *amount,
            idempotency_key: key.clone(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The state both servers start from, made by the same calls; returns the requests of the
/// test (several for some users).
async fn prepare(app: &TestApp) -> Vec<Request> {
    let mut requests = Vec::new();
    for user in 1..=USERS {
        let key = format!("charge-{user}");
        if user % 10 != 6 && user % 10 != 7 {
            charge(app, &(user, 50_000, String::new())).await.unwrap();
        }
        match user % 10 {
            // No key.
            0 => requests.push((user, 1_000, String::new())),
            // A fresh key.
            1 => requests.push((user, 2_000, key)),
            // A replayed key: the same charge already went through.
            2 => {
                charge(app, &(user, 3_000, key.clone())).await.unwrap();
                requests.push((user, 3_000, key));
            }
            // A key already used with another amount.
            3 => {
                charge(app, &(user, 3_000, key.clone())).await.unwrap();
                requests.push((user, 4_000, key));
            }
            // Past the maximum by itself, keyed or not.
            4 => {
                requests.push((user, MAX + 1, key));
                requests.push((user, i64::MAX, String::new()));
            }
            // Past the maximum only with the balance (and then with the earlier charges of the
            // batch): 50,000 + 30,000 fits, a second 30,000 does not, whichever comes first.
            5 => {
                requests.push((user, 30_000, String::new()));
                requests.push((user, 30_000, String::new()));
                requests.push((user, 50_001, format!("{key}-over")));
            }
            // A new user's first charges: three fit, the fourth passes the maximum.
            6 => {
                for _ in 0..4 {
                    requests.push((user, 30_000, String::new()));
                }
            }
            // A new user's first charges, each with its own key, all within the maximum.
            7 => {
                for n in 0..3 {
                    requests.push((user, 10_000, format!("{key}-{n}")));
                }
            }
            // The same key twice at once: one charge, both answered with it.
            8 => {
                requests.push((user, 5_000, key.clone()));
                requests.push((user, 5_000, key));
            }
            // Several charges of one user, keyed and not, all within the maximum.
            _ => {
                requests.push((user, 2_000, String::new()));
                requests.push((user, 2_000, key));
                requests.push((user, 2_000, String::new()));
            }
        }
    }
    requests
}

/// Each user's answers with the amounts asked, as a sorted multiset (their order depends on the
/// queue).
fn by_user(
    requests: &[Request],
    results: &[Result<ChargeBalanceResponse, tonic::Status>],
) -> BTreeMap<i64, Vec<String>> {
    let mut answers: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for ((user, amount, _), result) in requests.iter().zip(results) {
        let answer: Answer<Charged> = answer(result, charged);
        answers
            .entry(*user)
            .or_default()
            .push(format!("{amount} -> {answer:?}"));
    }
    for list in answers.values_mut() {
        list.sort();
    }
    answers
}

/// Every balance and its ledger (each CHARGE entry's balance after is its predecessor's plus
/// its amount, in id order: a user's charges of one batch were numbered in the order decided),
/// the ledger's entries per user (amount, balance after, in id order), the idempotency keys.
async fn books(app: &TestApp, users: i64) -> (Vec<i64>, Vec<(i64, i64, i64)>, Keys) {
    let mut balances = Vec::new();
    for user in 1..=users {
        balances.push(assert_ledger_matches(app, user).await);
    }
    let ledger: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT user_id, amount, balance_after FROM balance_history ORDER BY user_id, id",
    )
    .fetch_all(&app.pg)
    .await
    .unwrap();
    let mut last = BTreeMap::new();
    for &(user, amount, after) in &ledger {
        let before = last.insert(user, after).unwrap_or(0);
        assert_eq!(before + amount, after, "user {user}: ledger out of order");
        assert!(
            after <= MAX,
            "user {user}: balance {after} past the maximum"
        );
    }
    (balances, ledger, keys(app).await)
}

/// The batched server and the one with batching off. With `overlapping`, the batched server
/// runs up to four batches at once: each starts beside the last once it commits or has run for
/// a millisecond.
async fn servers(
    db: PgConnectOptions,
    batch: i64,
    overlapping: bool,
) -> (TestApp, TestApp, PgConnectOptions, String) {
    let (alone_db, alone_name) = second_database(&db).await;
    let batched = spawn_app_with(db, |s| {
        s.set("WRITE_BATCH_MAX", batch).set("MAX_BALANCE", MAX);
        if overlapping {
            s.set("WRITE_BATCHES_IN_FLIGHT", 4)
                .set("WRITE_BATCH_OVERLAP_COMMIT", true)
                .set("WRITE_BATCH_STALL_MS", 1);
        }
    })
    .await;
    let alone = spawn_app_with(alone_db.clone(), |s| {
        s.set("WRITE_BATCH_MAX", 1).set("MAX_BALANCE", MAX);
    })
    .await;
    (batched, alone, alone_db, alone_name)
}

#[sqlx::test(migrations = false)]
async fn charges_in_one_batch_get_the_answers_they_get_alone(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let (batched, alone, alone_db, alone_name) = servers(db, 128, false).await;
    let requests = prepare(&batched).await;
    assert_eq!(prepare(&alone).await, requests);

    let together = join_all(requests.iter().map(|r| charge(&batched, r))).await;
    let mut one_by_one = Vec::new();
    for request in &requests {
        one_by_one.push(charge(&alone, request).await);
    }
    assert_eq!(
        by_user(&requests, &together),
        by_user(&requests, &one_by_one)
    );
    let mut reasons = std::collections::BTreeSet::new();
    for result in &together {
        if let Answer::Refused(_, reason) = answer(result, charged) {
            reasons.insert(reason);
        }
    }
    assert_eq!(
        reasons,
        ["BALANCE_LIMIT_EXCEEDED", "IDEMPOTENCY_KEY_REUSED"]
            .map(String::from)
            .into()
    );
    // A replay answers with the entry the key first made; the same key twice at once, with one.
    for ((user, _, key), result) in requests.iter().zip(&together) {
        if !key.is_empty() && matches!(user % 10, 2 | 8) {
            let first = key_result(&batched, *user, key).await;
            assert_eq!(result.as_ref().unwrap().history_id, first, "user {user}");
        }
    }
    // Charges made together share their transaction's timestamp.
    let mut made: Vec<i64> = together
        .iter()
        .zip(&requests)
        .filter(|(_, (user, ..))| user % 10 != 2)
        .filter_map(|(r, _)| r.as_ref().ok().map(|r| r.history_id))
        .collect();
    made.sort_unstable();
    made.dedup();
    assert!(made.len() >= 120, "only {} charges made", made.len());
    assert_batched(
        &batched,
        "SELECT count(DISTINCT created_at) FROM balance_history WHERE id = ANY($1)",
        &made,
    )
    .await;
    assert_eq!(books(&batched, USERS).await, books(&alone, USERS).await);

    batched.stop().await;
    alone.stop().await;
    drop_database(&alone_db, &alone_name).await;
}

#[sqlx::test(migrations = false)]
async fn batches_at_once_opening_the_same_new_balances_lose_nothing(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    // Small batches, so that several run at once, each opening the same new users' rows.
    let (batched, alone, alone_db, alone_name) = servers(db, 4, true).await;
    const NEW: i64 = 16;
    // Per new user: eleven charges of 10,000 (one passes the maximum), three of them keyed.
    // A user's charges queue one after the other: the batches running at once share users.
    let requests: Vec<Request> = (1..=NEW)
        .flat_map(|user| {
            (0..11).map(move |n| {
                let key = if n < 3 {
                    format!("new-{user}-{n}")
                } else {
                    String::new()
                };
                (user, 10_000, key)
            })
        })
        .collect();
    let together = join_all(requests.iter().map(|r| charge(&batched, r))).await;
    let mut one_by_one = Vec::new();
    for request in &requests {
        one_by_one.push(charge(&alone, request).await);
    }
    for result in together.iter().chain(&one_by_one) {
        if let Err(status) = result {
            assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
        }
    }
    assert_eq!(
        by_user(&requests, &together),
        by_user(&requests, &one_by_one)
    );
    // Which charge of a user is refused depends on the order, so the keys may differ.
    let (balances, ledger, _) = books(&batched, NEW).await;
    assert_eq!((balances, ledger), {
        let (b, l, _) = books(&alone, NEW).await;
        (b, l)
    });
    assert!(
        together.iter().filter(|r| r.is_ok()).count() == (NEW * 10) as usize,
        "every new user got exactly ten charges"
    );

    batched.stop().await;
    alone.stop().await;
    drop_database(&alone_db, &alone_name).await;
}
