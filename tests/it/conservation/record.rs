//! What the RPCs reported, as the workers saw it: every charge, payment, refund, order and issued
//! coupon by id, every outcome counted, and what was wrong on the spot (a key credited twice, an order
//! priced or owned wrong, a refusal that cannot happen in this workload). The books are checked
//! against this record, so that nothing stored goes unreported and nothing reported is lost.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use ecommerce::{
    code_name,
    proto::{Order, OrderStatus, Refund},
};
use tonic::Status;
use tonic_types::StatusExt;

use super::shop::Shop;

#[derive(Clone, Debug)]
pub(super) struct Placed {
    pub(super) user: i64,
    pub(super) final_amount: i64,
    /// (product, quantity) of each line.
    pub(super) items: Vec<(i64, i32)>,
}

/// A refund as its answer reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Refunded {
    pub(super) user: i64,
    pub(super) order: i64,
    pub(super) amount: i64,
}

#[derive(Default)]
pub(super) struct Record {
    /// Successful charges by ledger entry id: a replayed key reports the same id, so summing
    /// over ids counts each key once.
    pub(super) charges: HashMap<i64, (i64, i64)>,
    /// Successful payments by payment id: (user, order, amount).
    pub(super) payments: HashMap<i64, (i64, i64, i64)>,
    pub(super) paid_orders: HashMap<i64, i64>,
    /// Every order paid, in order: what refunds pick from.
    pub(super) paid_list: Vec<i64>,
    /// Successful refunds by refund id: a replayed key reports the same id.
    pub(super) refunds: HashMap<i64, Refunded>,
    pub(super) orders: HashMap<i64, Placed>,
    /// Every order placed, in order, with its buyer: what cancels and payments pick from.
    pub(super) order_list: Vec<(i64, i64)>,
    /// Issued user coupons: id -> (user, coupon).
    pub(super) issued: HashMap<i64, (i64, i64)>,
    pub(super) coupons_of: HashMap<i64, Vec<i64>>,
    /// Keyed stock adjustments answered OK at least once: key -> delta (applied once per key).
    pub(super) adjustments: HashMap<String, i64>,
    pub(super) outcomes: BTreeMap<(&'static str, String), usize>,
    pub(super) violations: Vec<String>,
}

pub(super) struct Shared {
    pub(super) record: Mutex<Record>,
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
    pub(super) fn with<R>(&self, f: impl FnOnce(&mut Record) -> R) -> R {
        f(&mut self.record.lock().unwrap())
    }

    pub(super) fn violation(&self, message: String) {
        self.with(|r| r.violations.push(message));
    }

    /// Counts the answer and checks it is OK or one of the refusals `allowed` for this operation
    /// in this workload (by ErrorInfo reason). Anything else (INTERNAL, UNAVAILABLE, a refusal
    /// that cannot happen here) is a violation.
    pub(super) fn note<T>(&self, op: &'static str, result: &Result<T, Status>, allowed: &[&str]) {
        let outcome = outcome(result);
        if let Err(status) = result {
            let reason = status.get_details_error_info().map(|i| i.reason);
            if !reason.is_some_and(|r| allowed.contains(&r.as_str())) {
                self.violation(format!("{op}: unexpected {outcome}: {status:?}"));
            }
        }
        self.with(|r| *r.outcomes.entry((op, outcome)).or_default() += 1);
    }

    pub(super) fn charged(&self, history_id: i64, user: i64, amount: i64) {
        self.with(|r| match r.charges.insert(history_id, (user, amount)) {
            Some(earlier) if earlier != (user, amount) => r.violations.push(format!(
                "ledger entry {history_id} reported for {earlier:?} and for {:?}",
                (user, amount)
            )),
            _ => {}
        });
    }

    pub(super) fn placed(&self, shop: &Shop, user: i64, coupon: Option<i64>, order: &Order) {
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
                items: order
                    .items
                    .iter()
                    .map(|i| (i.product_id, i.quantity))
                    .collect(),
            };
            if r.orders.insert(order.id, placed).is_none() {
                r.order_list.push((order.id, user));
            }
        });
    }

    pub(super) fn paid(&self, payment_id: i64, user: i64, order: i64, amount: i64) {
        self.with(|r| {
            match r.orders.get(&order) {
                Some(placed) if placed.user == user && placed.final_amount == amount => {}
                other => r.violations.push(format!(
                    "payment {payment_id} of {amount} by user {user} for order {order}, placed as {other:?}"
                )),
            }
            match r.paid_orders.insert(order, payment_id) {
                Some(earlier) if earlier != payment_id => r.violations.push(format!(
                    "order {order} paid twice: payments {earlier} and {payment_id}"
                )),
                Some(_) => {}
                None => r.paid_list.push(order),
            }
            r.payments.insert(payment_id, (user, order, amount));
        });
    }

    /// A refund answered OK: it must refund an order this record saw paid, to its buyer, and
    /// never take the order's refunds past what it paid.
    pub(super) fn refunded(&self, refund: &Refund) {
        self.with(|r| {
            let reported = Refunded {
                user: refund.user_id,
                order: refund.order_id,
                amount: refund.amount,
            };
            match r.refunds.insert(refund.id, reported.clone()) {
                Some(earlier) if earlier != reported => r.violations.push(format!(
                    "refund {} reported as {earlier:?} and as {reported:?}",
                    refund.id
                )),
                Some(_) => return,
                None => {}
            }
            let placed = r.orders.get(&refund.order_id);
            let given: i64 = r
                .refunds
                .values()
                .filter(|x| x.order == refund.order_id)
                .map(|x| x.amount)
                .sum();
            match placed {
                Some(p) if p.user == refund.user_id && given <= p.final_amount => {}
                other => r.violations.push(format!(
                    "refund {refund:?} (order's refunds now {given}) of order placed as {other:?}"
                )),
            }
            if !r.paid_orders.contains_key(&refund.order_id) {
                r.violations
                    .push(format!("refund {} of an order never paid", refund.id));
            }
        });
    }
}
