//! The operator's coupon controls on a live sale: more seats in the middle of a stampede (and
//! across a rebuild of the gate), the window ended on one of three replicas, a total lowered
//! to what was issued, and the coupons listed page by page with their seats.
//!
//! Run against a Redis Cluster too (scripts/test), since the raise is a script of its own.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use ecommerce::proto::{
    Coupon, ListCouponsRequest, UpdateCouponRequest, admin_service_client::AdminServiceClient,
};
use prost_types::Timestamp;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;

use crate::support::{
    ADMIN_TOKEN, BearerToken, TestApp, assert_error,
    coupons::{
        create_coupon, gate_agrees, gate_state, issue, issued_in_postgres, sold_out, stampede,
    },
    delete_keys, eventually, reason, replicas, spawn_app_with,
};

async fn update(app: &TestApp, request: UpdateCouponRequest) -> Result<Coupon, Status> {
    app.admin()
        .update_coupon(request)
        .await
        .map(|r| r.into_inner().coupon.expect("coupon"))
}

/// The operator's own connection: its call does not queue behind a stampede's thousands of
/// streams on the shoppers' connection.
async fn update_as_operator(app: &TestApp, request: UpdateCouponRequest) -> Result<Coupon, Status> {
    let channel = Channel::from_shared(format!("http://{}", app.addr))
        .expect("valid uri")
        .connect()
        .await
        .expect("connects");
    AdminServiceClient::with_interceptor(
        channel,
        BearerToken::new(Some(format!("Bearer {ADMIN_TOKEN}"))),
    )
    .update_coupon(request)
    .await
    .map(|r| r.into_inner().coupon.expect("coupon"))
}

fn new_total(coupon_id: i64, total: i64) -> UpdateCouponRequest {
    UpdateCouponRequest {
        coupon_id,
        total_quantity: Some(total),
        ..Default::default()
    }
}

async fn issued_count(app: &TestApp, coupon: i64) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM user_coupons WHERE coupon_id = $1")
        .bind(coupon)
        .fetch_one(&app.pg)
        .await
        .unwrap()
}

/// Seats in Postgres: all distinct and none beyond `total`.
async fn assert_seats_within(app: &TestApp, coupon: i64, total: i64) {
    let (max, distinct, rows): (Option<i64>, i64, i64) = sqlx::query_as(
        "SELECT max(seat), count(DISTINCT seat), count(*) FROM user_coupons WHERE coupon_id = $1",
    )
    .bind(coupon)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(distinct, rows, "two coupons share a seat");
    assert!(
        max.unwrap_or(0) <= total,
        "seat {max:?} beyond the total {total}"
    );
}

/// Accumulates one stampede's refusals into `into`; only "sold out" is expected.
fn only_sold_out(refusals: &HashMap<(Code, String), usize>) {
    for code_reason in refusals.keys() {
        assert_eq!(code_reason, &sold_out(), "unexpected refusal {refusals:?}");
    }
}

#[sqlx::test(migrations = false)]
async fn raising_the_total_mid_stampede_adds_exactly_the_new_seats(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    // 10,000 calls on the test's one thread, beside the other tests on two cores: a winner can
    // wait past the support's 1 s recording bound (it then hears UNAVAILABLE and its seat goes
    // back; CI saw it). That bound is not what this test is about, so it is 5 s here.
    let app = spawn_app_with(db, |s| {
        s.set("MAX_CONCURRENT_REQUESTS", 20_000)
            .set("COUPON_ORPHAN_GRACE_MS", 10_000);
    })
    .await;
    let coupon = create_coupon(&app, 400).await;
    let started = Instant::now();

    // 10,000 users at once (the issue's stampede); when 200 of the first 400 seats are
    // recorded, the operator raises the total to 1,000 while the rest of the calls are in flight.
    let finished = Arc::new(AtomicBool::new(false));
    let seen_at_raise = AtomicI64::new(0);
    let ((first_winners, first_refusals), raised) = tokio::join!(
        async {
            let result = stampede(&app, coupon, 1..=10_000).await;
            finished.store(true, Ordering::SeqCst);
            result
        },
        async {
            while issued_count(&app, coupon).await < 200 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            seen_at_raise.store(issued_count(&app, coupon).await, Ordering::SeqCst);
            let raised = update_as_operator(&app, new_total(coupon, 1_000))
                .await
                .expect("raised");
            (raised, finished.load(Ordering::SeqCst))
        }
    );
    let (raised, stampede_was_over) = raised;
    eprintln!(
        "raised at {} issued; first stampede: {} winners in {:?}",
        seen_at_raise.load(Ordering::SeqCst),
        first_winners.len(),
        started.elapsed()
    );
    assert!(!stampede_was_over, "the raise landed after the stampede");
    assert_eq!(raised.total_quantity, 1_000);
    assert_eq!(raised.issued_quantity + raised.remaining_quantity, 1_000);
    only_sold_out(&first_refusals);

    // Whatever the first stampede left, a second one takes, and nobody more.
    let (second_winners, second_refusals) = stampede(&app, coupon, 10_001..=12_000).await;
    only_sold_out(&second_refusals);
    let winners: HashSet<i64> = first_winners.into_iter().chain(second_winners).collect();
    let in_pg: HashSet<i64> = issued_in_postgres(&app, coupon).await.into_iter().collect();
    assert_eq!(winners.len(), 1_000, "issued is the new total exactly");
    assert_eq!(in_pg, winners, "every winner, and only they, recorded");
    assert_seats_within(&app, coupon, 1_000).await;
    assert!(
        gate_agrees(&app, coupon, 1_000).await,
        "{:?}",
        gate_state(&app, coupon).await
    );
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_raise_racing_a_rebuild_of_the_gate_keeps_the_new_total(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app_with(db, |s| {
        s.set("COUPON_RECONCILE_INTERVAL_SECS", 1)
            .set("COUPON_ORPHAN_GRACE_MS", 500);
    })
    .await;
    let coupon = create_coupon(&app, 100).await;
    let (won, refused) = stampede(&app, coupon, 1..=60).await;
    assert_eq!(won.len(), 60);
    only_sold_out(&refused);

    // Redis forgets the gate; the next requests rebuild it from Postgres while the total is
    // raised: whichever comes first, the gate ends up with the raised total.
    for round in 0..5_i64 {
        delete_keys(&app.redis, &app.redis_prefix).await;
        let users = 1_000 * (round + 1)..1_000 * (round + 1) + 20;
        let (_, raised) = tokio::join!(
            stampede(&app, coupon, users),
            update_as_operator(&app, new_total(coupon, 200 + 100 * round))
        );
        let raised = raised.expect("raised");
        assert_eq!(raised.total_quantity, 200 + 100 * round);
        let total = 200 + 100 * round;
        let state = format!("{}coupon:{{{coupon}}}:state", app.redis_prefix);
        let gate_total: Option<i64> =
            fred::interfaces::HashesInterface::hget(&app.redis, &state, "total")
                .await
                .unwrap();
        assert!(
            gate_total.is_none_or(|t| t == total),
            "round {round}: the gate decides by {gate_total:?} seats, not {total}"
        );
    }

    // All 600 seats are taken, no more.
    let (_, refused) = stampede(&app, coupon, 20_001..=20_700).await;
    assert!(
        refused.keys().all(|k| k == &sold_out()
            || k == &(Code::Unavailable, "DEPENDENCY_UNAVAILABLE".into())),
        "{refused:?}"
    );
    let (_, _) = stampede(&app, coupon, 30_001..=30_100).await;
    assert_eq!(issued_count(&app, coupon).await, 600);
    assert_seats_within(&app, coupon, 600).await;
    assert!(
        eventually(Duration::from_secs(15), || gate_agrees(&app, coupon, 600)).await,
        "{:?}",
        gate_state(&app, coupon).await
    );
    app.stop().await;
}

/// Issues to one new user after another until `stop`; returns when each accepted call was
/// sent. Any refusal must be "outside the window".
async fn issue_until_stopped(
    app: &TestApp,
    coupon: i64,
    next_user: &AtomicI64,
    stop: &AtomicBool,
) -> Vec<Instant> {
    let mut accepted = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let user = next_user.fetch_add(1, Ordering::SeqCst);
        let sent = Instant::now();
        match issue(app, coupon, user).await {
            Ok(_) => accepted.push(sent),
            Err(status) => assert_eq!(
                reason(&status),
                (Code::FailedPrecondition, "COUPON_NOT_ISSUABLE".into()),
                "{status:?}"
            ),
        }
    }
    accepted
}

#[sqlx::test(migrations = false)]
async fn ending_the_window_on_one_replica_stops_issuance_on_all_three_within_100ms(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let [a, b, c] = replicas(db).await;
    let coupon = create_coupon(&a, 100_000).await;
    for (user, replica) in [(1, &a), (2, &b), (3, &c)] {
        issue(replica, coupon, user).await.expect("issuable before");
    }

    // Every replica keeps issuing to new users while the window is ended through A; each call
    // is stamped with when it was sent.
    let next_user = AtomicI64::new(100);
    let stop = AtomicBool::new(false);
    let ended_at = std::sync::Mutex::new(None::<Instant>);
    let (from_a, from_b, from_c, ()) = tokio::join!(
        issue_until_stopped(&a, coupon, &next_user, &stop),
        issue_until_stopped(&b, coupon, &next_user, &stop),
        issue_until_stopped(&c, coupon, &next_user, &stop),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = Utc::now();
            let ended = update(
                &a,
                UpdateCouponRequest {
                    coupon_id: coupon,
                    issue_ends_at: Some(Timestamp {
                        seconds: now.timestamp(),
                        nanos: now.timestamp_subsec_nanos() as i32,
                    }),
                    ..Default::default()
                },
            )
            .await
            .expect("window ended");
            *ended_at.lock().unwrap() = Some(Instant::now());
            assert_eq!(ended.issue_ends_at.unwrap().seconds, now.timestamp());
            tokio::time::sleep(Duration::from_millis(400)).await;
            stop.store(true, Ordering::SeqCst);
        }
    );
    let ended_at = ended_at.lock().unwrap().expect("ended");
    let accepted: Vec<_> = from_a.into_iter().chain(from_b).chain(from_c).collect();
    assert!(
        accepted.iter().any(|sent| *sent < ended_at),
        "no issue was accepted before the end: the test proves nothing"
    );
    let last = accepted.iter().max().expect("accepted");
    eprintln!(
        "{} issues accepted on three replicas; the last sent {:?} before the end answered",
        accepted.len(),
        ended_at.saturating_duration_since(*last)
    );
    let late: Vec<_> = accepted
        .iter()
        .filter(|sent| **sent >= ended_at + Duration::from_millis(100))
        .collect();
    assert!(late.is_empty(), "issued after the window ended: {late:?}");

    // And a moment later, on each replica, for a user who never asked.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for replica in [&a, &b, &c] {
        assert_error(
            issue(replica, coupon, 999_999).await,
            Code::FailedPrecondition,
            "COUPON_NOT_ISSUABLE",
        );
    }
    for app in [a, b, c] {
        app.stop().await;
    }
}

#[sqlx::test(migrations = false)]
async fn lowering_the_total_stops_at_the_coupons_issued(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, |_| {}).await;
    let coupon = create_coupon(&app, 10).await;
    let (won, _) = stampede(&app, coupon, 1..=8).await;
    assert_eq!(won.len(), 8);
    // Seats 1 and 2 become free (their coupons gone, as if never issued) and the gate is
    // rebuilt: the six coupons left hold seats 3..=8.
    sqlx::query("DELETE FROM user_coupons WHERE coupon_id = $1 AND seat <= 2")
        .bind(coupon)
        .execute(&app.pg)
        .await
        .unwrap();
    delete_keys(&app.redis, &app.redis_prefix).await;

    let refused = assert_error(
        update(&app, new_total(coupon, 5)).await,
        Code::FailedPrecondition,
        "COUPON_QUANTITY_BELOW_ISSUED",
    );
    let info = refused.get_details_error_info().unwrap();
    assert_eq!(info.metadata.get("issued").map(String::as_str), Some("6"));
    assert_eq!(issued_count(&app, coupon).await, 6);

    let lowered = update(&app, new_total(coupon, 6))
        .await
        .expect("lowered to issued");
    assert_eq!(
        (
            lowered.total_quantity,
            lowered.issued_quantity,
            lowered.remaining_quantity
        ),
        (6, 6, 0)
    );
    // The coupons on seats 7 and 8 moved to the free seats 1 and 2.
    assert_seats_within(&app, coupon, 6).await;
    assert_eq!(stampede(&app, coupon, 100..=120).await.0.len(), 0);
    assert!(
        gate_agrees(&app, coupon, 6).await,
        "{:?}",
        gate_state(&app, coupon).await
    );

    // Raised again: exactly the two new seats.
    update(&app, new_total(coupon, 8)).await.expect("raised");
    let (won, refused) = stampede(&app, coupon, 200..=230).await;
    assert_eq!(won.len(), 2);
    only_sold_out(&refused);
    assert_seats_within(&app, coupon, 8).await;
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn list_coupons_pages_by_id_with_issued_and_remaining_seats(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app_with(db, |_| {}).await;
    let mut expected = Vec::new();
    for (i, total) in [3_i64, 5, 1, 7, 2].into_iter().enumerate() {
        let coupon = create_coupon(&app, total).await;
        let issued = (i as i64).min(total);
        let users = 1..=issued;
        assert_eq!(stampede(&app, coupon, users).await.0.len() as i64, issued);
        expected.push((coupon, total, issued));
    }
    let renamed = update(
        &app,
        UpdateCouponRequest {
            coupon_id: expected[1].0,
            name: Some("renamed".into()),
            ..Default::default()
        },
    )
    .await
    .expect("renamed");
    assert_eq!(renamed.terms.unwrap().name, "renamed");

    let mut listed = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = app
            .admin()
            .list_coupons(ListCouponsRequest {
                page_size: 2,
                page_token: token,
            })
            .await
            .expect("a page")
            .into_inner();
        pages += 1;
        assert!(page.coupons.len() <= 2);
        listed.extend(page.coupons);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let seen: Vec<(i64, i64, i64)> = listed
        .iter()
        .map(|c| (c.id, c.total_quantity, c.issued_quantity))
        .collect();
    assert_eq!(seen, expected, "by id, each with its seats issued");
    for c in &listed {
        assert_eq!(c.remaining_quantity, c.total_quantity - c.issued_quantity);
        assert!(c.issue_starts_at.is_some() && c.issue_ends_at.is_some());
    }
    assert_eq!(listed[1].terms.as_ref().unwrap().name, "renamed");

    assert_error(
        app.admin()
            .list_coupons(ListCouponsRequest {
                page_size: 2,
                page_token: "not a token".into(),
            })
            .await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    assert_error(
        app.admin_with_token(None)
            .list_coupons(ListCouponsRequest::default())
            .await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn update_coupon_refuses_what_it_cannot_apply(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, |_| {}).await;
    let coupon = create_coupon(&app, 10).await;
    let field = |status: Status| {
        status
            .get_details_error_info()
            .and_then(|i| i.metadata.get("field").cloned())
            .unwrap_or_default()
    };
    for (request, want) in [
        (new_total(coupon, -1), "total_quantity"),
        (new_total(coupon, 0), "total_quantity"),
        (new_total(coupon, 1_000_001), "total_quantity"),
        (new_total(0, 5), "coupon_id"),
        (
            UpdateCouponRequest {
                coupon_id: coupon,
                name: Some(" ".into()),
                ..Default::default()
            },
            "name",
        ),
        (
            UpdateCouponRequest {
                coupon_id: coupon,
                // Before the window starts (a minute ago).
                issue_ends_at: Some(Timestamp {
                    seconds: Utc::now().timestamp() - 3_600,
                    nanos: 0,
                }),
                ..Default::default()
            },
            "issue_ends_at",
        ),
    ] {
        let status = assert_error(
            update(&app, request).await,
            Code::InvalidArgument,
            "INVALID_FIELD",
        );
        assert_eq!(field(status), want);
    }
    assert_error(
        update(&app, new_total(coupon + 1_000, 5)).await,
        Code::NotFound,
        "COUPON_NOT_FOUND",
    );
    assert_error(
        app.admin_with_token(None)
            .update_coupon(new_total(coupon, 20))
            .await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    assert_error(
        app.admin_with_token(Some("wrong"))
            .update_coupon(new_total(coupon, 20))
            .await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    // Nothing above changed the coupon.
    let listed = app
        .admin()
        .list_coupons(ListCouponsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .coupons;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].total_quantity, listed[0].issued_quantity),
        (10, 0)
    );
    assert_ne!(listed[0].terms.as_ref().unwrap().name, " ");
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_keyed_update_applies_once_and_a_reused_key_is_refused(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app_with(db, |_| {}).await;
    let coupon = create_coupon(&app, 10).await;
    let keyed = |total: i64, key: &str| UpdateCouponRequest {
        idempotency_key: key.into(),
        ..new_total(coupon, total)
    };
    let first = update(&app, keyed(20, "raise-1")).await.expect("raised");
    assert_eq!(first.total_quantity, 20);
    let (won, _) = stampede(&app, coupon, 1..=3).await;
    assert_eq!(won.len(), 3);
    // Another change, then the first one's retry: it applies nothing and answers the coupon
    // as it is now.
    update(&app, keyed(25, "raise-2"))
        .await
        .expect("raised again");
    let replay = update(&app, keyed(20, "raise-1")).await.expect("replayed");
    assert_eq!(
        (
            replay.total_quantity,
            replay.issued_quantity,
            replay.remaining_quantity
        ),
        (25, 3, 22)
    );
    assert_error(
        update(&app, keyed(30, "raise-1")).await,
        Code::InvalidArgument,
        "IDEMPOTENCY_KEY_REUSED",
    );
    // A refused lowering claims nothing: the key can carry a valid change afterwards.
    assert_error(
        update(&app, keyed(2, "lower-1")).await,
        Code::FailedPrecondition,
        "COUPON_QUANTITY_BELOW_ISSUED",
    );
    let lowered = update(&app, keyed(3, "lower-1")).await.expect("lowered");
    assert_eq!((lowered.total_quantity, lowered.remaining_quantity), (3, 0));
    assert!(
        gate_agrees(&app, coupon, 3).await,
        "{:?}",
        gate_state(&app, coupon).await
    );
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_gate_left_on_the_old_terms_is_repaired_by_the_reconciliation_job(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app_with(db, |s| {
        s.set("COUPON_RECONCILE_INTERVAL_SECS", 1);
    })
    .await;
    let coupon = create_coupon(&app, 10).await;
    assert_eq!(stampede(&app, coupon, 1..=4).await.0.len(), 4);
    update(&app, new_total(coupon, 20)).await.expect("raised");
    // As if the raise's gate step had been cut after the commit: the gate on the old total.
    let state = format!("{}coupon:{{{coupon}}}:state", app.redis_prefix);
    let _: i64 = fred::interfaces::HashesInterface::hset(&app.redis, &state, ("total", 10))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || gate_agrees(&app, coupon, 20)).await,
        "{:?}",
        gate_state(&app, coupon).await
    );
    let (won, refused) = stampede(&app, coupon, 100..=130).await;
    assert_eq!(won.len(), 16);
    only_sold_out(&refused);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn the_same_change_sent_again_finishes_a_gate_step_that_was_cut(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    // The reconciliation job (every 30 s by default) does not run during this test.
    let app = spawn_app_with(db, |_| {}).await;
    let coupon = create_coupon(&app, 10).await;
    update(&app, new_total(coupon, 20)).await.expect("raised");
    let state = format!("{}coupon:{{{coupon}}}:state", app.redis_prefix);
    let _: i64 = fred::interfaces::HashesInterface::hset(&app.redis, &state, ("total", 10))
        .await
        .unwrap();
    assert!(!gate_agrees(&app, coupon, 20).await);
    // Postgres already has 20: the request changes nothing there, and sets the gate again.
    update(&app, new_total(coupon, 20))
        .await
        .expect("sent again");
    assert!(
        gate_agrees(&app, coupon, 20).await,
        "{:?}",
        gate_state(&app, coupon).await
    );
    app.stop().await;
}
