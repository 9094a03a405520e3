//! Issuing coupons under contention: exactly as many winners as seats, one coupon per user, every
//! win durable in Postgres; a Redis gate that is wiped, refused an insert or left an orphaned win
//! is repaired without ever over-issuing. Also the issue window, validation and the user's list.

mod repeats;

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use chrono::Utc;
use ecommerce::proto::{
    CreateCouponRequest, Discount, GetCouponRequest, ListUserCouponsRequest, PercentDiscount,
    UserCouponStatus, discount,
};
use fred::interfaces::{HashesInterface, SortedSetsInterface};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::support::{
    assert_error,
    coupons::{
        coupon_request, create_coupon, create_coupon_with, fixed, gate_agrees, gate_state, issue,
        issued_in_postgres, remaining, sold_out, stampede, ts,
    },
    delete_keys, eventually, invalid_field, reason, spawn_app, spawn_app_with,
};

#[sqlx::test(migrations = false)]
async fn thousand_users_share_a_hundred_coupons(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let coupon = create_coupon(&app, 100).await;
    let (mut winners, refusals) = stampede(&app, coupon, 1..=1000).await;

    assert_eq!(winners.len(), 100);
    assert_eq!(refusals, HashMap::from([(sold_out(), 900)]));
    winners.sort_unstable();
    assert_eq!(
        issued_in_postgres(&app, coupon).await,
        winners,
        "every winner is durable"
    );
    assert_eq!(remaining(&app, coupon).await, 0);
    let distinct: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT user_id) FROM user_coupons WHERE coupon_id = $1")
            .bind(coupon)
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!(distinct, 100);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn one_user_asking_fifty_times_gets_one(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let coupon = create_coupon(&app, 10).await;
    let (winners, refusals) = stampede(&app, coupon, std::iter::repeat_n(77, 50)).await;
    assert_eq!(winners, vec![77]);
    assert_eq!(
        refusals,
        HashMap::from([(
            (Code::AlreadyExists, "COUPON_ALREADY_ISSUED".to_string()),
            49
        )])
    );
    assert_eq!(issued_in_postgres(&app, coupon).await, vec![77]);
    assert_eq!(remaining(&app, coupon).await, 9);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_single_coupon_has_a_single_winner(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let coupon = create_coupon(&app, 1).await;
    let (winners, refusals) = stampede(&app, coupon, 1..=200).await;
    assert_eq!(winners.len(), 1);
    assert_eq!(refusals, HashMap::from([(sold_out(), 199)]));
    assert_eq!(issued_in_postgres(&app, coupon).await, winners);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn two_stampedes_at_once_do_not_interfere(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let first = create_coupon(&app, 50).await;
    let second = create_coupon(&app, 30).await;
    let ((a, _), (b, _)) = tokio::join!(
        stampede(&app, first, 1..=300),
        stampede(&app, second, 1..=300)
    );
    assert_eq!((a.len(), b.len()), (50, 30));
    assert_eq!(issued_in_postgres(&app, first).await.len(), 50);
    assert_eq!(issued_in_postgres(&app, second).await.len(), 30);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn redis_forgetting_mid_stampede_never_over_issues(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, |s| {
        s.set("COUPON_RECONCILE_INTERVAL_SECS", 1)
            .set("COUPON_ORPHAN_GRACE_MS", 500);
    })
    .await;
    let coupon = create_coupon(&app, 300).await;
    // 2,000 users in ten waves of 200 concurrent requests. During the second wave every key of
    // this test is lost, as a Redis restart without persistence would lose it.
    let mut winners = Vec::new();
    let mut refusals: HashMap<(Code, String), usize> = HashMap::new();
    let mut wiped = 0;
    for wave in 0..10_i64 {
        let users = wave * 200 + 1..=wave * 200 + 200;
        let ((won, refused), deleted) = tokio::join!(stampede(&app, coupon, users), async {
            if wave == 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                delete_keys(&app.redis, &app.redis_prefix).await
            } else {
                0
            }
        });
        winners.extend(won);
        for (k, v) in refused {
            *refusals.entry(k).or_default() += v;
        }
        wiped += deleted;
    }
    assert!(wiped > 0, "the gate was loaded when it was wiped");

    let in_pg = issued_in_postgres(&app, coupon).await;
    assert!(in_pg.len() <= 300, "over-issued: {}", in_pg.len());
    let winners: HashSet<i64> = winners.into_iter().collect();
    assert!(
        winners.iter().all(|w| in_pg.contains(w)),
        "every success is recorded in Postgres"
    );
    for code_reason in refusals.keys() {
        assert!(
            [
                sold_out(),
                (Code::AlreadyExists, "COUPON_ALREADY_ISSUED".to_string()),
                (Code::Unavailable, "DEPENDENCY_UNAVAILABLE".to_string()),
            ]
            .contains(code_reason),
            "unexpected refusal {code_reason:?}"
        );
    }

    // The reconciliation job brings the gate back in line with Postgres.
    assert!(
        eventually(Duration::from_secs(15), || gate_agrees(&app, coupon, 300)).await,
        "gate {:?} vs {} in Postgres",
        gate_state(&app, coupon).await,
        in_pg.len()
    );
    // Issuing resumes: new users get what is left, and never more.
    let left = 300 - in_pg.len();
    let (more, _) = stampede(&app, coupon, 5001..=5000 + left as i64 + 20).await;
    assert_eq!(more.len(), left);
    assert_eq!(issued_in_postgres(&app, coupon).await.len(), 300);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_failed_insert_gives_the_seat_back(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let coupon = create_coupon(&app, 1).await;
    // The database refuses user 666's coupon as a full disk would.
    sqlx::raw_sql(
        "CREATE FUNCTION fail_user_666() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.user_id = 666 THEN
                 RAISE EXCEPTION 'disk full' USING ERRCODE = 'disk_full';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER fail_user_666 BEFORE INSERT ON user_coupons
             FOR EACH ROW EXECUTE FUNCTION fail_user_666();",
    )
    .execute(&app.pg)
    .await
    .unwrap();

    let failed = issue(&app, coupon, 666).await;
    assert_error(failed, Code::Unavailable, "DEPENDENCY_UNAVAILABLE");
    assert!(issued_in_postgres(&app, coupon).await.is_empty());
    assert!(
        gate_agrees(&app, coupon, 1).await,
        "the seat is back and 666 holds nothing"
    );

    issue(&app, coupon, 1)
        .await
        .expect("the only seat is still there");
    assert_error(
        issue(&app, coupon, 2).await,
        Code::ResourceExhausted,
        "COUPON_SOLD_OUT",
    );
    sqlx::raw_sql("DROP TRIGGER fail_user_666 ON user_coupons")
        .execute(&app.pg)
        .await
        .unwrap();
    assert_error(
        issue(&app, coupon, 666).await,
        Code::ResourceExhausted,
        "COUPON_SOLD_OUT",
    );
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_crash_between_gate_and_insert_is_repaired(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, |s| {
        s.set("COUPON_RECONCILE_INTERVAL_SECS", 1)
            .set("COUPON_ORPHAN_GRACE_MS", 500);
    })
    .await;
    let coupon = create_coupon(&app, 2).await;
    issue(&app, coupon, 1)
        .await
        .expect("loads the gate and takes seat 1");

    // What a replica that died right after winning seat 2 for user 99 leaves behind: the seat
    // taken, the holder, and its win pending (never confirmed in Postgres).
    let state = format!("{}coupon:{{{coupon}}}:state", app.redis_prefix);
    let holders = format!("{}coupon:{{{coupon}}}:holders", app.redis_prefix);
    let pending = format!("{}coupon:{{{coupon}}}:pending", app.redis_prefix);
    let won_a_minute_ago = Utc::now().timestamp_millis() - 60_000;
    let _: i64 = app.redis.hincrby(&state, "next", 1).await.unwrap();
    let _: i64 = app
        .redis
        .hset(&holders, ("99", format!("2:{won_a_minute_ago}")))
        .await
        .unwrap();
    let _: i64 = app
        .redis
        .zadd(
            &pending,
            None,
            None,
            false,
            false,
            (won_a_minute_ago as f64, "99"),
        )
        .await
        .unwrap();
    // Until the repair, the lost seat looks taken. The job may already have repaired it.
    if let Err(status) = issue(&app, coupon, 2).await {
        assert_eq!(reason(&status), sold_out());
        assert!(
            eventually(Duration::from_secs(10), || gate_agrees(&app, coupon, 2)).await,
            "the job repairs the gate"
        );
        issue(&app, coupon, 2)
            .await
            .expect("the repaired seat is issuable");
    }
    assert_eq!(issued_in_postgres(&app, coupon).await, vec![1, 2]);
    assert_error(
        issue(&app, coupon, 99).await,
        Code::ResourceExhausted,
        "COUPON_SOLD_OUT",
    );
    // The orphan was released (by the job, or by user 2's call that found no seat), not
    // repaired by rebuilding the gate.
    assert_eq!(
        app.gate_stats.rebuilds(ecommerce::RepairReason::Disagrees),
        0
    );
    assert!(app.gate_stats.rebuilds(ecommerce::RepairReason::Orphan) >= 1);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_retry_releases_its_own_orphaned_win(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, |s| {
        s.set("COUPON_ORPHAN_GRACE_MS", 200);
    })
    .await;
    let coupon = create_coupon(&app, 1).await;
    // User 7 won the only seat a minute ago on a replica that died before the insert.
    let state = format!("{}coupon:{{{coupon}}}:state", app.redis_prefix);
    let holders = format!("{}coupon:{{{coupon}}}:holders", app.redis_prefix);
    let pending = format!("{}coupon:{{{coupon}}}:pending", app.redis_prefix);
    let won = Utc::now().timestamp_millis() - 60_000;
    let _: i64 = app.redis.hincrby(&state, "next", 1).await.unwrap();
    let _: i64 = app
        .redis
        .hset(&holders, ("7", format!("1:{won}")))
        .await
        .unwrap();
    let _: i64 = app
        .redis
        .zadd(&pending, None, None, false, false, (won as f64, "7"))
        .await
        .unwrap();
    // Their retry is not told ALREADY_EXISTS (no coupon exists): it releases the orphan and
    // gets the seat.
    issue(&app, coupon, 7)
        .await
        .expect("the retry gets the coupon");
    assert_eq!(issued_in_postgres(&app, coupon).await, vec![7]);
    assert_eq!(app.gate_stats.orphans_released(), 1);
    assert!(gate_agrees(&app, coupon, 1).await);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn errors_and_issue_window(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let now = Utc::now();
    for _ in 0..2 {
        // The second time the answer comes from the cached "no such coupon".
        assert_error(
            issue(&app, 4242, 1).await,
            Code::NotFound,
            "COUPON_NOT_FOUND",
        );
    }
    let later = create_coupon_with(
        &app,
        CreateCouponRequest {
            issue_starts_at: ts(now + chrono::Duration::hours(1)),
            issue_ends_at: ts(now + chrono::Duration::hours(2)),
            ..coupon_request(5)
        },
    )
    .await;
    let over = create_coupon_with(
        &app,
        CreateCouponRequest {
            issue_starts_at: ts(now - chrono::Duration::hours(2)),
            issue_ends_at: ts(now - chrono::Duration::hours(1)),
            ..coupon_request(5)
        },
    )
    .await;
    for coupon in [later, over] {
        assert_error(
            issue(&app, coupon, 1).await,
            Code::FailedPrecondition,
            "COUPON_NOT_ISSUABLE",
        );
    }
    for (user, coupon, field) in [
        (0, later, "user_id"),
        (1, 0, "coupon_id"),
        (-1, -1, "user_id"),
    ] {
        let status = issue(&app, coupon, user).await.unwrap_err();
        assert_eq!(invalid_field(&status), field);
    }
    let missing = app
        .coupons()
        .get_coupon(GetCouponRequest { coupon_id: 999 })
        .await;
    assert_error(missing, Code::NotFound, "COUPON_NOT_FOUND");
    assert_eq!(remaining(&app, later).await, 5);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn user_coupons_list_with_status_and_terms(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let percent = create_coupon_with(
        &app,
        CreateCouponRequest {
            name: "10% off, up to 3,000".into(),
            discount: Some(Discount {
                kind: Some(discount::Kind::Percent(PercentDiscount {
                    percent: 10,
                    max_discount: 3_000,
                })),
            }),
            min_order_amount: 20_000,
            valid_days: 30,
            ..coupon_request(10)
        },
    )
    .await;
    let fixed_coupon = create_coupon(&app, 10).await;
    issue(&app, percent, 5).await.unwrap();
    let expired = issue(&app, fixed_coupon, 5).await.unwrap();
    sqlx::query("UPDATE user_coupons SET expires_at = now() - interval '1 day' WHERE id = $1")
        .bind(expired)
        .execute(&app.pg)
        .await
        .unwrap();

    let listed = app
        .coupons()
        .list_user_coupons(ListUserCouponsRequest {
            user_id: 5,
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.next_page_token.is_empty());
    let [newest, oldest] = listed.user_coupons.as_slice() else {
        panic!("two coupons expected: {listed:?}");
    };
    assert_eq!(newest.id, expired);
    assert_eq!(newest.status(), UserCouponStatus::Expired);
    assert_eq!(oldest.status(), UserCouponStatus::Available);
    let terms = oldest.terms.as_ref().unwrap();
    assert_eq!((terms.min_order_amount, terms.valid_days), (20_000, 30));
    let issued = oldest.issued_at.unwrap().seconds;
    let expires = oldest.expires_at.unwrap().seconds;
    assert_eq!(expires - issued, 30 * 86_400);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn create_coupon_validates_every_field(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let now = Utc::now();
    let percent = |percent, max_discount| {
        Some(Discount {
            kind: Some(discount::Kind::Percent(PercentDiscount {
                percent,
                max_discount,
            })),
        })
    };
    let base = coupon_request(10);
    let cases = [
        (
            CreateCouponRequest {
                name: String::new(),
                ..base.clone()
            },
            "name",
        ),
        (
            CreateCouponRequest {
                discount: None,
                ..base.clone()
            },
            "discount",
        ),
        (
            CreateCouponRequest {
                discount: Some(Discount { kind: None }),
                ..base.clone()
            },
            "discount",
        ),
        (
            CreateCouponRequest {
                discount: fixed(0),
                ..base.clone()
            },
            "discount.fixed.amount",
        ),
        (
            CreateCouponRequest {
                discount: percent(0, 0),
                ..base.clone()
            },
            "discount.percent.percent",
        ),
        (
            CreateCouponRequest {
                discount: percent(101, 0),
                ..base.clone()
            },
            "discount.percent.percent",
        ),
        (
            CreateCouponRequest {
                discount: percent(10, -1),
                ..base.clone()
            },
            "discount.percent.max_discount",
        ),
        (
            CreateCouponRequest {
                min_order_amount: -1,
                ..base.clone()
            },
            "min_order_amount",
        ),
        (
            CreateCouponRequest {
                total_quantity: 0,
                ..base.clone()
            },
            "total_quantity",
        ),
        (
            CreateCouponRequest {
                total_quantity: 1_000_001,
                ..base.clone()
            },
            "total_quantity",
        ),
        (
            CreateCouponRequest {
                issue_starts_at: None,
                ..base.clone()
            },
            "issue_starts_at",
        ),
        (
            CreateCouponRequest {
                issue_ends_at: None,
                ..base.clone()
            },
            "issue_ends_at",
        ),
        (
            CreateCouponRequest {
                issue_starts_at: ts(now),
                issue_ends_at: ts(now - chrono::Duration::seconds(1)),
                ..base.clone()
            },
            "issue_ends_at",
        ),
        (
            CreateCouponRequest {
                valid_days: 0,
                ..base.clone()
            },
            "valid_days",
        ),
        (
            CreateCouponRequest {
                valid_days: 3651,
                ..base.clone()
            },
            "valid_days",
        ),
    ];
    for (request, field) in cases {
        let status = app.admin().create_coupon(request).await.unwrap_err();
        assert_eq!(invalid_field(&status), field);
    }
    let unauthenticated = app.admin_with_token(None).create_coupon(base).await;
    assert_error(unauthenticated, Code::Unauthenticated, "UNAUTHENTICATED");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM coupons")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(count, 0);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn postgres_refuses_a_seat_beyond_the_total_in_a_multi_row_insert(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;
    let coupon = create_coupon(&app, 2).await;
    // Checked once per statement now, against every row the statement inserted.
    let refused = sqlx::query(
        "INSERT INTO user_coupons (coupon_id, user_id, seat, expires_at)
         SELECT $1, u, u, now() + interval '1 day' FROM generate_series(1, 3) u",
    )
    .bind(coupon)
    .execute(&app.pg)
    .await
    .unwrap_err();
    let refused = refused.as_database_error().expect("a database error");
    assert_eq!(refused.constraint(), Some("user_coupons_seat_within_total"));
    assert!(issued_in_postgres(&app, coupon).await.is_empty());
    sqlx::query(
        "INSERT INTO user_coupons (coupon_id, user_id, seat, expires_at)
         SELECT $1, u, u, now() + interval '1 day' FROM generate_series(1, 2) u",
    )
    .bind(coupon)
    .execute(&app.pg)
    .await
    .expect("seats within the total");
    assert_eq!(issued_in_postgres(&app, coupon).await.len(), 2);
    app.stop().await;
}
