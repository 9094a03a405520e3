//! What the workers saw, kept for the invariant checks. Each worker fills its own
//! [`Observed`]; they are merged after the run.

use std::collections::{BTreeMap, BTreeSet};

use super::{ledger::BalanceBook, lifecycle::LifeSeen};

/// An order the server confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlacedOrder {
    pub order_id: i64,
    pub user_id: i64,
    pub units: i64,
    /// What Pay will deduct.
    pub amount: i64,
}

/// A payment the server confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PaymentSeen {
    pub payment_id: i64,
    pub order_id: i64,
    pub user_id: i64,
    pub amount: i64,
}

/// A count of things that went wrong, with the first few described.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Problems {
    pub count: u64,
    pub examples: Vec<String>,
}

impl Problems {
    const MAX_EXAMPLES: usize = 5;

    /// Counts one problem; `describe` runs only while examples are still wanted.
    pub fn add(&mut self, describe: impl FnOnce() -> String) {
        self.add_n(1, describe);
    }

    /// Counts `n` problems described alike.
    pub fn add_n(&mut self, n: u64, describe: impl FnOnce() -> String) {
        self.count += n;
        if self.examples.len() < Self::MAX_EXAMPLES {
            self.examples.push(describe());
        }
    }

    pub fn merge(&mut self, other: Problems) {
        self.count += other.count;
        let room = Self::MAX_EXAMPLES.saturating_sub(self.examples.len());
        self.examples.extend(other.examples.into_iter().take(room));
    }
}

#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Users who got the coupon.
    pub coupon_winners: Vec<i64>,
    pub orders: Vec<PlacedOrder>,
    /// Units asked for by PlaceOrder calls of unknown outcome.
    pub unsure_order_units: i64,
    pub payments: Vec<PaymentSeen>,
    /// Orders whose Pay had an unknown outcome.
    pub unsure_pays: Vec<i64>,
    /// Repeated Pays that were not refused as ALREADY_EXISTS.
    pub repeat_pays: Problems,
    /// Checkouts sent again with their key that did not return the same order.
    pub repeat_checkouts: Problems,
    /// Holders asking for their coupon again who were not told ALREADY_EXISTS with its id.
    pub repeat_coupons: Problems,
    /// Health checks answered with anything but SERVING.
    pub health_problems: Problems,
    /// GetPopularProducts answers checked, and the ill-formed ones.
    pub popular_answers: u64,
    pub popular_problems: Problems,
    /// ListOrders pages checked, and the ill-formed ones.
    pub order_pages: u64,
    pub page_problems: Problems,
    pub book: BalanceBook,
    /// What the lifecycle scenario saw.
    pub lifecycle: LifeSeen,
    /// Ledger entries returned per charge idempotency key: one each, however often it is sent.
    pub replays: BTreeMap<String, BTreeSet<i64>>,
}

impl Observed {
    pub fn merge(&mut self, other: Observed) {
        self.coupon_winners.extend(other.coupon_winners);
        self.orders.extend(other.orders);
        self.unsure_order_units += other.unsure_order_units;
        self.payments.extend(other.payments);
        self.unsure_pays.extend(other.unsure_pays);
        self.repeat_pays.merge(other.repeat_pays);
        self.repeat_checkouts.merge(other.repeat_checkouts);
        self.repeat_coupons.merge(other.repeat_coupons);
        self.health_problems.merge(other.health_problems);
        self.popular_answers += other.popular_answers;
        self.popular_problems.merge(other.popular_problems);
        self.order_pages += other.order_pages;
        self.page_problems.merge(other.page_problems);
        self.book.merge(other.book);
        self.lifecycle.merge(other.lifecycle);
        for (key, ids) in other.replays {
            self.replays.entry(key).or_default().extend(ids);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_keep_every_count_but_only_a_few_examples() {
        let mut a = Problems::default();
        for i in 0..4 {
            a.add(|| format!("a{i}"));
        }
        let mut b = Problems::default();
        for i in 0..4 {
            b.add(|| format!("b{i}"));
        }
        a.merge(b);
        assert_eq!(a.count, 8);
        assert_eq!(a.examples, vec!["a0", "a1", "a2", "a3", "b0"]);
    }

    #[test]
    fn merging_concatenates_and_unions() {
        let mut a = Observed::default();
        a.coupon_winners.push(1);
        a.replays.entry("k".into()).or_default().insert(5);
        let mut b = Observed::default();
        b.coupon_winners.push(2);
        b.unsure_order_units = 3;
        b.replays.entry("k".into()).or_default().insert(6);
        a.merge(b);
        assert_eq!(a.coupon_winners, vec![1, 2]);
        assert_eq!(a.unsure_order_units, 3);
        assert_eq!(a.replays["k"].len(), 2);
    }
}
