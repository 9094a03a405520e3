use std::{collections::HashMap, time::Duration};

use ecommerce::proto::{GetPopularProductsRequest, PopularProduct};
use fred::interfaces::LuaInterface;
use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::support::{
    TestApp, delete_keys, eventually, invalid_field,
    metrics::{metrics_text, series_value},
    ranking::count_rebuilds,
    shop::{charge, create_product, pay, place},
    spawn_app, spawn_app_with,
};

/// Fast ranking job and a short cache, so tests see the job's work quickly.
fn fast_ranking(s: &mut crate::support::TestSettings) {
    s.set("RANKING_RECONCILE_INTERVAL_SECS", 1)
        .set("POPULAR_CACHE_TTL_MS", 20);
}

async fn popular(app: &TestApp, days: i32, limit: i32) -> Vec<(i64, i64)> {
    popular_items(app, days, limit)
        .await
        .into_iter()
        .map(|p| (p.product.unwrap().id, p.sold_quantity))
        .collect()
}

async fn popular_items(app: &TestApp, days: i32, limit: i32) -> Vec<PopularProduct> {
    app.products()
        .get_popular_products(GetPopularProductsRequest { days, limit })
        .await
        .expect("popular products")
        .into_inner()
        .items
}

/// Buys and pays `quantity` of `product` for `user`; returns the order id.
async fn buy(app: &TestApp, user: i64, product: i64, quantity: i32) -> i64 {
    charge(app, user, 100_000_000).await;
    let order = place(app, user, &[(product, quantity)]).await.unwrap();
    pay(app, user, order.id).await.unwrap();
    order.id
}

/// Moves a paid order's payment `days` days into the past.
async fn paid_days_ago(app: &TestApp, order: i64, days: i32) {
    sqlx::query(
        "UPDATE payments SET paid_at = paid_at - make_interval(days => $2) WHERE order_id = $1",
    )
    .bind(order)
    .bind(days)
    .execute(&app.pg)
    .await
    .unwrap();
}

async fn settles_to(app: &TestApp, days: i32, limit: i32, expected: &[(i64, i64)]) -> bool {
    eventually(Duration::from_secs(10), || async {
        popular(app, days, limit).await == expected
    })
    .await
}

#[sqlx::test(migrations = false)]
async fn only_the_window_and_only_paid_orders_count(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, fast_ranking).await;
    let hit = create_product(&app, "hit", 1_000, 10_000).await;
    let other = create_product(&app, "other", 1_000, 10_000).await;
    for (quantity, days_ago) in [(10, 2), (20, 1), (30, 0), (75, 4)] {
        let order = buy(&app, 1, hit, quantity).await;
        paid_days_ago(&app, order, days_ago).await;
    }
    let order = buy(&app, 2, other, 50).await;
    paid_days_ago(&app, order, 3).await;
    // Unpaid and cancelled orders never count.
    charge(&app, 3, 1_000_000).await;
    place(&app, 3, &[(other, 500)]).await.unwrap();
    let cancelled = place(&app, 3, &[(hit, 100)]).await.unwrap();
    app.orders()
        .cancel_order(ecommerce::proto::CancelOrderRequest {
            order_id: cancelled.id,
            user_id: 3,
        })
        .await
        .unwrap();

    assert!(
        settles_to(&app, 3, 5, &[(hit, 60)]).await,
        "{:?}",
        popular(&app, 3, 5).await
    );
    assert!(settles_to(&app, 4, 5, &[(hit, 60), (other, 50)]).await);
    assert!(settles_to(&app, 5, 5, &[(hit, 135), (other, 50)]).await);
    let default_window = popular_items(&app, 0, 0).await;
    assert_eq!(default_window.len(), 1, "the default is 3 days");
    assert_eq!(default_window[0].rank, 1);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn top_n_is_cut_and_ties_go_to_the_lower_id(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, fast_ranking).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(create_product(&app, &format!("p{i}"), 100, 1_000).await);
    }
    for (product, quantity) in [
        (ids[0], 5),
        (ids[1], 9),
        (ids[2], 9),
        (ids[3], 1),
        (ids[4], 7),
        (ids[5], 9),
    ] {
        buy(&app, 1, product, quantity).await;
    }
    assert!(settles_to(&app, 1, 3, &[(ids[1], 9), (ids[2], 9), (ids[5], 9)]).await);
    let top = popular_items(&app, 1, 100).await;
    let ranks: Vec<i32> = top.iter().map(|p| p.rank).collect();
    assert_eq!(ranks, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(top[3].product.as_ref().unwrap().name, "p4");

    for (days, limit, field) in [
        (31, 5, "days"),
        (-1, 5, "days"),
        (3, 101, "limit"),
        (3, -5, "limit"),
    ] {
        let status = app
            .products()
            .get_popular_products(GetPopularProductsRequest { days, limit })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(invalid_field(&status), field);
    }
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn concurrent_payments_are_counted_exactly(_: PgPoolOptions, db: PgConnectOptions) {
    // No ranking job during the run: the counts come from the payments' own bumps.
    let app = spawn_app_with(db, |s| {
        s.set("RANKING_RECONCILE_INTERVAL_SECS", 3600)
            .set("POPULAR_CACHE_TTL_MS", 20)
            // 100 payments share a handful of connections: on a loaded machine a pool wait can
            // pass the default 2 s, and this test is about counts, not capacity.
            .set("DATABASE_ACQUIRE_TIMEOUT_MS", 30_000);
    })
    .await;
    let product = create_product(&app, "flash deal", 1_000, 1_000).await;
    let side = create_product(&app, "side", 1_000, 1_000).await;
    let mut orders = Vec::new();
    for user in 1..=100 {
        charge(&app, user, 10_000).await;
        let items: &[(i64, i32)] = if user % 4 == 0 {
            &[(product, 1), (side, 2)]
        } else {
            &[(product, 1)]
        };
        orders.push((user, place(&app, user, items).await.unwrap().id));
    }
    let paid = join_all(orders.iter().map(|(user, order)| pay(&app, *user, *order))).await;
    assert!(paid.iter().all(Result::is_ok));
    assert!(
        settles_to(&app, 1, 5, &[(product, 100), (side, 50)]).await,
        "{:?}",
        popular(&app, 1, 5).await
    );
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn the_job_rebuilds_lost_and_corrupted_buckets(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, fast_ranking).await;
    let a = create_product(&app, "a", 100, 1_000).await;
    let b = create_product(&app, "b", 100, 1_000).await;
    for (user, product, quantity, days_ago) in
        [(1, a, 4, 0), (2, b, 6, 1), (3, a, 3, 2), (4, b, 2, 10)]
    {
        let order = buy(&app, user, product, quantity).await;
        paid_days_ago(&app, order, days_ago).await;
    }
    let truth = [(b, 8), (a, 7)];
    assert!(settles_to(&app, 30, 100, &truth).await);

    // Redis loses everything of this test.
    assert!(delete_keys(&app.redis, &app.redis_prefix).await > 0);
    assert!(
        settles_to(&app, 30, 100, &truth).await,
        "rebuilt after the wipe"
    );

    // A doubled bump inflates today's bucket; the job puts the true count back.
    let today = chrono::Utc::now()
        .with_timezone(&chrono_tz::Asia::Seoul)
        .format("%Y%m%d");
    let bucket = format!("{}rank:{{products}}:{today}", app.redis_prefix);
    let _: f64 = fred::interfaces::SortedSetsInterface::zincrby(&app.redis, &bucket, 40.0, a)
        .await
        .unwrap();
    assert!(
        settles_to(&app, 30, 100, &truth).await,
        "corruption repaired"
    );
    app.stop().await;
}

/// Total paid quantity per product, from the record.
async fn paid_in_postgres(app: &TestApp) -> Vec<(i64, i64)> {
    let mut totals: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT oi.product_id, sum(oi.quantity)::bigint
         FROM payments p JOIN order_items oi ON oi.order_id = p.order_id
         GROUP BY 1",
    )
    .fetch_all(&app.pg)
    .await
    .unwrap();
    totals.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    totals
}

/// What `buyers` buyers paid while paying for `run`, per product (largest first, as the ranking
/// orders them), and how many payments: each buyer places and pays orders of one to three
/// products, one to three units each, back to back.
async fn pay_for(app: &TestApp, buyers: i64, products: &[i64], run: Duration) -> PaidTotals {
    let deadline = tokio::time::Instant::now() + run;
    let per_buyer = join_all((1..=buyers).map(|user| async move {
        charge(app, user, 10_000_000_000).await;
        let mut paid = HashMap::<i64, i64>::new();
        let mut payments = 0;
        let mut n = user as usize;
        while tokio::time::Instant::now() < deadline {
            n = n
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let lines: Vec<(i64, i32)> = (0..1 + (n >> 20) % 3)
                .map(|i| {
                    let product = products[(n >> (24 + 3 * i)) % products.len()];
                    (product, 1 + ((n >> (40 + 2 * i)) % 3) as i32)
                })
                .fold(Vec::new(), |mut lines, (product, quantity)| {
                    if !lines.iter().any(|(p, _)| *p == product) {
                        lines.push((product, quantity));
                    }
                    lines
                });
            let order = place(app, user, &lines).await.expect("order placed");
            pay(app, user, order.id).await.expect("order paid");
            payments += 1;
            for (product, quantity) in lines {
                *paid.entry(product).or_default() += i64::from(quantity);
            }
        }
        (paid, payments)
    }))
    .await;
    let mut totals = HashMap::<i64, i64>::new();
    let mut payments = 0;
    for (paid, n) in per_buyer {
        payments += n;
        for (product, quantity) in paid {
            *totals.entry(product).or_default() += quantity;
        }
    }
    let mut by_product: Vec<(i64, i64)> = totals.into_iter().collect();
    by_product.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    PaidTotals {
        by_product,
        payments,
    }
}

struct PaidTotals {
    by_product: Vec<(i64, i64)>,
    payments: usize,
}

/// Reads the ranking all along, so the in-process cache always holds a window when a payment
/// answers: the read after the last payment must not be served a copy older than it.
fn keep_reading(app: &TestApp, stop: CancellationToken) -> tokio::task::JoinHandle<usize> {
    let products = app.products();
    tokio::spawn(async move {
        let mut reads = 0;
        while !stop.is_cancelled() {
            let mut client = products.clone();
            let request = GetPopularProductsRequest {
                days: 2,
                limit: 100,
            };
            client.get_popular_products(request).await.unwrap();
            reads += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        reads
    })
}

/// The two races of a rebuild, as counted by the server so far: bumps its snapshot had already
/// counted (once doubled) and bumps it carried over (once erased).
async fn races(app: &TestApp) -> (f64, f64) {
    let text = metrics_text(app).await;
    let value = |name| series_value(&text, name).unwrap_or(0.0);
    (
        value("ecommerce_ranking_bumps_already_counted_total"),
        value("ecommerce_ranking_bumps_carried_total"),
    )
}

#[sqlx::test(migrations = false)]
async fn the_ranking_is_exact_while_the_job_rebuilds_it(_: PgPoolOptions, db: PgConnectOptions) {
    // The job rebuilds every second; the cache keeps its default TTL (2 s): the read after the
    // last payment is exact only if the payments' own bumps make the cached copy stale.
    let app = spawn_app_with(db, |s| {
        s.set("RANKING_RECONCILE_INTERVAL_SECS", 1)
            .set("DATABASE_ACQUIRE_TIMEOUT_MS", 30_000);
    })
    .await;
    let mut products = Vec::new();
    for i in 0..6 {
        products.push(create_product(&app, &format!("p{i}"), 100, 10_000_000).await);
    }
    let races_before = races(&app).await;
    let stop = CancellationToken::new();
    let rebuilds = count_rebuilds(&app, stop.clone());
    let reads = keep_reading(&app, stop.clone());

    let paid = pay_for(&app, 32, &products, Duration::from_secs(5)).await;
    // Two days, in case the run crosses midnight in Seoul.
    let ranking = popular(&app, 2, 100).await;

    stop.cancel();
    let (rebuilds, reads) = (rebuilds.await.unwrap(), reads.await.unwrap());
    let units: i64 = paid.by_product.iter().map(|(_, q)| q).sum();
    let races = races(&app).await;
    // The counters are the process's: other tests running beside this one add to them.
    println!(
        "{} payments, {units} units, {rebuilds} rebuilds swapped in, {reads} reads during the \
         run; bumps a snapshot had counted: {}, bumps carried over a rebuild: {}",
        paid.payments,
        races.0 - races_before.0,
        races.1 - races_before.1,
    );
    assert_eq!(paid_in_postgres(&app).await, paid.by_product, "the record");
    assert_eq!(
        ranking, paid.by_product,
        "read right after the last payment"
    );
    // The snapshot there when watching began, and at least one rebuild swapped in while the
    // buyers paid (a loaded machine runs fewer than the five the interval asks for).
    assert!(rebuilds >= 2, "the job ran during the payments: {rebuilds}");
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_ranking_wiped_under_payments_heals(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, |s| {
        fast_ranking(s);
        s.set("DATABASE_ACQUIRE_TIMEOUT_MS", 30_000);
    })
    .await;
    let products = [
        create_product(&app, "a", 100, 10_000_000).await,
        create_product(&app, "b", 100, 10_000_000).await,
    ];
    let ranking_keys = format!("{}rank:", app.redis_prefix);
    let wiped = async {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        delete_keys(&app.redis, &ranking_keys).await
    };
    let (paid, wiped) = tokio::join!(pay_for(&app, 8, &products, Duration::from_secs(3)), wiped);
    assert!(wiped > 0, "the ranking had keys to lose");
    assert!(paid.payments > 0);
    assert!(
        settles_to(&app, 2, 100, &paid.by_product).await,
        "healed: {:?} against {:?}",
        popular(&app, 2, 100).await,
        paid.by_product
    );
    app.stop().await;
}

/// The scripts' snapshot rules (store/redis/lua/snapshot.lua) give PostgreSQL's answers, also
/// for transaction ids above 2^53 where Lua numbers would round: Postgres judges snapshots of
/// small ids (it refuses ids beyond its current epoch), the scripts judge the same snapshots
/// shifted up by large offsets (visibility only compares ids, so a shift keeps the answer).
#[sqlx::test(migrations = false)]
async fn the_scripts_judge_visibility_as_postgres_does(_: PgPoolOptions, db: PgConnectOptions) {
    const RULES: &str = include_str!("../../src/store/redis/lua/snapshot.lua");
    const SHIFTS: [u64; 4] = [
        0,
        9_007_199_254_740_984,      // around 2^53
        9_999_999_999_999_992,      // ids go from 16 to 17 digits
        18_446_744_073_709_551_580, // up to u64::MAX - 6
    ];
    let app = spawn_app(db).await;
    let sees = format!(
        "{RULES}\nlocal s = parse_snapshot(ARGV[1])\nlocal out = {{}}\n\
         for i = 2, #ARGV do out[#out + 1] = sees(s, ARGV[i]) and 1 or 0 end\nreturn out"
    );
    let includes = format!(
        "{RULES}\nreturn includes(parse_snapshot(ARGV[1]), parse_snapshot(ARGV[2])) and 1 or 0"
    );
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |below: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % below
    };
    // Snapshots as (xmin, xmax, in progress), ids 3..=21; judged for ids 2..=22.
    let snapshots: Vec<(u64, u64, Vec<u64>)> = (0..80)
        .map(|_| {
            let xmin = 3 + next(10);
            let xmax = xmin + next(10);
            let xip = (xmin..xmax).filter(|_| next(3) == 0).collect();
            (xmin, xmax, xip)
        })
        .collect();
    let text = |(xmin, xmax, xip): &(u64, u64, Vec<u64>), shift: u64| {
        let xip: Vec<String> = xip.iter().map(|x| (x + shift).to_string()).collect();
        format!("{}:{}:{}", xmin + shift, xmax + shift, xip.join(","))
    };
    let xids =
        |shift: u64| -> Vec<String> { (2..=22_u64).map(|x| (x + shift).to_string()).collect() };
    let (mut judged, mut ordered_pairs) = (0, 0);
    for s in &snapshots {
        let expected: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_visible_in_snapshot(x::xid8, $1::pg_snapshot)
             FROM unnest($2::text[]) WITH ORDINALITY AS t(x, i) ORDER BY i",
        )
        .bind(text(s, 0))
        .bind(xids(0))
        .fetch_all(&app.pg)
        .await
        .unwrap();
        for shift in SHIFTS {
            let mut args = vec![text(s, shift)];
            args.extend(xids(shift));
            let got: Vec<i64> = app.redis.eval(sees.as_str(), (), args).await.unwrap();
            let got: Vec<bool> = got.into_iter().map(|v| v == 1).collect();
            assert_eq!(got, expected, "snapshot {}", text(s, shift));
            judged += got.len();
        }
    }
    for (later, earlier) in snapshots.iter().zip(snapshots.iter().rev()) {
        let expected: bool = sqlx::query_scalar(
            "SELECT bool_and(pg_visible_in_snapshot(x::xid8, $1::pg_snapshot)
                             OR NOT pg_visible_in_snapshot(x::xid8, $2::pg_snapshot))
             FROM unnest($3::text[]) AS x",
        )
        .bind(text(later, 0))
        .bind(text(earlier, 0))
        .bind(xids(0))
        .fetch_one(&app.pg)
        .await
        .unwrap();
        for shift in SHIFTS {
            let args = vec![text(later, shift), text(earlier, shift)];
            let got: i64 = app.redis.eval(includes.as_str(), (), args).await.unwrap();
            // Sound (never a yes Postgres denies), and exact whenever the later snapshot's
            // xmax is not below the earlier one's, as for two snapshots taken one after the
            // other.
            if later.1 >= earlier.1 {
                assert_eq!(
                    got == 1,
                    expected,
                    "{later:?} includes {earlier:?} (+{shift})"
                );
                ordered_pairs += 1;
            } else {
                assert!(
                    got == 0 || expected,
                    "{later:?} includes {earlier:?} (+{shift})"
                );
            }
        }
    }
    assert_eq!(judged, 80 * 21 * SHIFTS.len());
    assert!(ordered_pairs > 100, "enough ordered pairs: {ordered_pairs}");
    app.stop().await;
}
