//! A load generator for operators to run against their own deployment before a sale, and for
//! tests to run against a test server.
//!
//! A run sets up its own fixtures through the public API (a coupon, a product, funded buyers),
//! drives `concurrency` workers over `connections` HTTP/2 channels until its budget of units of
//! work or time is spent, then reads the server's state back and checks the service's
//! invariants against everything the run saw. What it guarantees:
//!
//! * **Every call made is counted**, per RPC, per gRPC code and ErrorInfo reason; calls started
//!   during the warm-up count for the invariants but not for the figures.
//! * **A verdict only from evidence.** A call of unknown outcome (UNAVAILABLE, a deadline, ...)
//!   is never taken as a failure or a success: each invariant's bounds widen by exactly the
//!   calls that could explain a difference, so transport trouble alone never fails a run and
//!   never hides more than it can explain.
//! * **Runs do not collide.** User ids come from a block chosen by the seed, and balances are
//!   read before the run, so two runs against the same deployment check only their own users.
//! * **Measuring costs little.** Each worker owns its histograms and counters; the only state
//!   shared while running is the counter that hands out units of work.
//!
//! [`run`] is the whole of it; [`cli`] maps the command line onto it.

pub mod cli;
mod connect;
mod driver;
mod fixtures;
mod holders;
pub mod html;
pub mod judge;
pub mod ledger;
pub mod lifecycle;
pub mod lifecycle_checks;
pub mod listing;
mod prepared;
pub mod report;
mod scenario;
pub mod seen;
pub mod stats;
pub mod timeline;
mod users;
mod verify;
pub mod weights;
mod worker;

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, ensure};
use sqlx::postgres::PgConnectOptions;

pub use listing::Listing;
pub use report::Report;
pub use scenario::{Mixed, Scenario};
pub use weights::Weights;

use self::{
    connect::Connections,
    judge::{BalanceFacts, Check, CouponFacts, OrderFacts},
    seen::Observed,
    stats::Rpc,
    users::UserSpace,
    weights::Op,
    worker::{Shared, Worker},
};

/// TLS towards the target. Without a CA certificate the system's roots are trusted.
#[derive(Clone, Debug, Default)]
pub struct Tls {
    pub ca_cert_pem: Option<Vec<u8>>,
    /// The name the server's certificate must carry, when it differs from the target's host.
    pub domain: Option<String>,
}

/// How to run, whatever the scenario.
#[derive(Clone)]
pub struct Options {
    /// `http://host:port` or `https://host:port` (the latter implies TLS).
    pub target: String,
    pub tls: Option<Tls>,
    /// Sent as `authorization: Bearer <token>` on AdminService calls only.
    pub admin_token: Option<String>,
    /// Workers, each with one call in flight.
    pub concurrency: usize,
    /// HTTP/2 connections; `None` for one per 32 workers.
    pub connections: Option<usize>,
    /// Stop after this many units of work (warm-up included).
    pub requests: Option<u64>,
    /// Stop this long after the warm-up.
    pub duration: Option<Duration>,
    pub warmup: Duration,
    /// Every random choice and the block of user ids derive from it.
    pub seed: u64,
    /// Deadline of every call.
    pub timeout: Duration,
    pub progress: bool,
    /// For the invariants no RPC can show (read-only queries).
    pub database: Option<PgConnectOptions>,
}

impl Options {
    pub const DEFAULT_CONCURRENCY: usize = 64;
    pub const WORKERS_PER_CONNECTION: usize = 32;

    pub fn new(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            tls: None,
            admin_token: None,
            concurrency: Self::DEFAULT_CONCURRENCY,
            connections: None,
            requests: None,
            duration: None,
            warmup: Duration::ZERO,
            seed: 0,
            timeout: Duration::from_secs(30),
            progress: false,
            database: None,
        }
    }

    pub fn connections(&self) -> usize {
        self.connections
            .unwrap_or_else(|| self.concurrency.div_ceil(Self::WORKERS_PER_CONNECTION))
            .max(1)
    }
}

/// Sets up, runs and checks one scenario. An `Err` means the run could not happen (bad
/// options, unreachable server, refused set-up); broken invariants are in the report.
pub async fn run(options: &Options, scenario: &Scenario) -> anyhow::Result<Report> {
    ensure!(options.concurrency >= 1, "--concurrency must be at least 1");
    ensure!(
        options.connections.is_none_or(|c| c >= 1),
        "--connections must be at least 1"
    );
    let plan = scenario.plan()?;
    ensure!(
        !plan.checked_in_postgres || options.database.is_some(),
        "the {} scenario checks its invariants in Postgres: pass --database-url",
        scenario.name()
    );
    let (requests, duration) = plan.stop(options.requests, options.duration);
    let connections = Connections::open(options).await?;
    let db = match &options.database {
        Some(db) => Some(verify::connect_db(db).await?),
        None => None,
    };
    let users = UserSpace::from_seed(options.seed);
    let tag = run_tag(options.seed);
    let fixtures = fixtures::set_up(&connections, &plan, users, &tag, options.concurrency).await?;
    let history = match &plan.listing {
        Some(listing) => Some(fixtures::require_orders(&connections, db.as_ref(), listing).await?),
        None => None,
    };
    let prepared = match fixtures.product_id {
        Some(product_id) if plan.prepared_orders > 0 => {
            prepared::place(
                &connections,
                product_id,
                &fixtures.buyers,
                plan.prepared_orders,
                &tag,
                options.concurrency,
            )
            .await?
        }
        _ => Vec::new(),
    };

    let shared = Arc::new(Shared {
        weights: plan.weights.clone(),
        coupon_id: fixtures.coupon_id.unwrap_or(0),
        product_id: fixtures.product_id.unwrap_or(0),
        buyers: fixtures.buyers.clone(),
        charged: fixtures.charged.clone(),
        holders: fixtures.holders.clone(),
        users,
        tag,
        popular: plan.popular,
        listing: plan.listing,
        products: fixtures.products.clone(),
        prepared: prepared.clone(),
    });
    let workers = (0..options.concurrency)
        .map(|i| {
            let channel = connections.channel(i);
            Worker::new(
                i,
                options.seed,
                shared.clone(),
                channel,
                connections.admin_on(i),
            )
        })
        .collect();
    let driven = driver::drive(
        workers,
        requests,
        duration,
        options.warmup,
        options.progress,
    )
    .await?;

    // The prepared orders are the run's too: their stock, states and payments are checked.
    let mut observed = Observed {
        book: fixtures.book.clone(),
        orders: prepared,
        ..Observed::default()
    };
    for worker in driven.workers {
        observed.merge(worker.observed);
    }
    let spinner = options.progress.then(|| {
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.set_message(format!(
            "reading back {} orders and {} balances",
            observed.orders.len(),
            observed.book.users().count()
        ));
        spinner.enable_steady_tick(Duration::from_millis(100));
        spinner
    });
    let fin = verify::gather(
        &connections,
        &fixtures,
        &observed,
        options.concurrency,
        db.as_ref(),
    )
    .await;
    let life_db = match &db {
        Some(db) if plan.checked_in_postgres => Some(
            lifecycle_checks::read(db, &fixtures.products)
                .await
                .context("reading the lifecycle's orders from Postgres"),
        ),
        _ => None,
    };
    if let Some(spinner) = spinner {
        spinner.finish_and_clear();
    }
    if let Some(db) = db {
        db.close().await;
    }
    let fin = fin?;
    let life_db = life_db.transpose()?;

    let rec = &driven.recorder;
    let called: Vec<(&str, &stats::Outcomes)> = Rpc::ALL
        .iter()
        .map(|&rpc| (rpc.name(), rec.all(rpc)))
        .filter(|(_, outcomes)| outcomes.total() > 0)
        .collect();
    let mut invariants: Vec<Check> = vec![judge::served_check(&called)];
    if let Some(stock) = plan.coupon_stock
        && plan.weights.contains(Op::Coupon)
    {
        invariants.extend(judge::coupon_checks(&CouponFacts {
            stock,
            calls: rec.all(Rpc::IssueCoupon),
            remaining: fin.coupon_remaining,
            db: fin.db.coupon,
        }));
    }
    if let Some(life_db) = &life_db {
        let initial = fixtures
            .products
            .iter()
            .map(|&id| (id, plan.product_stock.unwrap_or_default()))
            .collect();
        invariants.extend(lifecycle_checks::checks(
            life_db,
            &observed.lifecycle,
            &initial,
        ));
    } else if let Some(stock) = plan.product_stock {
        invariants.extend(judge::order_checks(&OrderFacts {
            initial_stock: stock,
            stock_now: fin.stock_now,
            observed: &observed,
            states: &fin.orders,
            repeat_pay_calls: rec.all(Rpc::PayAgain),
            repeat_checkout_calls: rec.all(Rpc::CheckoutAgain),
            db: fin.db.payments,
        }));
    }
    if let Some(stock) = plan.coupon_stock
        && plan.holders > 0
    {
        invariants.extend(holders::checks(&holders::HolderFacts {
            holders: plan.holders,
            stock,
            repeats: rec.all(Rpc::IssueCouponHeld),
            wrong: &observed.repeat_coupons,
            remaining: fin.coupon_remaining,
            db_rows: fin.db.coupon.map(|c| c.rows),
        }));
    }
    if plan.weights.contains(Op::Popular) {
        invariants.extend(judge::popular_checks(&observed, plan.popular.1));
    }
    if plan.weights.contains(Op::Health) {
        invariants.push(judge::health_check(
            &observed.health_problems,
            rec.all(Rpc::HealthCheck).ok(),
        ));
    }
    if let Some(listing) = &plan.listing {
        invariants.push(judge::page_check(&observed, listing));
    }
    if !observed.book.is_empty() {
        invariants.extend(judge::balance_checks(&BalanceFacts {
            book: &observed.book,
            replays: &observed,
            balances: &fin.balances,
            db_mismatches: fin.db.ledger.as_deref(),
        }));
    }

    let mut facts = BTreeMap::new();
    facts.insert("user_id_base".to_string(), users.base());
    if let (Some(id), Some(stock)) = (fixtures.coupon_id, plan.coupon_stock) {
        facts.insert("coupon_id".into(), id);
        facts.insert("coupon_stock".into(), stock);
    }
    if let (Some(id), Some(stock)) = (fixtures.product_id, plan.product_stock) {
        facts.insert("product_id".into(), id);
        if let Some(&second) = fixtures.products.get(1) {
            facts.insert("second_product_id".into(), second);
        }
        facts.insert("product_stock".into(), stock);
        facts.insert("buyers".into(), fixtures.buyers.len() as i64);
        facts.insert("funded_each".into(), plan.fund_each);
    }
    if plan.prepared_orders > 0 {
        facts.insert("prepared_orders".into(), plan.prepared_orders as i64);
    }
    if !fixtures.charged.is_empty() {
        facts.insert("charged_users".into(), fixtures.charged.len() as i64);
    }
    if !fixtures.holders.is_empty() {
        facts.insert("holders".into(), fixtures.holders.len() as i64);
    }
    if let (Some(listing), Some(history)) = (&plan.listing, history) {
        facts.insert("listed_user_id".into(), listing.user_id);
        facts.insert("page_size".into(), i64::from(listing.page_size));
        if let Some((table, user)) = history {
            facts.insert("orders_in_table".into(), table);
            facts.insert("orders_of_listed_user".into(), user);
        }
    }
    if let Some(life_db) = &life_db {
        let orders = life_db.orders.len() as i64;
        let count = |s: &str| life_db.orders.iter().filter(|o| o.status == s).count() as i64;
        facts.insert("orders".into(), orders);
        for status in ["PAID", "PARTIALLY_REFUNDED", "REFUNDED", "CANCELLED"] {
            facts.insert(format!("orders_{}", status.to_lowercase()), count(status));
        }
        facts.insert(
            "refunds".into(),
            life_db.orders.iter().map(|o| o.refunds).sum(),
        );
        facts.insert("outbox_events".into(), life_db.events.len() as i64);
    }
    let measured_secs = driven.measured.as_secs_f64();
    let passed = invariants.iter().all(|c| c.passed);
    Ok(Report {
        scenario: scenario.name().to_string(),
        target: options.target.clone(),
        seed: options.seed,
        concurrency: options.concurrency,
        connections: options.connections(),
        warmup_secs: options.warmup.as_secs_f64(),
        measured_secs,
        measured_from_unix_secs: unix_secs(driven.measured_from),
        measured_until_unix_secs: unix_secs(driven.measured_from + driven.measured),
        warmup_calls: rec.warmup_calls(),
        units_of_work: driven.units,
        fixtures: facts,
        rpcs: report::rpc_reports(rec, &driven.timeline, measured_secs),
        invariants,
        passed,
    })
}

/// Seconds since the Unix epoch, as other tools on the machine read the clock.
fn unix_secs(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Names this run's fixtures and idempotency keys. The wall clock keeps two runs with the same
/// seed from replaying each other's keys.
fn run_tag(seed: u64) -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("lg-{seed:x}-{millis:x}")
}
