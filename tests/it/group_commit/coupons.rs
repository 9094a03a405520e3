//! Coupon winners on the shared group-commit batcher: winners recorded together by one
//! statement get the answers they get recorded alone, and a Postgres killed under them loses no
//! coupon answered OK.
//!
//! The reference, as for orders: a second server on a second database, prepared by the same
//! calls, runs the same requests one by one with batching off. The requests reach every answer
//! the recorder can give (a row written; a row Postgres already has for the user although the
//! gate lost them; a seat Postgres gave someone else; a seat beyond a total lowered behind the
//! gate's back, which fails the whole multi-row statement; a coupon gone from Postgres) beside
//! the gate's own answers, and each is chosen so that it does not depend on the order the
//! requests run in.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use ecommerce::proto::IssueCouponRequest;
use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;
use tonic_types::StatusExt;

use super::{assert_batched, drop_database, second_database};
use crate::support::{
    TestApp,
    coupons::{coupon_request, create_coupon, create_coupon_with, gate_agrees, issue, ts},
    eventually,
    private::PrivatePostgres,
    reason, spawn_app_with,
};

/// A coupon call's answer as the two servers are compared: an OK coupon without its id and
/// times (user, coupon, status), or the refusal's code, reason and the coupon it names.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Ok(i64, i64, i32),
    Refused(Code, String, Option<String>),
}

async fn ask(app: &TestApp, coupon_id: i64, user_id: i64) -> Answer {
    let result = app
        .coupons()
        .issue_coupon(IssueCouponRequest { user_id, coupon_id })
        .await;
    match result {
        Ok(r) => {
            let uc = r.into_inner().user_coupon.expect("user coupon");
            Answer::Ok(uc.user_id, uc.coupon_id, uc.status)
        }
        Err(status) => {
            let (code, why) = reason(&status);
            let named = status
                .get_details_error_info()
                .and_then(|info| info.metadata.get("user_coupon_id").cloned());
            Answer::Refused(code, why, named)
        }
    }
}

/// The coupons the requests name, the same ids on both servers.
struct Coupons {
    /// Open, seats to spare; some of its seats and some of its users' rows were written into
    /// Postgres behind the gate's back.
    open: i64,
    /// Open at the gate, but its total lowered in Postgres to the one seat already issued.
    shrunk: i64,
    /// Open at the gate, gone from Postgres.
    vanished: i64,
    /// Its window opens in an hour.
    later: i64,
    /// Its only seat is taken.
    sold_out: i64,
}

const USERS: i64 = 256;
/// Users whose coupon of `open` Postgres has but the gate does not know.
fn hidden_holder(user: i64) -> bool {
    user % 8 == 1
}

/// The state both servers start from. Ids come out the same on both, since each database is
/// fresh and set up by the same calls.
async fn prepare(app: &TestApp) -> Coupons {
    let open = create_coupon(app, 1_000).await;
    let shrunk = create_coupon(app, 300).await;
    let vanished = create_coupon(app, 300).await;
    let mut later = coupon_request(10);
    later.issue_starts_at = ts(Utc::now() + chrono::Duration::hours(1));
    later.issue_ends_at = ts(Utc::now() + chrono::Duration::hours(2));
    let later = create_coupon_with(app, later).await;
    let sold_out = create_coupon(app, 1).await;
    issue(app, sold_out, 9_001).await.unwrap();
    issue(app, shrunk, 9_002).await.unwrap();
    // Settled holders: the gate knows their rows.
    for user in (1..=USERS).filter(|u| u % 8 == 2) {
        issue(app, open, user).await.unwrap();
    }
    // Rows the gate never saw (a gate restored from an old copy would not know them), on seats
    // it will hand out: spaced, so that no winner meets many in a row.
    let hidden: Vec<i64> = (1..=USERS).filter(|&u| hidden_holder(u)).collect();
    let seats: Vec<i64> = (0..hidden.len() as i64).map(|k| 40 + 8 * k).collect();
    sqlx::query(
        "INSERT INTO user_coupons (coupon_id, user_id, seat, expires_at)
         SELECT $1, u, s, now() + interval '7 days' FROM unnest($2::bigint[], $3::bigint[]) AS t(u, s)
         ORDER BY u",
    )
    .bind(open)
    .bind(&hidden)
    .bind(&seats)
    .execute(&app.pg)
    .await
    .unwrap();
    sqlx::query("UPDATE coupons SET total_quantity = 1 WHERE id = $1")
        .bind(shrunk)
        .execute(&app.pg)
        .await
        .unwrap();
    sqlx::query("DELETE FROM coupons WHERE id = $1")
        .bind(vanished)
        .execute(&app.pg)
        .await
        .unwrap();
    Coupons {
        open,
        shrunk,
        vanished,
        later,
        sold_out,
    }
}

/// The first wave: one request per user. None fails a whole batch's statement.
fn first_wave(c: &Coupons) -> Vec<(i64, i64)> {
    (1..=USERS)
        .map(|user| {
            let coupon = match user % 8 {
                4 => c.vanished,
                5 => c.later,
                6 => c.sold_out,
                7 if user % 16 == 7 => 9_999_999,
                _ => c.open,
            };
            (coupon, user)
        })
        .collect()
}

/// The second wave: seats beyond the lowered total (each fails the batch's statement, whose
/// other winners are then recorded one by one) among fresh winners of the open coupon.
fn second_wave(c: &Coupons) -> Vec<(i64, i64)> {
    (USERS + 1..=USERS + 64)
        .map(|user| (if user % 2 == 0 { c.shrunk } else { c.open }, user))
        .collect()
}

/// What Postgres holds: every (coupon, user, status).
async fn books(app: &TestApp) -> BTreeMap<(i64, i64), String> {
    let rows: Vec<(i64, i64, String)> =
        sqlx::query_as("SELECT coupon_id, user_id, status FROM user_coupons")
            .fetch_all(&app.pg)
            .await
            .unwrap();
    rows.into_iter().map(|(c, u, s)| ((c, u), s)).collect()
}

fn count(answers: &[Answer], wanted: impl Fn(&Answer) -> bool) -> usize {
    answers.iter().filter(|a| wanted(a)).count()
}

#[sqlx::test(migrations = false)]
async fn coupon_winners_recorded_in_one_batch_get_the_answers_they_get_alone(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let (alone_db, alone_name) = second_database(&db).await;
    // No reconciliation while the test runs: it would teach the gate what the test hid from it.
    let batched = spawn_app_with(db, |s| {
        s.set("COUPON_RECORD_BATCH_MAX", 1024)
            .set("COUPON_RECONCILE_INTERVAL_SECS", 86_400);
    })
    .await;
    let alone = spawn_app_with(alone_db.clone(), |s| {
        s.set("COUPON_RECORD_BATCH_MAX", 1)
            .set("COUPON_RECONCILE_INTERVAL_SECS", 86_400);
    })
    .await;
    let coupons = prepare(&batched).await;
    let same = prepare(&alone).await;
    assert_eq!(
        (coupons.open, coupons.later, coupons.vanished),
        (same.open, same.later, same.vanished)
    );

    for wave in [first_wave(&coupons), second_wave(&coupons)] {
        let together = join_all(wave.iter().map(|&(c, u)| ask(&batched, c, u))).await;
        let mut one_by_one = Vec::new();
        for &(c, u) in &wave {
            one_by_one.push(ask(&alone, c, u).await);
        }
        for (((coupon, user), batched), alone) in wave.iter().zip(&together).zip(&one_by_one) {
            assert_eq!(batched, alone, "user {user}, coupon {coupon}");
        }
        // Every kind of answer came up.
        let ok = count(&together, |a| matches!(a, Answer::Ok(..)));
        let refused = |code: Code| {
            count(
                &together,
                move |a| matches!(a, Answer::Refused(c, ..) if *c == code),
            )
        };
        assert!(ok >= 32, "{together:?}");
        assert!(refused(Code::ResourceExhausted) >= 16, "{together:?}");
        if wave.len() == USERS as usize {
            assert!(refused(Code::AlreadyExists) >= 64, "{together:?}");
            assert!(refused(Code::NotFound) >= 32, "{together:?}");
            assert!(refused(Code::FailedPrecondition) >= 32, "{together:?}");
        }
    }
    assert_eq!(books(&batched).await, books(&alone).await);
    // The winners of the first wave were recorded by fewer commits than winners.
    let first: Vec<i64> = first_wave(&coupons)
        .iter()
        .filter(|&&(c, u)| c == coupons.open && u % 8 != 1 && u % 8 != 2)
        .map(|&(_, u)| u)
        .collect();
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM user_coupons WHERE coupon_id = $1 AND user_id = ANY($2)",
    )
    .bind(coupons.open)
    .bind(&first)
    .fetch_all(&batched.pg)
    .await
    .unwrap();
    assert_eq!(ids.len(), first.len());
    assert_batched(
        &batched,
        "SELECT count(DISTINCT issued_at) FROM user_coupons WHERE id = ANY($1)",
        &ids,
    )
    .await;
    // The gate counts what Postgres holds, on both (where no row was hidden from it).
    for app in [&batched, &alone] {
        assert!(gate_agrees(app, coupons.sold_out, 1).await);
    }

    batched.stop().await;
    alone.stop().await;
    drop_database(&alone_db, &alone_name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_under_coupon_winners_loses_no_coupon_answered_ok() {
    let postgres = PrivatePostgres::start().await;
    let app = spawn_app_with(postgres.options(), |s| {
        s.set("DATABASE_ACQUIRE_TIMEOUT_MS", 500)
            .set("DEFAULT_DEADLINE_MS", 3000)
            .set("COUPON_RECORD_BATCH_MAX", 64)
            .set("COUPON_RECONCILE_INTERVAL_SECS", 1);
    })
    .await;
    const SEATS: i64 = 200_000;
    const WORKERS: i64 = 64;
    let coupon = create_coupon(&app, SEATS).await;
    let stop = Arc::new(AtomicBool::new(false));
    // user -> the coupon id an OK answer gave them.
    let heard: Arc<Mutex<HashMap<i64, i64>>> = Arc::default();
    let refused = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let workers = (0..WORKERS).map(|worker| {
        let (stop, heard, refused, app) = (stop.clone(), heard.clone(), refused.clone(), &app);
        async move {
            let mut user = worker * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                user += 1;
                match issue(app, coupon, user).await {
                    Ok(id) => {
                        heard.lock().unwrap().insert(user, id);
                    }
                    Err(status) => {
                        assert!(
                            matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
                            "only outage errors expected: {status:?}"
                        );
                        *refused
                            .lock()
                            .unwrap()
                            .entry(format!("{:?}", status.code()))
                            .or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
    });
    let fault = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = heard.lock().unwrap().len();
        assert!(before > 0, "coupons were issued before the kill");
        postgres.sigkill().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        postgres.start_again().await;
        let recovered = eventually(Duration::from_secs(30), || async {
            heard.lock().unwrap().len() > before + 200
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        assert!(recovered, "coupons are issued again after the restart");
    };
    let (_, ()) = tokio::join!(join_all(workers), fault);

    let heard = std::mem::take(&mut *heard.lock().unwrap());
    let refused = std::mem::take(&mut *refused.lock().unwrap());
    assert!(!refused.is_empty(), "the kill interrupted some calls");
    // Every coupon answered OK is in Postgres, the caller's.
    let ids: Vec<i64> = heard.values().copied().collect();
    let found: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT id, user_id FROM user_coupons WHERE id = ANY($1) AND coupon_id = $2",
    )
    .bind(&ids)
    .bind(coupon)
    .fetch_all(&app.pg)
    .await
    .unwrap();
    let found: HashMap<i64, i64> = found.into_iter().collect();
    for (user, id) in &heard {
        assert_eq!(
            found.get(id),
            Some(user),
            "coupon {id}, answered OK to user {user}, is lost"
        );
    }
    // Wins whose outcome the kill hid are settled: the gate ends agreeing with Postgres (rows
    // found, orphans released), never holding a seat Postgres does not have, nor the reverse.
    assert!(
        eventually(Duration::from_secs(30), || gate_agrees(&app, coupon, SEATS)).await,
        "the gate agrees with Postgres after the reconciliation"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM user_coupons")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    eprintln!(
        "kill under coupon winners: {} answered OK, {rows} rows, refused {refused:?}",
        heard.len()
    );
    app.stop().await;
}
