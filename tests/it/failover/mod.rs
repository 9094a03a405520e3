//! The loss of a machine: Postgres under Patroni (`scripts/ha`, three nodes, synchronous
//! replication in strict mode) with the leader SIGKILLed or frozen in the middle of a keyed
//! workload, and a control run with asynchronous replication that must lose acknowledged writes,
//! so the checker is known to find losses when there are some.
//!
//! The client retries every indeterminate answer with the same key until it is definite
//! (`workload`); the checker (`checker`) then looks for every acknowledged write in the new
//! primary and on every node, sends each again (a replay must answer the same), and checks the
//! books. Figures (the window without writes, the answers, readiness changes) are printed for
//! docs/RELIABILITY.md (`--nocapture`).
//!
//! Each cluster takes much of the two cores for minutes, so these tests are `#[ignore]`d in the
//! main run, where timing-sensitive tests share the machine, and `scripts/test` runs them after
//! it: `cargo test --test it -- --ignored failover::`.

mod checker;
mod workload;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ecommerce::proto::CreateCouponRequest;
use futures::{StreamExt, future::join_all};
use sqlx::postgres::PgPoolOptions;
use tokio::time::Instant;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use self::{
    checker::{broken_rules, lost_writes, total_lost},
    workload::{Acked, Seen, Shared, Shop, WORKERS, charge, replay, worker},
};
use crate::support::{
    TestApp,
    coupons::{coupon_request, create_coupon_with},
    eventually,
    ha::HaCluster,
    shop::create_product,
    spawn_app_with,
};

const STOCK: i64 = 1_000_000;

async fn serve_on(cluster: &HaCluster) -> TestApp {
    spawn_app_with(cluster.primary(), |s| {
        s.set("REDIS_URL", cluster.redis_url())
            .set("DATABASE_MAX_CONNECTIONS", 16)
            .set("DEFAULT_DEADLINE_MS", 10_000)
            .set("HEALTH_CHECK_INTERVAL_MS", 1000)
            .set("COUPON_RECONCILE_INTERVAL_SECS", 2);
    })
    .await
}

async fn open_shop(app: &TestApp, seen: &Shared) -> Shop {
    let mut products = Vec::new();
    for (name, price) in [("a", 1_000), ("b", 2_500), ("c", 700)] {
        products.push(create_product(app, name, price, STOCK).await);
    }
    let mut coupons = Vec::new();
    for _ in 0..10 {
        // Fewer seats than users: some issues are refused as sold out.
        let request = CreateCouponRequest {
            total_quantity: 8,
            ..coupon_request(8)
        };
        coupons.push(create_coupon_with(app, request).await);
    }
    for user in 1..=WORKERS {
        charge(app, seen, user, 1_000_000_000, &format!("fund-{user}")).await;
    }
    Shop { products, coupons }
}

/// Every readiness change of the overall name, as Watch streams them.
fn watch_readiness(app: &TestApp) -> Arc<Mutex<Vec<(Instant, ServingStatus)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut client = HealthClient::new(app.channel.clone());
    tokio::spawn({
        let seen = seen.clone();
        async move {
            let Ok(stream) = client
                .watch(HealthCheckRequest {
                    service: String::new(),
                })
                .await
            else {
                return;
            };
            let mut stream = stream.into_inner();
            while let Some(Ok(status)) = stream.next().await {
                seen.lock().unwrap().push((Instant::now(), status.status()));
            }
        }
    });
    seen
}

/// Runs `scripts/ha kill-leader` or `freeze-leader`: the node it hit, and when.
async fn fault(cluster: &HaCluster, command: &str) -> (String, Instant) {
    let printed = cluster.run(&[command]).await;
    let (node, epoch) = printed.split_once(' ').expect("NODE TIME");
    let at = std::time::UNIX_EPOCH + Duration::from_secs_f64(epoch.parse().expect("a time"));
    let ago = std::time::SystemTime::now()
        .duration_since(at)
        .unwrap_or_default();
    (node.to_string(), Instant::now() - ago)
}

/// How long after `at` the first write sent after `at` was acknowledged (an answer to one
/// sent before may be one the old primary gave).
async fn writes_again_after(seen: &Shared, at: Instant) -> Duration {
    let first = || {
        seen.lock()
            .unwrap()
            .ok_attempts
            .iter()
            .filter(|(sent, _)| *sent > at)
            .map(|(_, answered)| *answered)
            .min()
    };
    assert!(
        eventually(Duration::from_secs(90), || async { first().is_some() }).await,
        "no write acknowledged within 90 s of the failover"
    );
    first().expect("a write") - at
}

/// Readiness changes from `from` to `to`, as (seconds after `from`, status).
fn changes(
    readiness: &Mutex<Vec<(Instant, ServingStatus)>>,
    from: Instant,
    to: Instant,
) -> Vec<(f64, ServingStatus)> {
    readiness
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|(t, s)| ((*t - from).as_secs_f64(), *s))
        .collect()
}

struct Workload {
    seen: Shared,
    stop: Arc<AtomicBool>,
}

impl Workload {
    fn new() -> Self {
        Self {
            seen: Arc::new(Mutex::new(Seen::default())),
            stop: Arc::default(),
        }
    }

    async fn run(&self, app: &TestApp, shop: &Shop) {
        join_all(
            (1..=WORKERS).map(|user| worker(app, shop, user, self.seen.clone(), self.stop.clone())),
        )
        .await;
    }

    fn acked(&self) -> Vec<Acked> {
        self.seen.lock().unwrap().acked.clone()
    }

    fn internal_answers(&self) -> Vec<(String, usize)> {
        let seen = self.seen.lock().unwrap();
        seen.answers
            .iter()
            .filter(|(k, _)| k.contains("Internal") || k.contains("Unknown/"))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

/// The kills alone (by hand); scripts/test runs the next test, which makes the same kills and
/// then freezes a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a Patroni cluster: scripts/test runs the kills within the freeze test"]
async fn three_killed_leaders_lose_no_acknowledged_write() {
    killed_or_frozen_leaders(false).await;
}

/// The kills of the test above, then the leader frozen past its lease and resumed. With Debian's
/// Patroni 3.0.2 this lost acknowledged writes in one freeze of three to five: the resumed
/// leader, with a stale view of etcd, renewed its leader key by overwriting the next leader's,
/// and that leader and its synchronous standby were rewound onto the old history
/// (docs/RELIABILITY.md, "The frozen leader"). scripts/test runs this one in place of the kills
/// alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a Patroni cluster: scripts/test runs it in a phase of its own (--ignored failover::)"]
async fn killed_leaders_then_a_frozen_one_lose_no_acknowledged_write() {
    killed_or_frozen_leaders(true).await;
}

async fn killed_or_frozen_leaders(freeze: bool) {
    let cluster = HaCluster::up(true).await;
    let app = serve_on(&cluster).await;
    let workload = Workload::new();
    let shop = open_shop(&app, &workload.seen).await;
    let readiness = watch_readiness(&app);
    let mut events: Vec<(String, Instant, Duration)> = Vec::new();

    let faults = async {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            let (killed, at) = fault(&cluster, "kill-leader").await;
            let window = writes_again_after(&workload.seen, at).await;
            eprintln!("failover: SIGKILL {killed}: writes again after {window:?}");
            events.push((format!("SIGKILL {killed}"), at, window));
            tokio::time::sleep(Duration::from_secs(1)).await;
            cluster.run(&["start", &killed]).await;
            cluster.wait_whole().await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        cluster.wait_whole().await;
        if !freeze {
            workload.stop.store(true, Ordering::Relaxed);
            return;
        }
        let before = cluster.leader().await.expect("a leader before the freeze");
        let led = cluster
            .timeline(&before)
            .await
            .expect("the leader's timeline");
        let (frozen, at) = fault(&cluster, "freeze-leader").await;
        let window = writes_again_after(&workload.seen, at).await;
        eprintln!(
            "failover: SIGSTOP {frozen}: writes again after {window:?}; {}",
            cluster.run(&["status"]).await
        );
        events.push((format!("SIGSTOP {frozen}"), at, window));
        // Frozen well past its lease, then resumed: it must rejoin the history of the leader
        // that followed it (every member on one timeline, later than the one it led), never go
        // on with its own. Patroni 3.0.2 broke exactly this: the resumed node took the leader
        // key back, and every member ended on the timeline it had led, rewound past the writes
        // the next leader had acknowledged (docs/RELIABILITY.md, "The frozen leader"). Members'
        // timelines in Patroni's view settle within seconds of the rewind, hence the wait; that
        // no write was accepted by two primaries is proven below, by every acknowledged write
        // being on every node and every replay answering the same.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_ne!(cluster.leader().await.as_deref(), Some(frozen.as_str()));
        cluster.run(&["thaw", &frozen]).await;
        cluster.wait_whole().await;
        let one_history = eventually(Duration::from_secs(60), || async {
            let mut timelines = Vec::new();
            for node in ["node1", "node2", "node3"] {
                timelines.push(cluster.timeline(node).await);
            }
            timelines
                .iter()
                .all(|t| t.is_some_and(|t| t > led) && *t == timelines[0])
        })
        .await;
        let status = cluster.run(&["status"]).await;
        eprintln!("failover: after the thaw of {frozen} (it led timeline {led}): {status}");
        assert!(
            one_history,
            "the members do not follow one history later than timeline {led} after the thaw: {status}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        workload.stop.store(true, Ordering::Relaxed);
    };
    tokio::join!(workload.run(&app, &shop), faults);
    let ended = Instant::now();

    let acked = workload.acked();
    let losses = lost_writes(&app.pg, &acked).await;
    let broken = broken_rules(&app.pg, STOCK).await;
    let replayed_differently = replay(&app, &acked).await;
    // Every node holds every acknowledged write once replication caught up: no node kept a
    // history of its own (the frozen leader's was rewound, or it accepted nothing).
    for node in ["node1", "node2", "node3"] {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(cluster.node(node))
            .await
            .unwrap();
        let caught_up = eventually(Duration::from_secs(30), || async {
            total_lost(&lost_writes(&pool, &acked).await) == 0
        })
        .await;
        assert!(caught_up, "{node} lacks acknowledged writes");
        pool.close().await;
    }

    let answers = workload.seen.lock().unwrap().answers.clone();
    eprintln!("failover: answers {answers:#?}");
    eprintln!("failover: acknowledged writes checked {losses:?}");
    for (i, (what, at, window)) in events.iter().enumerate() {
        let until = events.get(i + 1).map_or(ended, |(_, next, _)| *next);
        eprintln!(
            "failover: {what}: writes again after {:.1} s; readiness {:?}",
            window.as_secs_f64(),
            changes(&readiness, *at, until)
        );
    }
    assert_eq!(
        total_lost(&losses),
        0,
        "acknowledged writes lost: {losses:?}"
    );
    assert!(broken.is_empty(), "{broken:?}");
    assert!(
        replayed_differently.is_empty(),
        "replays differ: {replayed_differently:#?}"
    );
    assert!(workload.internal_answers().is_empty(), "{answers:#?}");
    for (i, (what, at, _)) in events.iter().enumerate() {
        let until = events.get(i + 1).map_or(ended, |(_, next, _)| *next);
        let downs = changes(&readiness, *at, until)
            .iter()
            .filter(|(_, s)| *s == ServingStatus::NotServing)
            .count();
        assert!(downs <= 1, "readiness flapped after {what}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a Patroni cluster: scripts/test runs it in a phase of its own (--ignored failover::)"]
async fn the_checker_finds_losses_under_asynchronous_replication() {
    let cluster = HaCluster::up(false).await;
    // A standby however far behind may be promoted: what asynchronous replication risks.
    cluster
        .run(&["config", "maximum_lag_on_failover=1099511627776"])
        .await;
    let app = serve_on(&cluster).await;
    let workload = Workload::new();
    let shop = open_shop(&app, &workload.seen).await;
    let mut window = Duration::ZERO;
    let faults = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        cluster.run(&["lag", "on"]).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (_, at) = fault(&cluster, "kill-leader").await;
        window = writes_again_after(&workload.seen, at).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        workload.stop.store(true, Ordering::Relaxed);
    };
    tokio::join!(workload.run(&app, &shop), faults);

    let losses = lost_writes(&app.pg, &workload.acked()).await;
    eprintln!(
        "control (asynchronous, standbys 4 s behind): writes again after {:.1} s; acknowledged writes checked {losses:?}",
        window.as_secs_f64()
    );
    assert!(
        total_lost(&losses) > 0,
        "the checker must find the writes asynchronous replication lost: {losses:?}"
    );
    app.stop().await;
}
