//! Short runs of every load generator scenario against a test server, through the library API
//! the binary uses. Each asserts that the invariants hold, that the outcome counts add up to the
//! calls made, and cross-checks a figure or two against Postgres directly.

use std::time::Duration;

use ecommerce::proto::ChargeBalanceRequest;
use ecommerce_loadgen::{self as loadgen, Listing, Mixed, Options, Report, Scenario};
use futures::StreamExt;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{
    ADMIN_TOKEN, TestApp,
    shop::{create_product, place},
    spawn_app,
};

fn options(app: &TestApp, db: &PgConnectOptions) -> Options {
    let mut options = Options::new(format!("http://{}", app.addr));
    options.admin_token = Some(ADMIN_TOKEN.into());
    options.concurrency = 16;
    options.seed = 42;
    options.database = Some(db.clone());
    options
}

/// Passed, and every RPC's outcome counts add up to its calls.
#[track_caller]
fn assert_sound(report: &Report) {
    assert!(report.passed, "{}", report.to_table());
    for rpc in &report.rpcs {
        let counted: u64 = rpc.outcomes.iter().map(|o| o.count).sum();
        assert_eq!(counted, rpc.calls, "{} outcomes vs calls", rpc.rpc);
        // The report's plots: the seconds hold every measured call, outcome by outcome.
        let per_second: u64 = rpc.per_second.iter().map(|s| s.calls).sum();
        assert_eq!(per_second, rpc.calls, "{} seconds vs calls", rpc.rpc);
        for o in &rpc.outcomes {
            let over_seconds: u64 = rpc
                .per_second
                .iter()
                .filter_map(|s| s.outcomes.get(&o.outcome))
                .sum();
            assert_eq!(over_seconds, o.count, "{} {} by second", rpc.rpc, o.outcome);
        }
    }
    assert_eq!(report.warmup_calls, 0);
}

/// The run is refused before it starts, saying `why`.
async fn assert_refused(options: &Options, scenario: &Scenario, why: &str) {
    let Err(refused) = loadgen::run(options, scenario).await else {
        panic!("{scenario:?} should be refused");
    };
    let message = format!("{refused:#}");
    assert!(message.contains(why), "{message}");
}

fn calls(report: &Report, rpc: &str) -> u64 {
    report.rpc(rpc).map_or(0, |r| r.calls)
}

fn count(report: &Report, rpc: &str, outcome: &str) -> u64 {
    report
        .rpc(rpc)
        .and_then(|r| r.outcomes.iter().find(|o| o.outcome == outcome))
        .map_or(0, |o| o.count)
}

#[sqlx::test(migrations = false)]
async fn coupon_stampede_issues_exactly_the_stock(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db.clone()).await;
    let report = loadgen::run(
        &options(&app, &db),
        &Scenario::CouponStampede {
            users: 300,
            stock: 30,
        },
    )
    .await
    .expect("the run happens");
    assert_sound(&report);
    assert_eq!(report.units_of_work, 300);
    assert_eq!(calls(&report, "IssueCoupon"), 300);
    assert_eq!(count(&report, "IssueCoupon", "OK"), 30);
    assert_eq!(
        count(&report, "IssueCoupon", "RESOURCE_EXHAUSTED/COUPON_SOLD_OUT"),
        270
    );
    // The Postgres checks ran too.
    assert!(
        report
            .invariants
            .iter()
            .any(|c| c.name.contains("(Postgres)")),
        "{}",
        report.to_table()
    );
    let coupon_id = report.fixtures["coupon_id"];
    let issued: i64 = sqlx::query_scalar("SELECT count(*) FROM user_coupons WHERE coupon_id = $1")
        .bind(coupon_id)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(issued, 30);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn charges_credit_once_per_key(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db.clone()).await;
    let mut options = options(&app, &db);
    options.requests = Some(400);
    let report = loadgen::run(&options, &Scenario::Charge { users: 50 })
        .await
        .expect("the run happens");
    assert_sound(&report);
    let fresh = calls(&report, "ChargeBalance");
    let replays = calls(&report, "ChargeBalance (same key)");
    assert_eq!(fresh + replays, 400);
    assert!(replays > 0, "some keys were sent twice");
    assert_eq!(count(&report, "ChargeBalance", "OK"), fresh);
    assert_eq!(count(&report, "ChargeBalance (same key)", "OK"), replays);
    // A replay writes no ledger entry: one entry per first-time charge.
    let base = report.fixtures["user_id_base"];
    let entries: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM balance_history WHERE user_id > $1 AND user_id <= $1 + 50",
    )
    .bind(base)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(entries as u64, fresh);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_balance_changed_behind_the_runs_back_is_reported(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db.clone()).await;
    let mut options = options(&app, &db);
    options.duration = Some(Duration::from_millis(1500));
    options.database = None;
    let run = loadgen::run(&options, &Scenario::Charge { users: 20 });
    let meddle = async {
        // Once the run has charged someone in its block, credit that user 777 more.
        let user = loop {
            let user: Option<i64> = sqlx::query_scalar(
                "SELECT user_id FROM balance_history WHERE user_id > 4294967296 LIMIT 1",
            )
            .fetch_optional(&app.pg)
            .await
            .unwrap();
            if let Some(user) = user {
                break user;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        app.balance()
            .charge_balance(ChargeBalanceRequest {
                user_id: user,
                amount: 777,
                idempotency_key: String::new(),
            })
            .await
            .expect("charge behind the run's back");
        user
    };
    let (report, user) = tokio::join!(run, meddle);
    let report = report.expect("the run happens");
    assert!(!report.passed, "{}", report.to_table());
    let broken: Vec<_> = report.violations().collect();
    assert_eq!(broken.len(), 1, "{}", report.to_table());
    assert!(
        broken[0].detail.contains(&format!("user {user}: expected")),
        "{:?}",
        broken[0]
    );
    assert!(broken[0].detail.contains("(+777)"), "{:?}", broken[0]);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn hot_product_never_oversells(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db.clone()).await;
    let report = loadgen::run(
        &options(&app, &db),
        &Scenario::HotProduct {
            stock: 30,
            buyers: 10,
            orders_per_buyer: Some(30),
        },
    )
    .await
    .expect("the run happens");
    assert_sound(&report);
    // Stock + 100 extra orders by default.
    assert_eq!(report.units_of_work, 130);
    assert_eq!(calls(&report, "PlaceOrder"), 130);
    assert_eq!(count(&report, "PlaceOrder", "OK"), 30);
    assert_eq!(count(&report, "Pay", "OK"), 30);
    let stock: i64 = sqlx::query_scalar("SELECT stock FROM products WHERE id = $1")
        .bind(report.fixtures["product_id"])
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(stock, 0);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn cart_checkouts_never_oversell_and_one_key_is_one_order(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db.clone()).await;
    let report = loadgen::run(
        &options(&app, &db),
        &Scenario::Cart {
            stock: 200,
            buyers: 10,
            orders_per_buyer: Some(30),
        },
    )
    .await
    .expect("the run happens");
    assert_sound(&report);
    // stock/2 + 100 checkouts by default, each after one SetItem; about 100 are placed, and
    // one in ten of those sent again with its key (none at all: a chance of 0.9^100).
    assert_eq!(report.units_of_work, 200);
    assert_eq!(calls(&report, "SetItem"), 200);
    assert_eq!(calls(&report, "Checkout"), 200);
    assert!(calls(&report, "Checkout (same key)") > 0);
    assert!(
        report
            .invariants
            .iter()
            .any(|c| c.name.contains("same order"))
    );
    let stock: i64 = sqlx::query_scalar("SELECT stock FROM products WHERE id = $1")
        .bind(report.fixtures["product_id"])
        .fetch_one(&app.pg)
        .await
        .unwrap();
    let ordered: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(quantity), 0)::bigint FROM order_items")
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!(stock + ordered, 200);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn popular_answers_are_well_formed(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db.clone()).await;
    let mut options = options(&app, &db);
    options.requests = Some(200);
    let report = loadgen::run(&options, &Scenario::Popular { days: 3, limit: 5 })
        .await
        .expect("the run happens");
    assert_sound(&report);
    assert_eq!(calls(&report, "GetPopularProducts"), 200);
    assert_eq!(count(&report, "GetPopularProducts", "OK"), 200);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_mixed_run_keeps_every_invariant(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db.clone()).await;
    let mut options = options(&app, &db);
    options.requests = Some(600);
    let report = loadgen::run(
        &options,
        &Scenario::Mixed(Mixed {
            coupon_stock: 20,
            stock: 50,
            buyers: 10,
            orders_per_buyer: Some(60),
            ..Mixed::default()
        }),
    )
    .await
    .expect("the run happens");
    assert_sound(&report);
    let total: u64 = report
        .rpcs
        .iter()
        .filter(|r| r.rpc != "Pay (repeat)")
        .map(|r| r.calls)
        .sum();
    assert_eq!(total, 600, "one call per unit of work, repeats aside");
    assert!(count(&report, "IssueCoupon", "OK") <= 20);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn health_checks_answer_serving_within_the_measured_span(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db.clone()).await;
    // The floor is measured on a ready server, as scripts/bench measures it: until its first
    // round of dependency pings the server rightly answers NOT_SERVING, and on a loaded machine
    // that round can outlast the run's first calls.
    assert!(
        app.becomes("", ServingStatus::Serving, Duration::from_secs(10))
            .await
    );
    let mut options = options(&app, &db);
    options.requests = Some(300);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let report = loadgen::run(&options, &Scenario::Health)
        .await
        .expect("the run happens");
    assert_sound(&report);
    assert_eq!(calls(&report, "Health/Check"), 300);
    assert_eq!(count(&report, "Health/Check", "OK"), 300);
    assert!(
        report
            .invariants
            .iter()
            .any(|c| c.name.contains("SERVING") && c.passed)
    );
    // The wall-clock span scripts/bench charges with the server's CPU.
    let (from, until) = (
        report.measured_from_unix_secs,
        report.measured_until_unix_secs,
    );
    assert!(before <= from && from <= until, "{before} {from} {until}");
    assert!((until - from - report.measured_secs).abs() < 1e-3);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_holder_asking_again_is_told_its_own_coupon_and_takes_no_seat(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db.clone()).await;
    let mut options = options(&app, &db);
    options.requests = Some(400);
    let report = loadgen::run(&options, &Scenario::CouponRepeat { holders: 40 })
        .await
        .expect("the run happens");
    assert_sound(&report);
    assert_eq!(report.fixtures["holders"], 40);
    assert_eq!(calls(&report, "IssueCoupon (holder)"), 400);
    assert_eq!(
        count(
            &report,
            "IssueCoupon (holder)",
            "ALREADY_EXISTS/COUPON_ALREADY_ISSUED"
        ),
        400
    );
    assert!(
        report
            .invariants
            .iter()
            .any(|c| c.name.contains("naming its own coupon") && c.passed),
        "{}",
        report.to_table()
    );
    let issued: i64 = sqlx::query_scalar("SELECT count(*) FROM user_coupons WHERE coupon_id = $1")
        .bind(report.fixtures["coupon_id"])
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(issued, 40);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn list_orders_walks_a_buyers_history_and_needs_it_first(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db.clone()).await;
    let product = create_product(&app, "postcard", 0, 10_000).await;
    let app_ref = &app;
    let placed: Vec<_> = futures::stream::iter(0..120)
        .map(|_| async move { place(app_ref, 77, &[(product, 1)]).await })
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(placed.iter().all(Result::is_ok));
    let listing = Listing {
        user_id: 77,
        min_orders: 120,
        page_size: 10,
    };
    let mut options = options(&app, &db);
    options.concurrency = 8;
    options.requests = Some(300);
    let report = loadgen::run(&options, &Scenario::ListOrders(listing))
        .await
        .expect("the run happens");
    assert_sound(&report);
    assert_eq!(calls(&report, "ListOrders"), 300);
    assert_eq!(count(&report, "ListOrders", "OK"), 300);
    assert_eq!(report.fixtures.get("orders_of_listed_user"), Some(&120));
    let pages = report
        .invariants
        .iter()
        .find(|c| c.name.contains("ListOrders page"))
        .expect("the page check");
    assert!(pages.passed, "{pages:?}");

    let short = Listing {
        min_orders: 121,
        ..listing
    };
    assert_refused(
        &options,
        &Scenario::ListOrders(short),
        "scripts/seed-orders",
    )
    .await;
    app.stop().await;
}

/// Eight buyers: each has several orders in flight at once, so lists are shared and refunds of one
/// buyer's orders race for the same balance row.
const LIFECYCLE: Scenario = Scenario::Lifecycle {
    stock: 1_000,
    buyers: 8,
};

#[sqlx::test(migrations = false)]
async fn a_lifecycle_run_keeps_money_stock_and_events_in_step(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db.clone()).await;
    let mut options = options(&app, &db);
    options.requests = Some(150);
    let report = loadgen::run(&options, &LIFECYCLE)
        .await
        .expect("the run happens");
    assert_sound(&report);
    assert_eq!(report.units_of_work, 150);
    assert_eq!(count(&report, "PlaceOrder", "OK"), 150);
    for rpc in ["Pay", "CancelOrder", "RefundOrder", "ListOrders"] {
        assert!(
            count(&report, rpc, "OK") > 0,
            "{rpc}: {}",
            report.to_table()
        );
    }
    for check in [
        "outbox event per transition",
        "initial stock",
        "REFUND entries",
    ] {
        assert!(
            report
                .invariants
                .iter()
                .any(|c| c.name.contains(check) && c.passed),
            "{check}: {}",
            report.to_table()
        );
    }
    // Cross-checked directly: one event per placement, payment, cancel and refund.
    let (transitions, events): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders) + (SELECT count(*) FROM payments)
              + (SELECT count(*) FROM orders WHERE status = 'CANCELLED')
              + (SELECT count(*) FROM refunds),
                (SELECT count(*) FROM outbox_events)",
    )
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(events, transitions);
    assert_eq!(report.fixtures["outbox_events"], events);

    options.database = None;
    assert_refused(&options, &LIFECYCLE, "--database-url").await;
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_lifecycle_run_reports_an_event_lost_behind_its_back(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db.clone()).await;
    let mut options = options(&app, &db);
    options.requests = Some(120);
    let run = loadgen::run(&options, &LIFECYCLE);
    let meddle = async {
        // Once a refund's event is written, delete it.
        loop {
            let order: Option<i64> = sqlx::query_scalar(
                "DELETE FROM outbox_events WHERE id = (
                     SELECT min(id) FROM outbox_events WHERE event_type = 'OrderRefunded')
                 RETURNING order_id",
            )
            .fetch_optional(&app.pg)
            .await
            .unwrap();
            if let Some(order) = order {
                break order;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (report, order) = tokio::join!(run, meddle);
    let report = report.expect("the run happens");
    assert!(!report.passed, "{}", report.to_table());
    let broken: Vec<_> = report.violations().collect();
    assert_eq!(broken.len(), 1, "{}", report.to_table());
    assert!(broken[0].name.contains("one outbox event per transition"));
    assert!(
        broken[0].detail.starts_with("1 of ")
            && broken[0].detail.contains(&format!("order {order} (")),
        "{:?}",
        broken[0]
    );
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn pay_only_pays_each_prepared_order_once(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db.clone()).await;
    let report = loadgen::run(
        &options(&app, &db),
        &Scenario::PayOnly {
            orders: 60,
            buyers: 7,
        },
    )
    .await
    .expect("the run happens");
    assert_sound(&report);
    // The orders were placed during the set-up: the run made Pays only, each once.
    assert_eq!(report.units_of_work, 60);
    assert_eq!(report.fixtures["prepared_orders"], 60);
    assert_eq!(calls(&report, "PlaceOrder"), 0);
    assert_eq!(calls(&report, "Pay (repeat)"), 0);
    assert_eq!(count(&report, "Pay", "OK"), 60);
    assert!(
        report
            .invariants
            .iter()
            .any(|c| c.name.contains("payments rows")),
        "the payments are counted in Postgres"
    );
    let (orders, paid, payments, stock): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT o.id), count(DISTINCT o.id) FILTER (WHERE o.status = 'PAID'), \
                (SELECT count(*) FROM payments p JOIN order_items i USING (order_id) \
                 WHERE i.product_id = $1), \
                (SELECT stock FROM products WHERE id = $1) \
         FROM orders o JOIN order_items i ON i.order_id = o.id WHERE i.product_id = $1",
    )
    .bind(report.fixtures["product_id"])
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!((orders, paid, payments, stock), (60, 60, 60, 0));
    app.stop().await;
}
