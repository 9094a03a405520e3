//! Money conservation under a seeded, concurrent, mixed workload.
//!
//! 16 workers share one server and 40 users: charges (some with idempotency keys, some retried
//! with the same key, one after the other or at the same moment), coupon issues (four kinds,
//! limited stock, fixed and percent), orders of 1-3 lines over 10 products of limited stock, with
//! and without coupons, cancels, payments (some retried with their key, some sent three times at
//! once) and orders left to expire (ORDER_TTL_SECS=2). Every answer is recorded. Afterwards the
//! books must balance, on a consistent snapshot right after the workload and again once the
//! expiry job and the outbox have settled: every balance equals its ledger and what the RPCs
//! reported (charges counted once per idempotency key, minus payments); every unit of stock is on
//! the shelf, in an open order or in a paid one; coupons are never over-issued, are RESERVED
//! exactly for open orders and USED exactly for paid ones; every paid order has exactly one
//! payment and one outbox event, every other order none.
//!
//! The default run takes 20-40 s here. To run it long, or with another seed:
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!   CONSERVATION_OPS=100000 CONSERVATION_SEED=7 cargo test --test it conservation -- --nocapture
//! ```

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ecommerce::{
    error::code_name,
    proto::{
        CancelOrderRequest, ChargeBalanceRequest, CreateCouponRequest, Discount, FixedDiscount,
        GetBalanceRequest, IssueCouponRequest, Order, OrderLine, OrderStatus, PayRequest,
        PercentDiscount, PlaceOrderRequest, ProductStatus, discount,
    },
};
use futures::future::join_all;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use sqlx::{
    Row,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tonic::Status;
use tonic_types::StatusExt;

use crate::support::{
    TestApp, assert_no_violations,
    coupons::{coupon_request, create_coupon_with, remaining},
    eventually,
    rules::RULES,
    shop::create_product_with_status,
    spawn_app_with,
};

const DEFAULT_SEED: u64 = 20_261_125;
/// 20-30 s on two shared cores with the debug build.
const DEFAULT_OPS: usize = 10_000;
const WORKERS: usize = 16;
const USERS: i64 = 40;
const ORDER_TTL: Duration = Duration::from_secs(2);

/// (name, unit price, initial stock): limited, so that some orders find a product sold out.
const PRODUCTS: [(&str, i64, i64); 10] = [
    ("keyboard", 39_000, 200),
    ("mouse", 12_000, 300),
    ("monitor", 189_000, 40),
    ("webcam", 59_000, 120),
    ("headset", 45_000, 150),
    ("usb cable", 3_000, 600),
    ("desk lamp", 27_000, 180),
    ("chair", 149_000, 30),
    ("mouse pad", 5_000, 400),
    ("speaker", 68_000, 100),
];

/// The coupon kinds: (discount, min order amount, total quantity).
#[derive(Clone, Copy, Debug)]
enum Kind {
    Fixed(i64),
    Percent { percent: i64, max: i64 },
}

const COUPONS: [(Kind, i64, i64); 4] = [
    (Kind::Fixed(3_000), 0, 30),
    (Kind::Fixed(10_000), 30_000, 10),
    (
        Kind::Percent {
            percent: 10,
            max: 5_000,
        },
        0,
        40,
    ),
    (
        Kind::Percent {
            percent: 50,
            max: 0,
        },
        0,
        5,
    ),
];

impl Kind {
    fn discount(self) -> Discount {
        let kind = match self {
            Kind::Fixed(amount) => discount::Kind::Fixed(FixedDiscount { amount }),
            Kind::Percent { percent, max } => discount::Kind::Percent(PercentDiscount {
                percent: percent as i32,
                max_discount: max,
            }),
        };
        Discount { kind: Some(kind) }
    }

    /// The contract's pricing rule, written again independently of the server's.
    fn apply(self, total: i64, min_order_amount: i64) -> Option<i64> {
        if total < min_order_amount {
            return None;
        }
        Some(match self {
            Kind::Fixed(amount) => amount.min(total),
            Kind::Percent { percent, max } => {
                let raw = total * percent / 100;
                if max > 0 { raw.min(max) } else { raw }
            }
        })
    }
}

/// What the fixture created: ids, and the coupon behind each coupon id.
struct Shop {
    /// (id, price, initial stock)
    products: Vec<(i64, i64, i64)>,
    /// id -> (kind, min order amount, total quantity)
    coupons: HashMap<i64, (Kind, i64, i64)>,
    coupon_ids: Vec<i64>,
}

impl Shop {
    fn price(&self, product: i64) -> i64 {
        self.products.iter().find(|p| p.0 == product).unwrap().1
    }
}

/// `stock_scale` multiplies the stock, so that a long run still has something to sell after its
/// first minute.
async fn open_shop(app: &TestApp, stock_scale: i64) -> Shop {
    let mut products = Vec::new();
    for (name, price, stock) in PRODUCTS {
        let stock = stock * stock_scale;
        let id = create_product_with_status(app, name, price, stock, ProductStatus::Selling).await;
        products.push((id, price, stock));
    }
    let mut coupons = HashMap::new();
    for (i, (kind, min_order_amount, total)) in COUPONS.into_iter().enumerate() {
        let id = create_coupon_with(
            app,
            CreateCouponRequest {
                name: format!("conservation coupon {i}"),
                discount: Some(kind.discount()),
                min_order_amount,
                ..coupon_request(total)
            },
        )
        .await;
        coupons.insert(id, (kind, min_order_amount, total));
    }
    let coupon_ids = coupons.keys().copied().collect();
    Shop {
        products,
        coupons,
        coupon_ids,
    }
}

// ---------------------------------------------------------------------------------------------
// What the RPCs reported

#[derive(Clone, Copy, Debug)]
struct Placed {
    user: i64,
    final_amount: i64,
}

#[derive(Default)]
struct Record {
    /// Successful charges by ledger entry id: a replayed key reports the same id, so summing
    /// over ids counts each key once.
    charges: HashMap<i64, (i64, i64)>,
    /// Successful payments by payment id: (user, order, amount).
    payments: HashMap<i64, (i64, i64, i64)>,
    paid_orders: HashMap<i64, i64>,
    orders: HashMap<i64, Placed>,
    /// Every order placed, in order, with its buyer: what cancels and payments pick from.
    order_list: Vec<(i64, i64)>,
    /// Issued user coupons: id -> (user, coupon).
    issued: HashMap<i64, (i64, i64)>,
    coupons_of: HashMap<i64, Vec<i64>>,
    outcomes: BTreeMap<(&'static str, String), usize>,
    violations: Vec<String>,
}

struct Shared {
    record: Mutex<Record>,
}

fn outcome<T>(result: &Result<T, Status>) -> String {
    match result {
        Ok(_) => "OK".into(),
        Err(status) => {
            let reason = status
                .get_details_error_info()
                .map(|info| info.reason)
                .unwrap_or_else(|| "no ErrorInfo".into());
            format!("{} {reason}", code_name(status.code()))
        }
    }
}

impl Shared {
    fn with<R>(&self, f: impl FnOnce(&mut Record) -> R) -> R {
        f(&mut self.record.lock().unwrap())
    }

    fn violation(&self, message: String) {
        self.with(|r| r.violations.push(message));
    }

    /// Counts the answer and checks it is OK or one of the refusals `allowed` for this operation
    /// in this workload (by ErrorInfo reason). Anything else (INTERNAL, UNAVAILABLE, a refusal
    /// that cannot happen here) is a violation.
    fn note<T>(&self, op: &'static str, result: &Result<T, Status>, allowed: &[&str]) {
        let outcome = outcome(result);
        if let Err(status) = result {
            let reason = status.get_details_error_info().map(|i| i.reason);
            if !reason.is_some_and(|r| allowed.contains(&r.as_str())) {
                self.violation(format!("{op}: unexpected {outcome}: {status:?}"));
            }
        }
        self.with(|r| *r.outcomes.entry((op, outcome)).or_default() += 1);
    }

    fn charged(&self, history_id: i64, user: i64, amount: i64) {
        self.with(|r| match r.charges.insert(history_id, (user, amount)) {
            Some(earlier) if earlier != (user, amount) => r.violations.push(format!(
                "ledger entry {history_id} reported for {earlier:?} and for {:?}",
                (user, amount)
            )),
            _ => {}
        });
    }

    fn placed(&self, shop: &Shop, user: i64, coupon: Option<i64>, order: &Order) {
        let total: i64 = order
            .items
            .iter()
            .map(|i| shop.price(i.product_id) * i64::from(i.quantity))
            .sum();
        let discount = match coupon {
            None => 0,
            Some(uc) => {
                let coupon = self.with(|r| r.issued[&uc].1);
                let (kind, min, _) = shop.coupons[&coupon];
                kind.apply(total, min).unwrap_or(-1)
            }
        };
        if order.user_id != user
            || order.status() != OrderStatus::PendingPayment
            || order.total_amount != total
            || order.discount_amount != discount
            || order.final_amount != total - discount
        {
            self.violation(format!(
                "order priced or owned wrong (total {total}, discount {discount}): {order:?}"
            ));
        }
        self.with(|r| {
            let placed = Placed {
                user,
                final_amount: order.final_amount,
            };
            if r.orders.insert(order.id, placed).is_none() {
                r.order_list.push((order.id, user));
            }
        });
    }

    fn paid(&self, payment_id: i64, user: i64, order: i64, amount: i64) {
        self.with(|r| {
            match r.orders.get(&order) {
                Some(placed) if placed.user == user && placed.final_amount == amount => {}
                other => r.violations.push(format!(
                    "payment {payment_id} of {amount} by user {user} for order {order}, placed as {other:?}"
                )),
            }
            if let Some(earlier) = r.paid_orders.insert(order, payment_id)
                && earlier != payment_id
            {
                r.violations.push(format!(
                    "order {order} paid twice: payments {earlier} and {payment_id}"
                ));
            }
            r.payments.insert(payment_id, (user, order, amount));
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The workload

/// A key unique to this worker and operation.
fn key(prefix: &str, worker: usize, n: usize) -> String {
    format!("{prefix}-{worker}-{n}")
}

async fn charge_op(app: &TestApp, shared: &Shared, rng: &mut StdRng, worker: usize, n: usize) {
    let user = rng.random_range(1..=USERS);
    let amount = rng.random_range(1..=20) * 5_000;
    let keyed = rng.random_bool(0.4);
    let request = ChargeBalanceRequest {
        user_id: user,
        amount,
        idempotency_key: if keyed {
            key("charge", worker, n)
        } else {
            String::new()
        },
    };
    let call = |request: ChargeBalanceRequest| async move {
        app.balance()
            .charge_balance(request)
            .await
            .map(|r| r.into_inner())
    };
    let concurrent = keyed && rng.random_bool(0.2);
    let results = if concurrent {
        join_all([call(request.clone()), call(request.clone())]).await
    } else {
        vec![call(request.clone()).await]
    };
    let op = if concurrent {
        "charge (2 at once, one key)"
    } else {
        "charge"
    };
    let mut ids = HashSet::new();
    for result in &results {
        shared.note(op, result, &[]);
        if let Ok(r) = result {
            shared.charged(r.history_id, user, amount);
            ids.insert(r.history_id);
        }
    }
    if keyed && rng.random_bool(0.3) {
        let again = call(request).await;
        shared.note("charge retry (same key)", &again, &[]);
        if let Ok(r) = &again {
            shared.charged(r.history_id, user, amount);
            ids.insert(r.history_id);
        }
    }
    if ids.len() > 1 {
        shared.violation(format!(
            "one idempotency key credited several times: {ids:?}"
        ));
    }
}

async fn issue_op(app: &TestApp, shop: &Shop, shared: &Shared, rng: &mut StdRng) {
    let user = rng.random_range(1..=USERS);
    let coupon = *shop.coupon_ids.choose(rng).unwrap();
    let result = app
        .coupons()
        .issue_coupon(IssueCouponRequest {
            user_id: user,
            coupon_id: coupon,
        })
        .await
        .map(|r| r.into_inner().user_coupon.unwrap());
    shared.note(
        "issue coupon",
        &result,
        &["COUPON_SOLD_OUT", "COUPON_ALREADY_ISSUED"],
    );
    if let Ok(uc) = result {
        if uc.user_id != user || uc.coupon_id != coupon {
            shared.violation(format!("issued the wrong coupon: {uc:?}"));
        }
        shared.with(|r| {
            r.issued.insert(uc.id, (user, coupon));
            r.coupons_of.entry(user).or_default().push(uc.id);
        });
    }
}

const PLACE_REFUSALS: &[&str] = &["OUT_OF_STOCK", "INSUFFICIENT_BALANCE", "COUPON_UNUSABLE"];

/// Places a random order for `user`; returns its id when placed.
async fn place_op(
    app: &TestApp,
    shop: &Shop,
    shared: &Shared,
    rng: &mut StdRng,
    user: i64,
    key: Option<String>,
) -> Option<i64> {
    let lines = rng.random_range(1..=3);
    let items: Vec<OrderLine> = shop
        .products
        .choose_multiple(rng, lines)
        .map(|p| OrderLine {
            product_id: p.0,
            quantity: rng.random_range(1..=3),
        })
        .collect();
    let coupon = if rng.random_bool(0.4) {
        shared.with(|r| r.coupons_of.get(&user).and_then(|c| c.choose(rng).copied()))
    } else {
        None
    };
    let request = PlaceOrderRequest {
        user_id: user,
        items,
        user_coupon_id: coupon.unwrap_or(0),
        idempotency_key: key.clone().unwrap_or_default(),
    };
    let call = |request: PlaceOrderRequest| async move {
        app.orders()
            .place_order(request)
            .await
            .map(|r| r.into_inner().order.unwrap())
    };
    let first = call(request.clone()).await;
    shared.note("place order", &first, PLACE_REFUSALS);
    if let Ok(order) = &first {
        shared.placed(shop, user, coupon, order);
    }
    if key.is_some() && rng.random_bool(0.3) {
        let again = call(request).await;
        shared.note("place order retry (same key)", &again, PLACE_REFUSALS);
        match (&first, &again) {
            (Ok(a), Ok(b)) if a.id != b.id => shared.violation(format!(
                "a retried order key placed a second order: {} and {}",
                a.id, b.id
            )),
            // A replay answers the first order as it is now (paid, cancelled...): recorded.
            (Ok(_), Ok(_)) => {}
            // The first attempt was refused and left no key: the retry is a first attempt.
            (Err(_), Ok(b)) => shared.placed(shop, user, coupon, b),
            _ => {}
        }
        if let Ok(order) = again {
            return Some(order.id);
        }
    }
    first.ok().map(|o| o.id)
}

const PAY_REFUSALS: &[&str] = &[
    "ORDER_ALREADY_PAID",
    "ORDER_CLOSED",
    "ORDER_EXPIRED",
    "INSUFFICIENT_BALANCE",
];

async fn pay_op(
    app: &TestApp,
    shared: &Shared,
    rng: &mut StdRng,
    (order, user): (i64, i64),
    worker: usize,
    n: usize,
) {
    let keyed = rng.random_bool(0.5);
    let request = PayRequest {
        order_id: order,
        user_id: user,
        idempotency_key: if keyed {
            key("pay", worker, n)
        } else {
            String::new()
        },
    };
    let call = |request: PayRequest| async move {
        app.payments()
            .pay(request)
            .await
            .map(|r| r.into_inner().payment.unwrap())
    };
    let at_once = rng.random_bool(0.15);
    let (op, results) = if at_once {
        let calls = (0..3).map(|_| call(request.clone()));
        ("pay (3 at once)", join_all(calls).await)
    } else {
        ("pay", vec![call(request.clone()).await])
    };
    let mut ids = HashSet::new();
    for result in &results {
        shared.note(op, result, PAY_REFUSALS);
        if let Ok(p) = result {
            shared.paid(p.id, user, order, p.amount);
            ids.insert(p.id);
        }
    }
    if keyed && rng.random_bool(0.3) {
        let again = call(request).await;
        shared.note("pay retry (same key)", &again, PAY_REFUSALS);
        if let Ok(p) = &again {
            shared.paid(p.id, user, order, p.amount);
            ids.insert(p.id);
        }
    }
    if ids.len() > 1 {
        shared.violation(format!("order {order} got several payments: {ids:?}"));
    }
}

/// Places an order and pays it only after it expired: it must be refused.
async fn pay_late_op(app: &TestApp, shop: &Shop, shared: &Shared, rng: &mut StdRng) {
    let user = rng.random_range(1..=USERS);
    let Some(order) = place_op(app, shop, shared, rng, user, None).await else {
        return;
    };
    tokio::time::sleep(ORDER_TTL + Duration::from_millis(rng.random_range(100..1_500))).await;
    let late = app
        .payments()
        .pay(PayRequest {
            order_id: order,
            user_id: user,
            idempotency_key: String::new(),
        })
        .await
        .map(|r| r.into_inner().payment.unwrap());
    // Another worker may have paid or cancelled it in time; otherwise it is expired, by the job
    // (ORDER_CLOSED) or by its deadline (ORDER_EXPIRED).
    shared.note(
        "pay after the TTL",
        &late,
        &["ORDER_EXPIRED", "ORDER_CLOSED", "ORDER_ALREADY_PAID"],
    );
    if let Ok(p) = &late {
        let paid_before = shared.with(|r| r.paid_orders.contains_key(&order));
        shared.violation(format!(
            "an order was paid after its TTL (paid before: {paid_before}): {p:?}"
        ));
        shared.paid(p.id, user, order, p.amount);
    }
}

async fn worker(app: &TestApp, shop: &Shop, shared: &Shared, worker: usize, ops: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(worker as u64 * 7_919));
    // Orders this worker placed and has not acted on yet. Most payments and cancels are for
    // the order just placed, as a buyer's would be; the rest for an older one or any order at
    // all (already paid, cancelled, expired, or another worker's).
    let mut mine: Vec<(i64, i64)> = Vec::new();
    let pick = |rng: &mut StdRng, mine: &mut Vec<(i64, i64)>| -> Option<(i64, i64)> {
        let roll = rng.random_range(0..100);
        if !mine.is_empty() && roll < 80 {
            let i = if roll < 65 {
                mine.len() - 1
            } else {
                rng.random_range(0..mine.len())
            };
            return Some(mine.remove(i));
        }
        shared.with(|r| r.order_list.choose(rng).copied())
    };
    for n in 0..ops {
        match rng.random_range(0..100) {
            0..25 => charge_op(app, shared, &mut rng, worker, n).await,
            25..35 => issue_op(app, shop, shared, &mut rng).await,
            35..60 => {
                let user = rng.random_range(1..=USERS);
                let order_key = rng.random_bool(0.3).then(|| key("order", worker, n));
                if let Some(order) = place_op(app, shop, shared, &mut rng, user, order_key).await {
                    mine.push((order, user));
                    if mine.len() > 20 {
                        mine.remove(0);
                    }
                }
            }
            60..68 => {
                let Some((order, user)) = pick(&mut rng, &mut mine) else {
                    continue;
                };
                let result = app
                    .orders()
                    .cancel_order(CancelOrderRequest {
                        order_id: order,
                        user_id: user,
                    })
                    .await;
                shared.note("cancel order", &result, &["ORDER_CLOSED"]);
            }
            68..93 => {
                if let Some(target) = pick(&mut rng, &mut mine) {
                    pay_op(app, shared, &mut rng, target, worker, n).await;
                }
            }
            93..99 => {
                let user = rng.random_range(1..=USERS);
                let result = app
                    .balance()
                    .get_balance(GetBalanceRequest { user_id: user })
                    .await
                    .map(|r| r.into_inner().balance);
                shared.note("get balance", &result, &[]);
                if result.as_ref().is_ok_and(|b| *b < 0) {
                    shared.violation(format!("user {user} has a negative balance {result:?}"));
                }
            }
            _ => pay_late_op(app, shop, shared, &mut rng).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The books

/// Opens a transaction that sees one snapshot for all its queries: the workers and the expiry
/// and outbox jobs keep writing meanwhile.
async fn snapshot(app: &TestApp) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = app.pg.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// The invariants that hold on any snapshot, even in the middle of the workload: [`RULES`], and
/// every unit of stock on the shelf, in an open order or in a paid one. Returns how many were
/// checked.
async fn audit(
    tx: &mut sqlx::PgConnection,
    shop: &Shop,
    violations: &mut Vec<String>,
    when: &str,
) -> usize {
    let mut checked = 0;
    let mut fail = |message: String| violations.push(format!("{when}: {message}"));
    for &(rule, sql) in RULES {
        let broken: i64 = sqlx::query_scalar(sql).fetch_one(&mut *tx).await.unwrap();
        checked += 1;
        if broken != 0 {
            fail(format!("{rule}: {broken} rows break it"));
        }
    }

    // Stock: every unit is on the shelf, in an open order or in a paid one.
    let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT p.id, p.stock,
                coalesce(sum(i.quantity) FILTER (WHERE o.status = 'PENDING_PAYMENT'), 0)::bigint,
                coalesce(sum(i.quantity) FILTER (WHERE o.status = 'PAID'), 0)::bigint
         FROM products p
         LEFT JOIN order_items i ON i.product_id = p.id
         LEFT JOIN orders o ON o.id = i.order_id
         GROUP BY p.id, p.stock ORDER BY p.id",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    for (product, stock, open, paid) in rows {
        let initial = shop.products.iter().find(|p| p.0 == product).unwrap().2;
        checked += 1;
        if stock + open + paid != initial {
            fail(format!(
                "product {product}: stock {stock} + open {open} + paid {paid} != {initial}"
            ));
        }
    }

    checked
}

/// Checks the books against what the RPCs reported, on one snapshot taken after the workload;
/// returns how many invariants were checked.
async fn check_books(
    app: &TestApp,
    shop: &Shop,
    record: &Record,
    violations: &mut Vec<String>,
    when: &str,
) -> usize {
    let mut tx = snapshot(app).await;
    let mut checked = audit(&mut tx, shop, violations, when).await;
    let mut fail = |message: String| violations.push(format!("{when}: {message}"));

    // Balances: what the RPCs reported, per user, against the ledger.
    let mut expected: HashMap<i64, (i64, i64, i64)> = HashMap::new(); // charged, charges, paid
    for (user, amount) in record.charges.values() {
        let e = expected.entry(*user).or_default();
        e.0 += amount;
        e.1 += 1;
    }
    for (user, _, amount) in record.payments.values() {
        expected.entry(*user).or_default().2 += amount;
    }
    let rows = sqlx::query(
        "SELECT u.user_id,
                coalesce((SELECT balance FROM user_balances b WHERE b.user_id = u.user_id), 0),
                coalesce(sum(h.amount) FILTER (WHERE h.kind = 'CHARGE'), 0)::bigint,
                count(h.id) FILTER (WHERE h.kind = 'CHARGE'),
                coalesce(sum(h.amount) FILTER (WHERE h.kind = 'USE'), 0)::bigint,
                count(h.id) FILTER (WHERE h.kind = 'REFUND')
         FROM generate_series(1, $1::bigint) AS u(user_id)
         LEFT JOIN balance_history h ON h.user_id = u.user_id
         GROUP BY u.user_id ORDER BY u.user_id",
    )
    .bind(USERS)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    for row in rows {
        let user: i64 = row.get(0);
        let balance: i64 = row.get(1);
        let ledger = (
            row.get::<i64, _>(2),
            row.get::<i64, _>(3),
            row.get::<i64, _>(4),
        );
        let refunds: i64 = row.get(5);
        let (charged, charges, paid) = expected.get(&user).copied().unwrap_or_default();
        checked += 3;
        if ledger != (charged, charges, paid) {
            fail(format!(
                "user {user}: ledger charges {} in {} entries, uses {}; the RPCs reported \
                 charges {charged} in {charges}, payments {paid}",
                ledger.0, ledger.1, ledger.2
            ));
        }
        if balance != charged - paid || refunds != 0 {
            fail(format!(
                "user {user}: balance {balance} != {charged} charged - {paid} paid"
            ));
        }
        if balance < 0 {
            fail(format!("user {user}: negative balance {balance}"));
        }
    }

    // What exists is exactly what the RPCs reported: no phantom or lost orders, payments,
    // coupons or charges.
    let sets: [(&str, &str, HashSet<i64>); 4] = [
        (
            "orders",
            "SELECT id FROM orders",
            record.orders.keys().copied().collect(),
        ),
        (
            "payments",
            "SELECT id FROM payments",
            record.payments.keys().copied().collect(),
        ),
        (
            "user coupons",
            "SELECT id FROM user_coupons",
            record.issued.keys().copied().collect(),
        ),
        (
            "charges",
            "SELECT id FROM balance_history WHERE kind = 'CHARGE'",
            record.charges.keys().copied().collect(),
        ),
    ];
    for (what, sql, reported) in sets {
        let stored: HashSet<i64> = sqlx::query_scalar(sql)
            .fetch_all(&mut *tx)
            .await
            .unwrap()
            .into_iter()
            .collect();
        checked += 1;
        if stored != reported {
            let phantom: Vec<_> = stored.difference(&reported).take(10).collect();
            let lost: Vec<_> = reported.difference(&stored).take(10).collect();
            fail(format!(
                "{what}: stored but never reported {phantom:?}, reported but not stored {lost:?}"
            ));
        }
    }
    tx.rollback().await.unwrap();
    checked
}

/// Balances and coupon stock as the RPCs tell them, against the books.
async fn check_rpc_views(app: &TestApp, shop: &Shop, violations: &mut Vec<String>) -> usize {
    let mut checked = 0;
    for user in 1..=USERS {
        let balance = app
            .balance()
            .get_balance(GetBalanceRequest { user_id: user })
            .await
            .unwrap()
            .into_inner()
            .balance;
        let ledger: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(CASE kind WHEN 'USE' THEN -amount ELSE amount END), 0)::bigint
             FROM balance_history WHERE user_id = $1",
        )
        .bind(user)
        .fetch_one(&app.pg)
        .await
        .unwrap();
        checked += 1;
        if balance != ledger || balance < 0 {
            violations.push(format!("GetBalance({user}) = {balance}, ledger {ledger}"));
        }
    }
    for (&coupon, &(_, _, total)) in &shop.coupons {
        let remaining = remaining(app, coupon).await;
        let issued: i64 =
            sqlx::query_scalar("SELECT count(*) FROM user_coupons WHERE coupon_id = $1")
                .bind(coupon)
                .fetch_one(&app.pg)
                .await
                .unwrap();
        checked += 1;
        if remaining != total - issued || remaining < 0 {
            violations.push(format!(
                "coupon {coupon}: remaining {remaining}, issued {issued} of {total}"
            ));
        }
    }
    checked
}

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pg).await.unwrap()
}

#[sqlx::test(migrations = false)]
async fn money_stock_and_coupons_are_conserved_under_a_concurrent_workload(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let seed: u64 = std::env::var("CONSERVATION_SEED")
        .ok()
        .map(|s| s.parse().expect("CONSERVATION_SEED is a u64"))
        .unwrap_or(DEFAULT_SEED);
    let ops: usize = std::env::var("CONSERVATION_OPS")
        .ok()
        .map(|s| s.parse().expect("CONSERVATION_OPS is a count"))
        .unwrap_or(DEFAULT_OPS);
    let app = spawn_app_with(db, |s| {
        s.set("ORDER_TTL_SECS", ORDER_TTL.as_secs())
            .set("ORDER_EXPIRY_INTERVAL_SECS", 1)
            .set("OUTBOX_INTERVAL_SECS", 1)
            // Workers and their duplicate calls wait on row locks; a connection for each
            // keeps them waiting in Postgres, not failing to get a connection.
            .set("DATABASE_MAX_CONNECTIONS", 24)
            .set("DATABASE_ACQUIRE_TIMEOUT_MS", 30_000);
    })
    .await;
    let shop = open_shop(&app, ops.div_ceil(DEFAULT_OPS) as i64).await;
    let shared = Shared {
        record: Mutex::new(Record::default()),
    };

    let started = Instant::now();
    let per_worker = ops.div_ceil(WORKERS);
    let done = AtomicBool::new(false);
    let workers = async {
        join_all((0..WORKERS).map(|w| worker(&app, &shop, &shared, w, per_worker, seed))).await;
        done.store(true, Ordering::Relaxed);
    };
    // Audits snapshots while the workers run: a rule broken for a moment is caught too.
    let auditor = async {
        let (mut audits, mut checked, mut violations) = (0, 0, Vec::new());
        while !done.load(Ordering::Relaxed) {
            let mut tx = snapshot(&app).await;
            checked += audit(&mut tx, &shop, &mut violations, "during the workload").await;
            tx.rollback().await.unwrap();
            audits += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        (audits, checked, violations)
    };
    let ((), (audits, mut checked, mut violations)) = futures::join!(workers, auditor);
    let workload = started.elapsed();

    let record = shared.record.into_inner().unwrap();
    violations.extend(record.violations.iter().cloned());
    checked += check_books(&app, &shop, &record, &mut violations, "after the workload").await;
    let open_after_workload = count(
        &app,
        "SELECT count(*) FROM orders WHERE status = 'PENDING_PAYMENT'",
    )
    .await;

    // Settle: the expiry job closes what is left open, the outbox delivers every payment.
    let settled = eventually(Duration::from_secs(60), || async {
        count(
            &app,
            "SELECT count(*) FROM orders WHERE status = 'PENDING_PAYMENT'",
        )
        .await
            == 0
            && count(
                &app,
                "SELECT count(*) FROM outbox_events WHERE status <> 'DELIVERED'",
            )
            .await
                == 0
    })
    .await;
    checked += 1;
    if !settled {
        violations.push("open orders or undelivered events remain after 60 s".into());
    }
    checked += check_books(&app, &shop, &record, &mut violations, "settled").await;
    checked += check_rpc_views(&app, &shop, &mut violations).await;

    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM orders GROUP BY status ORDER BY status")
            .fetch_all(&app.pg)
            .await
            .unwrap();
    let calls: usize = record.outcomes.values().sum();
    eprintln!(
        "conservation (seed {seed}): {ops} operations, {calls} calls by {WORKERS} workers in {workload:.1?}"
    );
    let mut by_op: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((op, outcome), n) in &record.outcomes {
        by_op.entry(op).or_default().push(format!("{outcome} {n}"));
    }
    for (op, outcomes) in by_op {
        eprintln!("  {op:<28} {}", outcomes.join(", "));
    }
    let charged: i64 = record.charges.values().map(|c| c.1).sum();
    let paid: i64 = record.payments.values().map(|p| p.2).sum();
    eprintln!(
        "  orders by final status: {statuses:?} ({open_after_workload} still open when the workload ended)"
    );
    eprintln!(
        "  money: {} charges for {charged} won, {} payments for {paid} won; {} coupons issued",
        record.charges.len(),
        record.payments.len(),
        record.issued.len()
    );
    eprintln!(
        "  invariants checked: {checked} ({audits} snapshots audited during the workload, \
         the books after it and once settled), violations: {}",
        violations.len()
    );
    assert_no_violations(&violations);
    app.stop().await;
}
