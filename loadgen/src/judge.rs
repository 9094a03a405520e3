//! The invariants, as pure functions from what the run saw and what the server reports after
//! it to a list of [`Check`]s. Nothing here talks to the network, so every check is tested with
//! fabricated observations, violating ones included.
//!
//! Calls of unknown outcome (UNAVAILABLE, DEADLINE_EXCEEDED, ...) are never assumed to have
//! failed or succeeded: each check widens its bounds by them, so a transport error is never
//! reported as a broken invariant and a broken invariant is never hidden by one beyond what the
//! unknown calls could explain.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use tonic::Code;

use super::{
    ledger::BalanceBook,
    seen::{Observed, Problems},
    stats::{Class, Outcomes},
};
use ecommerce::proto::{OrderStatus, PopularProduct};

/// One invariant and whether it held, with the numbers that show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

impl Check {
    pub fn equal(name: impl Into<String>, expected: i64, actual: i64) -> Self {
        Self::within(name, expected, expected, actual)
    }

    /// Passes when `low <= actual <= high`; otherwise says by how much it missed.
    pub fn within(name: impl Into<String>, low: i64, high: i64, actual: i64) -> Self {
        let passed = (low..=high).contains(&actual);
        let expected = if low == high {
            low.to_string()
        } else {
            format!("{low}..={high}")
        };
        let detail = if passed {
            if low == high {
                actual.to_string()
            } else {
                // Callers pass a range only to allow for calls of unknown outcome.
                format!("{actual} (allowed {expected}: some calls had an unknown outcome)")
            }
        } else {
            let off = if actual > high {
                actual - high
            } else {
                actual - low
            };
            format!("expected {expected}, got {actual} (off by {off:+})")
        };
        Self {
            name: name.into(),
            passed,
            detail,
        }
    }

    pub fn at_most(name: impl Into<String>, limit: i64, actual: i64) -> Self {
        Self::bound(
            name,
            actual <= limit,
            format!("{actual} <= {limit}"),
            actual - limit,
        )
    }

    pub fn at_least(name: impl Into<String>, limit: i64, actual: i64) -> Self {
        Self::bound(
            name,
            actual >= limit,
            format!("{actual} >= {limit}"),
            actual - limit,
        )
    }

    fn bound(name: impl Into<String>, passed: bool, relation: String, off: i64) -> Self {
        let detail = if passed {
            relation
        } else {
            format!("{relation} is false (off by {off:+})")
        };
        Self {
            name: name.into(),
            passed,
            detail,
        }
    }

    /// Passes when no problem was found; `out_of` says how many things were looked at.
    pub fn none(name: impl Into<String>, problems: &Problems, out_of: u64) -> Self {
        let detail = if problems.count == 0 {
            format!("0 of {out_of}")
        } else {
            format!(
                "{} of {out_of} violate it, e.g. {}",
                problems.count,
                problems.examples.join("; ")
            )
        };
        Self {
            name: name.into(),
            passed: problems.count == 0,
            detail,
        }
    }

    pub fn failed(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            passed: false,
            detail: detail.into(),
        }
    }
}

/// Refusals that say the run itself is wrong (a deployment without the RPC, a wrong admin
/// token, a request the server finds malformed or about something that does not exist), not
/// that the service is under load. A run made of them proves nothing, so it must not pass.
const MISCONFIGURED: [Code; 5] = [
    Code::Unimplemented,
    Code::Unauthenticated,
    Code::PermissionDenied,
    Code::InvalidArgument,
    Code::NotFound,
];

/// Every RPC the run called, with every call's outcome.
pub fn served_check(calls: &[(&str, &Outcomes)]) -> Check {
    let mut wrong = Problems::default();
    let mut total = 0;
    for &(rpc, outcomes) in calls {
        total += outcomes.total();
        for (outcome, n) in outcomes.sorted() {
            if MISCONFIGURED.contains(&outcome.code()) {
                wrong.add_n(n, || format!("{rpc} {} x{n}", outcome.label()));
            }
        }
    }
    Check::none(
        "no call refused as unimplemented, unauthenticated, denied, invalid or not found",
        &wrong,
        total,
    )
}

/// Every health check the server answered said SERVING: a floor measured on a server that
/// is not serving would measure its refusals.
pub fn health_check(problems: &Problems, answered: u64) -> Check {
    Check::none("every health check answers SERVING", problems, answered)
}

/// What Postgres says about the coupon (only with `--database-url`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DbCoupon {
    pub rows: i64,
    pub distinct_users: i64,
    /// Users told they won who have no row.
    pub winners_missing: i64,
}

/// The coupon a run stampeded on.
pub struct CouponFacts<'a> {
    pub stock: i64,
    /// Every IssueCoupon call (each for a distinct user).
    pub calls: &'a Outcomes,
    /// GetCoupon.remaining_quantity after the run; `None` when it could not be read.
    pub remaining: Option<i64>,
    pub db: Option<DbCoupon>,
}

pub fn coupon_checks(f: &CouponFacts) -> Vec<Check> {
    let calls = to_i64(f.calls.total());
    let ok = to_i64(f.calls.ok());
    let unsure = to_i64(f.calls.of_class(Class::Indeterminate));
    let expected = calls.min(f.stock);
    let mut checks = vec![Check::within(
        format!("coupons issued == min(users {calls}, stock {})", f.stock),
        expected - unsure,
        expected,
        ok,
    )];
    checks.push(match f.remaining {
        Some(remaining) => Check::within(
            "GetCoupon.remaining_quantity == stock - issued",
            f.stock - ok - unsure,
            f.stock - ok,
            remaining,
        ),
        None => Check::failed(
            "GetCoupon.remaining_quantity == stock - issued",
            "could not read the coupon back",
        ),
    });
    let mut wrong = Problems::default();
    let mut refused = 0;
    for (outcome, n) in f.calls.sorted() {
        if outcome.class() != Class::Refused {
            continue;
        }
        refused += n;
        if outcome.code() != Code::ResourceExhausted || outcome.reason != "COUPON_SOLD_OUT" {
            wrong.add_n(n, || format!("{} x{n}", outcome.label()));
        }
    }
    checks.push(Check::none(
        "every refusal is RESOURCE_EXHAUSTED/COUPON_SOLD_OUT",
        &wrong,
        refused,
    ));
    if let Some(db) = f.db {
        checks.push(Check::within(
            "user_coupons rows == coupons issued (Postgres)",
            ok,
            ok + unsure,
            db.rows,
        ));
        checks.push(Check::at_most(
            "user_coupons rows <= stock (Postgres)",
            f.stock,
            db.rows,
        ));
        checks.push(Check::equal(
            "one user_coupons row per user (Postgres)",
            db.rows,
            db.distinct_users,
        ));
        checks.push(Check::equal(
            "every winner has a user_coupons row (Postgres)",
            0,
            db.winners_missing,
        ));
    }
    checks
}

/// An order as GetOrder reports it after the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrderState {
    pub status: OrderStatus,
    /// Units of the load-tested product in the order.
    pub units: i64,
}

/// What Postgres says about the payments of the run's orders (only with `--database-url`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DbPayments {
    pub rows: i64,
    pub max_per_order: i64,
}

pub struct OrderFacts<'a> {
    pub initial_stock: i64,
    /// GetProduct.stock after the run; `None` when it could not be read.
    pub stock_now: Option<i64>,
    pub observed: &'a Observed,
    /// Every confirmed order that could be read back.
    pub states: &'a HashMap<i64, OrderState>,
    /// Every deliberate second Pay of an order just paid.
    pub repeat_pay_calls: &'a Outcomes,
    /// Every deliberate second Checkout with the key of one just answered.
    pub repeat_checkout_calls: &'a Outcomes,
    pub db: Option<DbPayments>,
}

pub fn order_checks(f: &OrderFacts) -> Vec<Check> {
    let obs = f.observed;
    let mut checks = Vec::new();
    let unreadable: Vec<i64> = obs
        .orders
        .iter()
        .filter(|o| !f.states.contains_key(&o.order_id))
        .map(|o| o.order_id)
        .collect();
    if !unreadable.is_empty() {
        checks.push(Check::failed(
            "every confirmed order reads back",
            format!(
                "{} of {} could not be read, e.g. order {}",
                unreadable.len(),
                obs.orders.len(),
                unreadable[0]
            ),
        ));
    }
    let unreadable_units: i64 = obs
        .orders
        .iter()
        .filter(|o| !f.states.contains_key(&o.order_id))
        .map(|o| o.units)
        .sum();

    match f.stock_now {
        Some(stock) => {
            checks.push(Check::at_least("product stock is never negative", 0, stock));
            let live: i64 = f
                .states
                .values()
                .filter(|s| matches!(s.status, OrderStatus::PendingPayment | OrderStatus::Paid))
                .map(|s| s.units)
                .sum();
            checks.push(Check::within(
                format!(
                    "stock now + units in PENDING_PAYMENT/PAID orders == initial stock {}",
                    f.initial_stock
                ),
                f.initial_stock - obs.unsure_order_units - unreadable_units,
                f.initial_stock,
                stock + live,
            ));
        }
        None => checks.push(Check::failed(
            "product stock is never negative",
            "could not read the product back",
        )),
    }

    let mut payment_ids = HashSet::new();
    let mut dup_payments = Problems::default();
    let mut paid_orders = HashSet::new();
    let mut dup_orders = Problems::default();
    for p in &obs.payments {
        if !payment_ids.insert(p.payment_id) {
            dup_payments.add(|| format!("payment {} returned twice", p.payment_id));
        }
        if !paid_orders.insert(p.order_id) {
            dup_orders.add(|| format!("order {} paid twice", p.order_id));
        }
    }
    let paid = obs.payments.len() as u64;
    checks.push(Check::none(
        "each successful Pay has its own payment id",
        &dup_payments,
        paid,
    ));
    checks.push(Check::none(
        "each successful Pay is for a different order",
        &dup_orders,
        paid,
    ));

    let mut not_paid = Problems::default();
    for order in &paid_orders {
        if let Some(state) = f.states.get(order)
            && state.status != OrderStatus::Paid
        {
            not_paid.add(|| format!("order {order} is {}", state.status.as_str_name()));
        }
    }
    checks.push(Check::none(
        "every order paid successfully reads PAID",
        &not_paid,
        paid,
    ));
    let unsure: HashSet<i64> = obs.unsure_pays.iter().copied().collect();
    let mut paid_unseen = Problems::default();
    for (order, state) in f.states {
        if state.status == OrderStatus::Paid
            && !paid_orders.contains(order)
            && !unsure.contains(order)
        {
            paid_unseen.add(|| format!("order {order} is PAID but no Pay of this run succeeded"));
        }
    }
    checks.push(Check::none(
        "no order reads PAID without a successful Pay",
        &paid_unseen,
        f.states.len() as u64,
    ));
    let repeats = f.repeat_pay_calls.total();
    if repeats > 0 {
        checks.push(Check::none(
            "paying a paid order again is refused with ALREADY_EXISTS",
            &obs.repeat_pays,
            repeats,
        ));
    }
    let checkouts = f.repeat_checkout_calls.total();
    if checkouts > 0 {
        checks.push(Check::none(
            "a checkout sent again with its key returns the same order",
            &obs.repeat_checkouts,
            checkouts,
        ));
    }
    if let Some(db) = f.db {
        checks.push(Check::within(
            "payments rows == successful Pays (Postgres)",
            to_i64(paid),
            to_i64(paid) + to_i64(obs.unsure_pays.len() as u64),
            db.rows,
        ));
        checks.push(Check::at_most(
            "at most one payment per order (Postgres)",
            1,
            db.max_per_order,
        ));
    }
    checks
}

/// Why a GetPopularProducts answer is ill-formed, if it is: more than `limit` items, ranks not
/// 1..n in order, sold quantity rising, or a tie not broken by product id.
pub fn popular_problem(items: &[PopularProduct], limit: i32) -> Option<String> {
    if items.len() > usize::try_from(limit).unwrap_or(0) {
        return Some(format!("{} items for limit {limit}", items.len()));
    }
    for (i, item) in items.iter().enumerate() {
        if usize::try_from(item.rank).ok() != Some(i + 1) {
            return Some(format!("rank {} at position {}", item.rank, i + 1));
        }
        if item.product.is_none() {
            return Some(format!("rank {} has no product", item.rank));
        }
    }
    for pair in items.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.sold_quantity < b.sold_quantity {
            return Some(format!(
                "sold quantity rises from {} (rank {}) to {} (rank {})",
                a.sold_quantity, a.rank, b.sold_quantity, b.rank
            ));
        }
        let id = |p: &PopularProduct| p.product.as_ref().map_or(0, |p| p.id);
        if a.sold_quantity == b.sold_quantity && id(a) > id(b) {
            return Some(format!(
                "tie at {} sold ranks product {} before {}",
                a.sold_quantity,
                id(a),
                id(b)
            ));
        }
    }
    None
}

pub fn popular_checks(observed: &Observed, limit: i32) -> Vec<Check> {
    vec![Check::none(
        format!(
            "every GetPopularProducts answer has <= {limit} items, ranks 1..n, sold quantity non-increasing"
        ),
        &observed.popular_problems,
        observed.popular_answers,
    )]
}

pub fn page_check(observed: &Observed, listing: &super::Listing) -> Check {
    Check::none(
        format!(
            "every ListOrders page holds <= {} of user {}'s orders, in the filter's statuses, \
             newest first and after the walk's previous page (none twice), full when another follows",
            listing.page_size, listing.user_id
        ),
        &observed.page_problems,
        observed.order_pages,
    )
}

/// A user whose stored balance is not the sum of its ledger (Postgres).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerMismatch {
    pub user: i64,
    pub balance: i64,
    pub ledger_sum: i64,
}

pub struct BalanceFacts<'a> {
    pub book: &'a BalanceBook,
    pub replays: &'a Observed,
    /// GetBalance after the run, for every user that could be read.
    pub balances: &'a HashMap<i64, i64>,
    pub db_mismatches: Option<&'a [LedgerMismatch]>,
}

pub fn balance_checks(f: &BalanceFacts) -> Vec<Check> {
    let mut off = Problems::default();
    let mut total_off = 0i64;
    let mut users = 0u64;
    for user in f.book.users() {
        users += 1;
        let Some((low, high)) = f.book.expected(user) else {
            continue;
        };
        match f.balances.get(&user) {
            Some(&actual) if (low..=high).contains(&actual) => {}
            Some(&actual) => {
                let diff = if actual > high {
                    actual - high
                } else {
                    actual - low
                };
                total_off += diff;
                off.add(|| {
                    if low == high {
                        format!("user {user}: expected {low}, got {actual} ({diff:+})")
                    } else {
                        format!("user {user}: expected {low}..={high}, got {actual} ({diff:+})")
                    }
                });
            }
            None => off.add(|| format!("user {user}: balance could not be read")),
        }
    }
    let mut check = Check::none(
        "balance == balance before + distinct successful charges - successful payments + distinct successful refunds",
        &off,
        users,
    );
    if !check.passed {
        check.detail = format!("{} (net off by {total_off:+} won)", check.detail);
    }
    let mut checks = vec![check];

    let mut replayed = 0u64;
    let mut double = Problems::default();
    for (key, entries) in &f.replays.replays {
        replayed += 1;
        if entries.len() > 1 {
            double.add(|| format!("key {key} credited {} times", entries.len()));
        }
    }
    if replayed > 0 {
        checks.push(Check::none(
            "a repeated idempotency key credits once",
            &double,
            replayed,
        ));
    }
    if let Some(mismatches) = f.db_mismatches {
        let mut p = Problems::default();
        for m in mismatches {
            p.add(|| {
                format!(
                    "user {}: balance {} but ledger sums to {}",
                    m.user, m.balance, m.ledger_sum
                )
            });
        }
        checks.push(Check::none(
            "balance == sum of its ledger (Postgres)",
            &p,
            users,
        ));
    }
    checks
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seen::{PaymentSeen, PlacedOrder};
    use ecommerce::proto::Product;

    fn outcomes(entries: &[(Code, &str, u64)]) -> Outcomes {
        let mut o = Outcomes::default();
        for &(code, reason, n) in entries {
            o.add(code, reason, n);
        }
        o
    }

    fn failed(checks: &[Check]) -> Vec<&str> {
        checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name.as_str())
            .collect()
    }

    #[test]
    fn check_details_say_by_how_much() {
        let c = Check::equal("x", 10, 13);
        assert!(!c.passed);
        assert_eq!(c.detail, "expected 10, got 13 (off by +3)");
        let c = Check::within("x", 5, 10, 2);
        assert_eq!(c.detail, "expected 5..=10, got 2 (off by -3)");
        assert!(Check::within("x", 5, 10, 7).passed);
        assert_eq!(Check::equal("x", 4, 4).detail, "4");
    }

    #[test]
    fn bounds_say_by_how_much_they_are_missed() {
        assert_eq!(Check::at_most("x", 1, 1).detail, "1 <= 1");
        let c = Check::at_most("x", 1, 3);
        assert!(!c.passed);
        assert_eq!(c.detail, "3 <= 1 is false (off by +2)");
        let c = Check::at_least("x", 0, -4);
        assert!(!c.passed);
        assert_eq!(c.detail, "-4 >= 0 is false (off by -4)");
    }

    #[test]
    fn a_run_the_deployment_did_not_serve_fails() {
        let fine = outcomes(&[
            (Code::Ok, "", 5),
            (Code::FailedPrecondition, "OUT_OF_STOCK", 2),
        ]);
        assert!(served_check(&[("PlaceOrder", &fine)]).passed);
        let unserved = outcomes(&[(Code::Unimplemented, "", 400)]);
        let check = served_check(&[("PlaceOrder", &fine), ("Pay", &unserved)]);
        assert!(!check.passed);
        assert_eq!(
            check.detail,
            "400 of 407 violate it, e.g. Pay UNIMPLEMENTED x400"
        );
    }

    #[test]
    fn a_clean_stampede_passes() {
        let calls = outcomes(&[
            (Code::Ok, "", 30),
            (Code::ResourceExhausted, "COUPON_SOLD_OUT", 270),
        ]);
        let checks = coupon_checks(&CouponFacts {
            stock: 30,
            calls: &calls,
            remaining: Some(0),
            db: Some(DbCoupon {
                rows: 30,
                distinct_users: 30,
                winners_missing: 0,
            }),
        });
        assert_eq!(failed(&checks), Vec::<&str>::new(), "{checks:#?}");
        assert_eq!(checks.len(), 7);
    }

    #[test]
    fn over_issuing_and_wrong_refusals_are_reported() {
        let calls = outcomes(&[
            (Code::Ok, "", 31),
            (Code::ResourceExhausted, "COUPON_SOLD_OUT", 266),
            (Code::AlreadyExists, "COUPON_ALREADY_ISSUED", 3),
        ]);
        let checks = coupon_checks(&CouponFacts {
            stock: 30,
            calls: &calls,
            remaining: Some(-1),
            db: Some(DbCoupon {
                rows: 31,
                distinct_users: 30,
                winners_missing: 0,
            }),
        });
        assert_eq!(
            failed(&checks),
            vec![
                "coupons issued == min(users 300, stock 30)",
                "every refusal is RESOURCE_EXHAUSTED/COUPON_SOLD_OUT",
                "user_coupons rows <= stock (Postgres)",
                "one user_coupons row per user (Postgres)",
            ]
        );
        assert_eq!(checks[0].detail, "expected 30, got 31 (off by +1)");
        assert!(
            checks[2]
                .detail
                .starts_with("3 of 269 violate it, e.g. ALREADY_EXISTS/COUPON_ALREADY_ISSUED x3"),
            "{}",
            checks[2].detail
        );
        // remaining -1 == 30 - 31: consistent with what was issued, so that check passes.
        assert!(checks[1].passed);
    }

    #[test]
    fn refusing_while_coupons_are_left_is_reported() {
        let calls = outcomes(&[
            (Code::Ok, "", 20),
            (Code::ResourceExhausted, "COUPON_SOLD_OUT", 280),
        ]);
        let checks = coupon_checks(&CouponFacts {
            stock: 30,
            calls: &calls,
            remaining: Some(10),
            db: None,
        });
        assert_eq!(
            failed(&checks),
            vec!["coupons issued == min(users 300, stock 30)"]
        );
        assert_eq!(checks[0].detail, "expected 30, got 20 (off by -10)");
    }

    #[test]
    fn unknown_outcomes_widen_the_coupon_bounds_but_only_by_their_number() {
        let calls = outcomes(&[
            (Code::Ok, "", 28),
            (Code::Unavailable, "", 2),
            (Code::ResourceExhausted, "COUPON_SOLD_OUT", 270),
        ]);
        let facts = |remaining| CouponFacts {
            stock: 30,
            calls: &calls,
            remaining: Some(remaining),
            db: None,
        };
        assert_eq!(failed(&coupon_checks(&facts(1))), Vec::<&str>::new());
        assert_eq!(
            failed(&coupon_checks(&facts(3))),
            vec!["GetCoupon.remaining_quantity == stock - issued"]
        );
        let unread = coupon_checks(&CouponFacts {
            remaining: None,
            ..facts(0)
        });
        assert_eq!(
            failed(&unread),
            vec!["GetCoupon.remaining_quantity == stock - issued"]
        );
    }

    fn order(order_id: i64, user_id: i64) -> PlacedOrder {
        PlacedOrder {
            order_id,
            user_id,
            units: 1,
            amount: 1_000,
        }
    }

    fn payment(payment_id: i64, order_id: i64) -> PaymentSeen {
        PaymentSeen {
            payment_id,
            order_id,
            user_id: 1,
            amount: 1_000,
        }
    }

    fn states(entries: &[(i64, OrderStatus)]) -> HashMap<i64, OrderState> {
        entries
            .iter()
            .map(|&(id, status)| (id, OrderState { status, units: 1 }))
            .collect()
    }

    #[test]
    fn consistent_orders_pass() {
        let obs = Observed {
            orders: vec![order(1, 1), order(2, 1), order(3, 2)],
            payments: vec![payment(10, 1), payment(11, 2)],
            ..Default::default()
        };
        let st = states(&[
            (1, OrderStatus::Paid),
            (2, OrderStatus::Paid),
            (3, OrderStatus::PendingPayment),
        ]);
        let repeats = outcomes(&[(Code::AlreadyExists, "ORDER_ALREADY_PAID", 2)]);
        let checks = order_checks(&OrderFacts {
            initial_stock: 10,
            stock_now: Some(7),
            observed: &obs,
            states: &st,
            repeat_pay_calls: &repeats,
            repeat_checkout_calls: &Outcomes::default(),
            db: Some(DbPayments {
                rows: 2,
                max_per_order: 1,
            }),
        });
        assert_eq!(failed(&checks), Vec::<&str>::new(), "{checks:#?}");
    }

    #[test]
    fn overselling_double_payment_and_phantom_payments_are_reported() {
        let mut obs = Observed {
            orders: vec![order(1, 1), order(2, 1), order(3, 2), order(4, 2)],
            payments: vec![payment(10, 1), payment(10, 2), payment(12, 2)],
            ..Default::default()
        };
        obs.repeat_pays.add(|| "order 1: OK".into());
        let st = states(&[
            (1, OrderStatus::Paid),
            (2, OrderStatus::PendingPayment),
            (3, OrderStatus::Paid),
        ]);
        let repeats = outcomes(&[(Code::Ok, "", 1)]);
        let checks = order_checks(&OrderFacts {
            initial_stock: 3,
            stock_now: Some(-2),
            observed: &obs,
            states: &st,
            repeat_pay_calls: &repeats,
            repeat_checkout_calls: &Outcomes::default(),
            db: Some(DbPayments {
                rows: 3,
                max_per_order: 2,
            }),
        });
        assert_eq!(
            failed(&checks),
            vec![
                "every confirmed order reads back",
                "product stock is never negative",
                "stock now + units in PENDING_PAYMENT/PAID orders == initial stock 3",
                "each successful Pay has its own payment id",
                "each successful Pay is for a different order",
                "every order paid successfully reads PAID",
                "no order reads PAID without a successful Pay",
                "paying a paid order again is refused with ALREADY_EXISTS",
                "at most one payment per order (Postgres)",
            ],
            "{checks:#?}"
        );
        let conservation = &checks[2];
        // 3 live units + stock -2 = 1; unreadable order 4 may hold 1 more: 2..=3 allowed.
        assert_eq!(
            conservation.detail, "expected 2..=3, got 1 (off by -1)",
            "{conservation:?}"
        );
    }

    #[test]
    fn an_unknown_order_outcome_may_explain_missing_stock() {
        let obs = Observed {
            orders: vec![order(1, 1)],
            unsure_order_units: 1,
            ..Default::default()
        };
        let st = states(&[(1, OrderStatus::PendingPayment)]);
        let none = Outcomes::default();
        let facts = |stock_now| OrderFacts {
            initial_stock: 10,
            stock_now: Some(stock_now),
            observed: &obs,
            states: &st,
            repeat_pay_calls: &none,
            repeat_checkout_calls: &none,
            db: None,
        };
        assert_eq!(failed(&order_checks(&facts(8))), Vec::<&str>::new());
        assert_eq!(failed(&order_checks(&facts(9))), Vec::<&str>::new());
        assert_eq!(
            failed(&order_checks(&facts(7))),
            vec!["stock now + units in PENDING_PAYMENT/PAID orders == initial stock 10"]
        );
    }

    fn popular(rank: i32, id: i64, sold: i64) -> PopularProduct {
        PopularProduct {
            rank,
            product: Some(Product {
                id,
                ..Default::default()
            }),
            sold_quantity: sold,
        }
    }

    #[test]
    fn popular_answers_are_checked_for_shape() {
        assert_eq!(popular_problem(&[], 5), None);
        let good = [popular(1, 9, 50), popular(2, 3, 20), popular(3, 4, 20)];
        assert_eq!(popular_problem(&good, 5), None);
        assert_eq!(
            popular_problem(&good, 2),
            Some("3 items for limit 2".into())
        );
        let skipped = [popular(1, 9, 50), popular(3, 3, 20)];
        assert_eq!(
            popular_problem(&skipped, 5),
            Some("rank 3 at position 2".into())
        );
        let rising = [popular(1, 9, 5), popular(2, 3, 20)];
        assert_eq!(
            popular_problem(&rising, 5),
            Some("sold quantity rises from 5 (rank 1) to 20 (rank 2)".into())
        );
        let tie = [popular(1, 9, 5), popular(2, 3, 5)];
        assert_eq!(
            popular_problem(&tie, 5),
            Some("tie at 5 sold ranks product 9 before 3".into())
        );

        let mut obs = Observed {
            popular_answers: 10,
            ..Default::default()
        };
        assert!(popular_checks(&obs, 5)[0].passed);
        obs.popular_problems.add(|| "rank 3 at position 2".into());
        let check = &popular_checks(&obs, 5)[0];
        assert!(!check.passed);
        assert_eq!(
            check.detail,
            "1 of 10 violate it, e.g. rank 3 at position 2"
        );
    }

    #[test]
    fn balances_must_match_the_book() {
        let mut obs = Observed::default();
        obs.book.open(1, 0);
        obs.book.credit(1, 100, 1_000, Some("k"));
        obs.book.credit(1, 100, 1_000, Some("k"));
        obs.book.open(2, 50);
        obs.book.credit(2, 101, 10, None);
        obs.replays.entry("k".into()).or_default().insert(100);
        let good: HashMap<i64, i64> = HashMap::from([(1, 1_000), (2, 60)]);
        let checks = balance_checks(&BalanceFacts {
            book: &obs.book,
            replays: &obs,
            balances: &good,
            db_mismatches: Some(&[]),
        });
        assert_eq!(failed(&checks), Vec::<&str>::new(), "{checks:#?}");

        // The key credited twice, user 1 got both, user 2 could not be read.
        obs.replays.get_mut("k").unwrap().insert(102);
        let bad: HashMap<i64, i64> = HashMap::from([(1, 2_000)]);
        let mismatch = [LedgerMismatch {
            user: 1,
            balance: 2_000,
            ledger_sum: 1_000,
        }];
        let checks = balance_checks(&BalanceFacts {
            book: &obs.book,
            replays: &obs,
            balances: &bad,
            db_mismatches: Some(&mismatch),
        });
        assert_eq!(
            failed(&checks),
            vec![
                "balance == balance before + distinct successful charges - successful payments + distinct successful refunds",
                "a repeated idempotency key credits once",
                "balance == sum of its ledger (Postgres)",
            ]
        );
        assert_eq!(
            checks[0].detail,
            "2 of 2 violate it, e.g. user 1: expected 1000, got 2000 (+1000); \
             user 2: balance could not be read (net off by +1000 won)"
        );
    }
}
