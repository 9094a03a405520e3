//! The operations a worker performs and the weighted mix it draws them from.
//!
//! Guarantees: a parsed [`Weights`] has at least one operation with a positive weight, names each
//! operation at most once, and [`Weights::pick`] maps a roll in `0..total` onto operations in
//! exact proportion to their weights.

use std::{fmt, str::FromStr};

/// One unit of work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// IssueCoupon for a user who never asked before.
    Coupon,
    /// IssueCoupon again for a user who holds the coupon since the set-up.
    CouponAgain,
    /// PlaceOrder for one unit; the order waits for a later [`Op::Pay`].
    Order,
    /// Pay the oldest order this worker placed and has not paid (places one when none waits).
    Pay,
    /// PlaceOrder for one unit, then Pay it at once.
    OrderThenPay,
    /// Pay order number `n` of those placed during the set-up (the pay-only scenario).
    PayPrepared,
    Popular,
    Charge,
    /// `grpc.health.v1.Health/Check` of the whole server.
    Health,
    /// SetItem (1..=3 units of the product) into a buyer's cart, then a keyed Checkout; one in
    /// ten is sent again with the same key and must return the same order.
    Checkout,
    /// The next ListOrders page of the worker's walk through one buyer's orders.
    ListOrders,
    /// One order's whole life: placed, then cancelled, left open, or paid and refunded in part
    /// or in full, and listed ([`crate::lifecycle`]).
    Lifecycle,
}

impl Op {
    /// The names `--weights` accepts.
    const NAMED: [(&'static str, Op); 6] = [
        ("coupon", Op::Coupon),
        ("order", Op::Order),
        ("pay", Op::Pay),
        ("popular", Op::Popular),
        ("charge", Op::Charge),
        ("checkout", Op::Checkout),
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Coupon => "coupon",
            Op::CouponAgain => "coupon-again",
            Op::Order => "order",
            Op::Pay => "pay",
            Op::OrderThenPay => "order-then-pay",
            Op::PayPrepared => "pay-prepared",
            Op::Popular => "popular",
            Op::Charge => "charge",
            Op::Health => "health",
            Op::Checkout => "checkout",
            Op::ListOrders => "list-orders",
            Op::Lifecycle => "lifecycle",
        }
    }
}

/// Operations with positive weights, as cumulative upper bounds for picking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Weights {
    cumulative: Vec<(Op, u32)>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WeightsError {
    #[error("`{0}` is not NAME=WEIGHT")]
    Malformed(String),
    #[error("unknown operation `{0}` (expected coupon, order, pay, popular, charge or checkout)")]
    UnknownOp(String),
    #[error("`{0}` is given twice")]
    Repeated(String),
    #[error("weight `{0}` is not a whole number from 0 to 1000000")]
    BadWeight(String),
    #[error("no operation has a positive weight")]
    Empty,
}

impl Weights {
    /// At most this much per operation, so the sum never overflows.
    const MAX_WEIGHT: u32 = 1_000_000;

    /// Every unit of work is `op`.
    pub fn only(op: Op) -> Self {
        Self {
            cumulative: vec![(op, 1)],
        }
    }

    pub fn from_pairs(pairs: &[(Op, u32)]) -> Result<Self, WeightsError> {
        let mut cumulative = Vec::with_capacity(pairs.len());
        let mut sum = 0u32;
        for &(op, weight) in pairs {
            if cumulative.iter().any(|&(seen, _)| seen == op) {
                return Err(WeightsError::Repeated(op.name().into()));
            }
            if weight > Self::MAX_WEIGHT {
                return Err(WeightsError::BadWeight(weight.to_string()));
            }
            if weight > 0 {
                sum += weight;
                cumulative.push((op, sum));
            }
        }
        if cumulative.is_empty() {
            return Err(WeightsError::Empty);
        }
        Ok(Self { cumulative })
    }

    /// The sum of the weights: rolls for [`Weights::pick`] are drawn from `0..total`.
    pub fn total(&self) -> u32 {
        self.cumulative.last().map_or(0, |&(_, sum)| sum)
    }

    /// The operation whose share of `0..total` contains `roll`.
    pub fn pick(&self, roll: u32) -> Op {
        let i = self.cumulative.partition_point(|&(_, upper)| upper <= roll);
        // A roll past the total is a caller's mistake; the last operation absorbs it.
        self.cumulative
            .get(i)
            .or(self.cumulative.last())
            .map_or(Op::Popular, |&(op, _)| op)
    }

    pub fn contains(&self, op: Op) -> bool {
        self.cumulative.iter().any(|&(o, _)| o == op)
    }

    /// Each operation with its own weight.
    pub fn pairs(&self) -> Vec<(Op, u32)> {
        let mut previous = 0;
        self.cumulative
            .iter()
            .map(|&(op, upper)| {
                let weight = upper - previous;
                previous = upper;
                (op, weight)
            })
            .collect()
    }
}

impl FromStr for Weights {
    type Err = WeightsError;

    /// `coupon=10,order=30,pay=30,popular=20,charge=10`; spaces around items are ignored and
    /// operations not named get weight 0.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut pairs = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, weight) = item
                .split_once('=')
                .ok_or_else(|| WeightsError::Malformed(item.into()))?;
            let name = name.trim().to_ascii_lowercase();
            let op = Op::NAMED
                .iter()
                .find(|(n, _)| *n == name)
                .map(|&(_, op)| op)
                .ok_or_else(|| WeightsError::UnknownOp(name.clone()))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| WeightsError::BadWeight(weight.trim().into()))?;
            pairs.push((op, weight));
        }
        Self::from_pairs(&pairs)
    }
}

impl fmt::Display for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .pairs()
            .iter()
            .map(|(op, w)| format!("{}={w}", op.name()))
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_default() {
        let w: Weights = "coupon=10,order=30,pay=30,popular=20,charge=10"
            .parse()
            .unwrap();
        assert_eq!(w.total(), 100);
        assert_eq!(
            w.pairs(),
            vec![
                (Op::Coupon, 10),
                (Op::Order, 30),
                (Op::Pay, 30),
                (Op::Popular, 20),
                (Op::Charge, 10)
            ]
        );
        assert_eq!(
            w.to_string(),
            "coupon=10,order=30,pay=30,popular=20,charge=10"
        );
    }

    #[test]
    fn picks_in_exact_proportion() {
        let w: Weights = " coupon = 1 , charge=3, pay=0 ".parse().unwrap();
        assert!(!w.contains(Op::Pay), "weight 0 leaves the operation out");
        let picks: Vec<Op> = (0..w.total()).map(|r| w.pick(r)).collect();
        assert_eq!(picks, vec![Op::Coupon, Op::Charge, Op::Charge, Op::Charge]);
        assert_eq!(w.pick(99), Op::Charge, "past the total: the last one");
        assert_eq!(Weights::only(Op::Popular).pick(0), Op::Popular);
    }

    #[test]
    fn refuses_malformed_weights() {
        let err = |s: &str| s.parse::<Weights>().unwrap_err();
        assert_eq!(err("coupon"), WeightsError::Malformed("coupon".into()));
        assert_eq!(err("refund=3"), WeightsError::UnknownOp("refund".into()));
        assert_eq!(
            err("coupon=1,COUPON=2"),
            WeightsError::Repeated("coupon".into())
        );
        assert_eq!(err("pay=-1"), WeightsError::BadWeight("-1".into()));
        assert_eq!(err("pay=1.5"), WeightsError::BadWeight("1.5".into()));
        assert_eq!(
            err("pay=2000000"),
            WeightsError::BadWeight("2000000".into())
        );
        assert_eq!(err("pay=0,order=0"), WeightsError::Empty);
        assert_eq!(err(""), WeightsError::Empty);
    }
}
