//! Coupon calls abandoned by their callers, then retried: every answer is true when given.

use std::{collections::HashMap, time::Duration};

use ecommerce::proto::IssueCouponRequest;
use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::{Code, Request};
use tonic_types::StatusExt;

use crate::support::{
    TestApp,
    coupons::{create_coupon, gate_agrees, issue, issued_in_postgres},
    eventually, reason, spawn_app, spawn_app_with,
};

/// One IssueCoupon whose caller gives up after `deadline` (the server sees the same deadline).
async fn issue_within(
    app: &TestApp,
    coupon_id: i64,
    user_id: i64,
    deadline: Duration,
) -> Result<i64, tonic::Status> {
    let mut request = Request::new(IssueCouponRequest { user_id, coupon_id });
    request.set_timeout(deadline);
    let mut client = app.coupons();
    match tokio::time::timeout(deadline, client.issue_coupon(request)).await {
        Ok(answer) => answer.map(|r| r.into_inner().user_coupon.expect("user coupon").id),
        Err(_) => Err(tonic::Status::deadline_exceeded("abandoned by the caller")),
    }
}

#[sqlx::test(migrations = false)]
async fn abandoned_calls_then_retries_leave_everyone_exactly_one_coupon(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;
    let coupon = create_coupon(&app, 400).await;
    let users: Vec<i64> = (1..=300).collect();

    // Each first call is abandoned after 1-10 ms, many of them after the gate granted a seat.
    let first = join_all(users.iter().map(|&user| {
        let deadline = Duration::from_millis(1 + user as u64 % 10);
        let app = &app;
        async move { issue_within(app, coupon, user, deadline).await }
    }))
    .await;
    let abandoned: Vec<i64> = users
        .iter()
        .zip(&first)
        .filter(|(_, r)| {
            r.as_ref()
                .is_err_and(|s| matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled))
        })
        .map(|(u, _)| *u)
        .collect();
    for result in &first {
        if let Err(status) = result {
            assert!(
                matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
                "first calls either succeed or are abandoned: {status:?}"
            );
        }
    }
    assert!(
        abandoned.len() >= 30,
        "only {} of 300 first calls were abandoned",
        abandoned.len()
    );

    // Every user retries once, normally.
    let retries = join_all(users.iter().map(|&user| issue(&app, coupon, user))).await;
    let mut answers: HashMap<(Code, String), usize> = HashMap::new();
    for (&user, retry) in users.iter().zip(&retries) {
        match retry {
            Ok(_) => *answers.entry((Code::Ok, String::new())).or_default() += 1,
            Err(status) => {
                // True when told: the coupon the answer names exists and is this user's.
                assert!(
                    names_own_row(&app, coupon, user, status).await,
                    "user {user}: {status:?}"
                );
                *answers.entry(reason(status)).or_default() += 1;
            }
        }
    }
    // The abandoned calls that reached the gate were carried through: their users hear
    // ALREADY_EXISTS (or, for a win that never got recorded, get a seat now).
    let already = answers
        .get(&(Code::AlreadyExists, "COUPON_ALREADY_ISSUED".to_string()))
        .copied()
        .unwrap_or(0);
    let succeeded_first = first.iter().filter(|r| r.is_ok()).count();
    eprintln!(
        "first calls: {succeeded_first} answered, {} abandoned; retries: {answers:?}",
        abandoned.len()
    );
    assert!(
        already >= succeeded_first + 10,
        "abandoned calls reached the gate and were recorded: {answers:?}, {succeeded_first} \
         first calls succeeded"
    );

    let holders: Vec<i64> = issued_in_postgres(&app, coupon).await;
    assert_eq!(holders, users, "all 300 end with exactly one coupon");
    assert!(
        eventually(Duration::from_secs(5), || gate_agrees(&app, coupon, 400)).await,
        "the gate agrees with Postgres"
    );
    app.stop().await;
}

/// A deadline in 1..`max_ms` ms drawn from `(seed, user)` (splitmix64): the same run each time,
/// spread evenly over each power of ten, so that some calls are abandoned at every stage
/// however fast the machine answers.
fn random_deadline(seed: u64, user: i64, max_ms: u64) -> Duration {
    let mut z = seed
        .wrapping_add(user as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = (z >> 11) as f64 / (1u64 << 53) as f64;
    Duration::from_secs_f64((max_ms as f64).powf(u) / 1_000.0)
}

/// True when `status` is an ALREADY_EXISTS; it must then be COUPON_ALREADY_ISSUED naming
/// `user`'s coupon of `coupon` as Postgres holds it now.
async fn names_own_row(app: &TestApp, coupon: i64, user: i64, status: &tonic::Status) -> bool {
    if status.code() != Code::AlreadyExists {
        return false;
    }
    assert_eq!(
        reason(status),
        (Code::AlreadyExists, "COUPON_ALREADY_ISSUED".to_string())
    );
    let id: i64 = status.get_details_error_info().unwrap().metadata["user_coupon_id"]
        .parse()
        .unwrap();
    let owner: Option<i64> =
        sqlx::query_scalar("SELECT user_id FROM user_coupons WHERE id = $1 AND coupon_id = $2")
            .bind(id)
            .bind(coupon)
            .fetch_optional(&app.pg)
            .await
            .unwrap();
    assert_eq!(
        owner,
        Some(user),
        "ALREADY_EXISTS names user {user}'s coupon"
    );
    true
}

#[sqlx::test(migrations = false)]
async fn a_stampede_abandoned_at_random_deadlines_leaves_everyone_exactly_one_coupon(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    // The winners' rows go through the shared batcher, many to a statement.
    let app = spawn_app_with(db, |s| {
        s.set("COUPON_RECORD_BATCH_MAX", 1024);
    })
    .await;
    const USERS: i64 = 600;
    let coupon = create_coupon(&app, 700).await;
    let users: Vec<i64> = (1..=USERS).collect();
    let mut abandoned = 0;
    let mut answered_ok: HashMap<i64, i64> = HashMap::new();
    // Two waves of the whole crowd, each call abandoned at a deadline of its own (the second
    // wave retries what the first abandoned, and repeats what it got).
    for wave in 0..2u64 {
        let answers = join_all(users.iter().map(|&user| {
            let deadline = random_deadline(wave * 7_919 + 17, user, 1_500);
            let app = &app;
            async move { issue_within(app, coupon, user, deadline).await }
        }))
        .await;
        for (&user, answer) in users.iter().zip(&answers) {
            match answer {
                Ok(id) => {
                    let first = *answered_ok.entry(user).or_insert(*id);
                    assert_eq!(first, *id, "user {user} got two coupons");
                }
                Err(status)
                    if matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled) =>
                {
                    abandoned += 1;
                }
                // A grant the recorder could not write in time (an overloaded test machine):
                // nothing was written, the seat went back.
                Err(status) if status.code() == Code::Unavailable => {}
                Err(status) => assert!(
                    names_own_row(&app, coupon, user, status).await,
                    "user {user}, wave {wave}: {status:?}"
                ),
            }
        }
    }
    assert!(abandoned >= 100, "only {abandoned} calls were abandoned");

    // Everyone retries, patiently: a coupon or the truth about the one they hold.
    let retries = join_all(users.iter().map(|&user| issue(&app, coupon, user))).await;
    let heard_ok = answered_ok.len();
    // Users who never heard OK but whose abandoned call was carried through to its row.
    let mut carried = 0;
    for (&user, retry) in users.iter().zip(&retries) {
        match retry {
            Ok(id) => assert!(
                answered_ok.insert(user, *id).is_none(),
                "user {user} got a second coupon"
            ),
            Err(status) => {
                assert!(
                    names_own_row(&app, coupon, user, status).await,
                    "{status:?}"
                );
                if !answered_ok.contains_key(&user) {
                    carried += 1;
                }
            }
        }
    }
    eprintln!(
        "{abandoned} calls abandoned, {heard_ok} users heard OK; on retry, {carried} others \
         told ALREADY_EXISTS"
    );
    assert!(
        carried >= 10,
        "abandoned calls were carried through: {carried}"
    );
    assert!(heard_ok >= 10, "some calls finished in time: {heard_ok}");
    assert_eq!(
        issued_in_postgres(&app, coupon).await,
        users,
        "all {USERS} end with exactly one coupon"
    );
    // The coupons OK answers named are the rows Postgres holds.
    let rows: Vec<(i64, i64)> =
        sqlx::query_as("SELECT user_id, id FROM user_coupons WHERE coupon_id = $1")
            .bind(coupon)
            .fetch_all(&app.pg)
            .await
            .unwrap();
    for (user, id) in rows {
        if let Some(heard) = answered_ok.get(&user) {
            assert_eq!(*heard, id, "user {user} was told another coupon");
        }
    }
    assert!(
        eventually(Duration::from_secs(5), || gate_agrees(&app, coupon, 700)).await,
        "the gate agrees with Postgres"
    );
    app.stop().await;
}
