//! The scenarios and what each one needs: the mix of operations, the fixtures it creates, and
//! when it stops.
//!
//! Guarantees: [`Scenario::plan`] refuses sizes the server would refuse or the user-id block
//! cannot hold, so a run never fails half-way through its set-up for a reason known up front.

use std::time::Duration;

use anyhow::{bail, ensure};

use super::{
    listing::Listing,
    users::UserSpace,
    weights::{Op, Weights},
};

/// Unit price of the load-tested product, in won.
pub const PRICE: i64 = 1_000;
/// Unit price of the lifecycle scenario's second product, in won: not a multiple of the
/// first, so that orders of both have lines of unequal totals.
pub const SECOND_PRICE: i64 = 2_500;
/// What each lifecycle buyer is charged before the run: orders of at most 6 units of
/// [`SECOND_PRICE`] cost 15,000 won, so this pays for over 6,000 of them (refunds give back).
pub const LIFECYCLE_FUNDS: i64 = 100_000_000;
/// The discount of the stampede coupon, in won.
pub const COUPON_DISCOUNT: i64 = 1_000;
/// When neither `--requests` nor `--duration` is given and the scenario has no natural size.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// The server's bound on a coupon's total quantity.
const MAX_COUPON_STOCK: i64 = 1_000_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// `users` distinct users ask once each for a coupon with `stock` copies.
    CouponStampede { users: u64, stock: i64 },
    /// Buyers order one unit of a single product (then pay it) until it sells out and beyond.
    HotProduct {
        stock: i64,
        buyers: u64,
        /// Orders each buyer can afford; by default twice the fair share, plus one.
        orders_per_buyer: Option<u64>,
    },
    /// `orders` one-unit orders, spread over `buyers` funded for them, are placed during the
    /// set-up (untimed); the run then pays each once: Pay alone, as pgbench's naive payment
    /// (bench/naive_pay.sql) pays ready-made orders of distinct buyers in turn.
    PayOnly { orders: u64, buyers: u64 },
    /// GetPopularProducts reads.
    Popular { days: i32, limit: i32 },
    /// Small charges to `users` users, some repeating an idempotency key on purpose.
    Charge { users: u64 },
    /// Buyers put 1..=3 units of one product in their cart and check it out (keyed, one in
    /// ten sent again with the same key), until it sells out and beyond.
    Cart {
        stock: i64,
        buyers: u64,
        orders_per_buyer: Option<u64>,
    },
    /// A weighted blend of all of the above on shared fixtures.
    Mixed(Mixed),
    /// Health checks (`grpc.health.v1.Health/Check`): the cheapest call the server answers,
    /// the floor other paths' cost per call is measured against.
    Health,
    /// `holders` users get one coupon each during set-up, then ask for it again and again
    /// (double clicks, impatient retries): every answer must be ALREADY_EXISTS naming the
    /// holder's own coupon.
    CouponRepeat { holders: u64 },
    /// ListOrders walks through one buyer's order history, which must hold `min_orders`.
    ListOrders(Listing),
    /// Orders of one or two products with `stock` units each live their whole life: placed,
    /// cancelled, left open, or paid and refunded in part or in full, and listed; the
    /// invariants are checked in Postgres.
    Lifecycle { stock: i64, buyers: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mixed {
    pub weights: Weights,
    pub coupon_stock: i64,
    pub stock: i64,
    /// Buyers, who are also the users charged.
    pub buyers: u64,
    pub orders_per_buyer: Option<u64>,
    pub days: i32,
    pub limit: i32,
}

impl Default for Mixed {
    fn default() -> Self {
        Self {
            weights: Weights::from_pairs(&[
                (Op::Coupon, 10),
                (Op::Order, 30),
                (Op::Pay, 30),
                (Op::Popular, 20),
                (Op::Charge, 10),
            ])
            .expect("the default weights are valid"),
            coupon_stock: 1_000,
            stock: 100_000,
            buyers: 1_000,
            orders_per_buyer: None,
            days: 3,
            limit: 5,
        }
    }
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::CouponStampede { .. } => "coupon-stampede",
            Scenario::HotProduct { .. } => "hot-product",
            Scenario::PayOnly { .. } => "pay-only",
            Scenario::Popular { .. } => "popular",
            Scenario::Charge { .. } => "charge",
            Scenario::Cart { .. } => "cart",
            Scenario::Mixed(_) => "mixed",
            Scenario::Health => "health",
            Scenario::CouponRepeat { .. } => "coupon-repeat",
            Scenario::ListOrders(_) => "list-orders",
            Scenario::Lifecycle { .. } => "lifecycle",
        }
    }

    pub fn plan(&self) -> anyhow::Result<Plan> {
        let plan = match self {
            &Scenario::CouponStampede { users, stock } => Plan {
                weights: Weights::only(Op::Coupon),
                natural_size: Some(users),
                coupon_stock: Some(stock),
                ..Plan::default()
            },
            &Scenario::HotProduct {
                stock,
                buyers,
                orders_per_buyer,
            } => selling_out(Op::OrderThenPay, 1, stock, buyers, orders_per_buyer)?,
            // Each buyer is funded for exactly their share of the orders, and the product has a
            // unit for each: neither can refuse a Pay or a prepared order.
            &Scenario::PayOnly { orders, buyers } => Plan {
                weights: Weights::only(Op::PayPrepared),
                natural_size: Some(orders),
                product_stock: Some(i64::try_from(orders).unwrap_or(i64::MAX)),
                buyers,
                fund_each: fund_each(0, buyers, Some(orders.div_ceil(buyers.max(1)).max(1)))?,
                prepared_orders: orders,
                ..Plan::default()
            },
            &Scenario::Popular { days, limit } => Plan {
                weights: Weights::only(Op::Popular),
                default_duration: Some(DEFAULT_DURATION),
                popular: (days, limit),
                ..Plan::default()
            },
            Scenario::Health => Plan {
                weights: Weights::only(Op::Health),
                default_duration: Some(DEFAULT_DURATION),
                ..Plan::default()
            },
            // A spare seat per holder: a repeat mistaken for a first request would win one, and
            // show in the remaining count.
            &Scenario::CouponRepeat { holders } => Plan {
                weights: Weights::only(Op::CouponAgain),
                default_duration: Some(DEFAULT_DURATION),
                coupon_stock: Some(i64::try_from(holders.saturating_mul(2)).unwrap_or(i64::MAX)),
                holders,
                ..Plan::default()
            },
            &Scenario::Charge { users } => Plan {
                weights: Weights::only(Op::Charge),
                default_duration: Some(DEFAULT_DURATION),
                charged: users,
                ..Plan::default()
            },
            // Two units a checkout on average.
            &Scenario::Cart {
                stock,
                buyers,
                orders_per_buyer,
            } => selling_out(Op::Checkout, 2, stock, buyers, orders_per_buyer)?,
            &Scenario::ListOrders(listing) => Plan {
                weights: Weights::only(Op::ListOrders),
                default_duration: Some(DEFAULT_DURATION),
                listing: Some(listing),
                ..Plan::default()
            },
            &Scenario::Lifecycle { stock, buyers } => Plan {
                weights: Weights::only(Op::Lifecycle),
                default_duration: Some(DEFAULT_DURATION),
                product_stock: Some(stock),
                products: 2,
                buyers,
                fund_each: LIFECYCLE_FUNDS,
                checked_in_postgres: true,
                ..Plan::default()
            },
            Scenario::Mixed(m) => {
                let needs_stock = [Op::Order, Op::Pay, Op::Checkout]
                    .iter()
                    .any(|&op| m.weights.contains(op));
                let needs_buyers = needs_stock || m.weights.contains(Op::Charge);
                Plan {
                    weights: m.weights.clone(),
                    default_duration: Some(DEFAULT_DURATION),
                    coupon_stock: m.weights.contains(Op::Coupon).then_some(m.coupon_stock),
                    product_stock: needs_stock.then_some(m.stock),
                    buyers: if needs_stock { m.buyers } else { 0 },
                    fund_each: if needs_stock {
                        fund_each(m.stock, m.buyers, m.orders_per_buyer)?
                    } else {
                        0
                    },
                    charged: if needs_buyers { m.buyers } else { 0 },
                    popular: (m.days, m.limit),
                    ..Plan::default()
                }
            }
        };
        plan.validate()?;
        Ok(plan)
    }
}

/// What a run needs before its first measured call, and when it stops by default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub weights: Weights,
    /// A hard cap on units of work (the stampede's users).
    pub natural_size: Option<u64>,
    /// Used when neither `--requests` nor `--duration` is given.
    pub default_requests: Option<u64>,
    pub default_duration: Option<Duration>,
    pub coupon_stock: Option<i64>,
    pub product_stock: Option<i64>,
    /// Products created with `product_stock` units each (prices [`PRICE`], [`SECOND_PRICE`]).
    pub products: usize,
    /// The scenario's invariants need `--database-url`.
    pub checked_in_postgres: bool,
    /// Pool users `0..buyers` place orders; each is charged `fund_each` first.
    pub buyers: u64,
    pub fund_each: i64,
    /// Pool users `0..charged` receive random charges.
    pub charged: u64,
    /// Coupon users `0..holders` are issued the coupon during set-up.
    pub holders: u64,
    pub popular: (i32, i32),
    /// The buyer whose orders the workers list.
    pub listing: Option<Listing>,
    /// One-unit orders placed during the set-up, round-robin over the buyers, for the
    /// workers to pay.
    pub prepared_orders: u64,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            weights: Weights::only(Op::Popular),
            natural_size: None,
            default_requests: None,
            default_duration: None,
            coupon_stock: None,
            product_stock: None,
            products: 1,
            checked_in_postgres: false,
            buyers: 0,
            fund_each: 0,
            charged: 0,
            holders: 0,
            popular: (3, 5),
            listing: None,
            prepared_orders: 0,
        }
    }
}

impl Plan {
    /// Users whose balance the run tracks.
    pub fn pool(&self) -> u64 {
        self.buyers.max(self.charged)
    }

    /// Units of work and seconds after which the run stops, from the options given.
    pub fn stop(
        &self,
        requests: Option<u64>,
        duration: Option<Duration>,
    ) -> (Option<u64>, Option<Duration>) {
        let (requests, duration) = if requests.is_none() && duration.is_none() {
            (self.default_requests, self.default_duration)
        } else {
            (requests, duration)
        };
        let requests = match (self.natural_size, requests) {
            (Some(n), Some(r)) => Some(n.min(r)),
            (n, r) => n.or(r),
        };
        (requests, duration)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if let Some(n) = self.natural_size {
            let what = if self.prepared_orders > 0 {
                "--orders"
            } else {
                "--users"
            };
            ensure!(n >= 1, "{what} must be at least 1");
        }
        if let Some(stock) = self.coupon_stock {
            ensure!(
                (1..=MAX_COUPON_STOCK).contains(&stock),
                "the coupon stock must be 1..={MAX_COUPON_STOCK}, got {stock}"
            );
        }
        if let Some(stock) = self.product_stock {
            ensure!(stock >= 1, "--stock must be at least 1, got {stock}");
            ensure!(self.buyers >= 1, "--buyers must be at least 1");
        }
        if self.weights.contains(Op::Charge) {
            ensure!(self.charged >= 1, "--users must be at least 1");
        }
        if self.weights.contains(Op::CouponAgain) {
            ensure!(self.holders >= 1, "--holders must be at least 1");
        }
        ensure!(
            self.pool() <= UserSpace::MAX_POOL,
            "at most {} buyers or charged users",
            UserSpace::MAX_POOL
        );
        if let Some(listing) = self.listing {
            ensure!(
                listing.user_id > 0,
                "--user-id must be positive, got {}",
                listing.user_id
            );
            ensure!(
                (1..=100).contains(&listing.page_size),
                "--page-size must be 1..=100, got {}",
                listing.page_size
            );
        }
        if self.weights.contains(Op::Popular) {
            let (days, limit) = self.popular;
            ensure!(
                (1..=30).contains(&days),
                "--days must be 1..=30, got {days}"
            );
            ensure!(
                (1..=100).contains(&limit),
                "--limit must be 1..=100, got {limit}"
            );
        }
        Ok(())
    }
}

/// A run of `op` (taking `units_per_call` units on average) on one product until it sells out
/// and beyond, so that OUT_OF_STOCK refusals are measured too.
fn selling_out(
    op: Op,
    units_per_call: u64,
    stock: i64,
    buyers: u64,
    orders_per_buyer: Option<u64>,
) -> anyhow::Result<Plan> {
    let calls = u64::try_from(stock).unwrap_or(0) / units_per_call;
    Ok(Plan {
        weights: Weights::only(op),
        default_requests: Some(calls.saturating_add((calls / 5).max(100))),
        product_stock: Some(stock),
        buyers,
        fund_each: fund_each(stock, buyers, orders_per_buyer)?,
        ..Plan::default()
    })
}

/// What each buyer is charged before the run: `orders_per_buyer` one-unit orders, by default
/// twice a fair share of the stock plus one, because buyers are picked at random and some are
/// picked more often than others.
fn fund_each(stock: i64, buyers: u64, orders_per_buyer: Option<u64>) -> anyhow::Result<i64> {
    if buyers == 0 {
        bail!("--buyers must be at least 1");
    }
    let orders = match orders_per_buyer {
        Some(k) => k,
        None => {
            let stock = u64::try_from(stock).unwrap_or(0);
            2 * stock.div_ceil(buyers) + 1
        }
    };
    i64::try_from(orders)
        .ok()
        .and_then(|k| k.checked_mul(PRICE))
        .filter(|&amount| amount > 0)
        .ok_or_else(|| anyhow::anyhow!("--orders-per-buyer must be 1..={}", i64::MAX / PRICE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stampede_stops_at_its_users_unless_told_sooner() {
        let plan = Scenario::CouponStampede {
            users: 300,
            stock: 30,
        }
        .plan()
        .unwrap();
        assert_eq!(plan.stop(None, None), (Some(300), None));
        assert_eq!(plan.stop(Some(100), None), (Some(100), None));
        assert_eq!(plan.stop(Some(1000), None), (Some(300), None));
        let secs = Some(Duration::from_secs(1));
        assert_eq!(plan.stop(None, secs), (Some(300), secs));
    }

    #[test]
    fn hot_product_defaults_to_selling_out_and_beyond() {
        let plan = Scenario::HotProduct {
            stock: 100_000,
            buyers: 1_000,
            orders_per_buyer: None,
        }
        .plan()
        .unwrap();
        assert_eq!(plan.stop(None, None), (Some(120_000), None));
        assert_eq!(plan.fund_each, 201 * PRICE);
        let small = Scenario::HotProduct {
            stock: 30,
            buyers: 10,
            orders_per_buyer: Some(4),
        }
        .plan()
        .unwrap();
        assert_eq!(small.stop(None, None), (Some(130), None));
        assert_eq!(small.fund_each, 4 * PRICE);
        let secs = Some(Duration::from_secs(5));
        assert_eq!(small.stop(None, secs), (None, secs));
    }

    #[test]
    fn pay_only_pays_each_prepared_order_once() {
        let plan = Scenario::PayOnly {
            orders: 20_000,
            buyers: 10_000,
        }
        .plan()
        .unwrap();
        assert_eq!(plan.weights, Weights::only(Op::PayPrepared));
        assert_eq!(plan.prepared_orders, 20_000);
        assert_eq!(plan.stop(None, None), (Some(20_000), None));
        assert_eq!(plan.stop(Some(500), None), (Some(500), None));
        assert_eq!(plan.product_stock, Some(20_000));
        assert_eq!((plan.buyers, plan.fund_each), (10_000, 2 * PRICE));
        let uneven = Scenario::PayOnly {
            orders: 7,
            buyers: 3,
        }
        .plan()
        .unwrap();
        assert_eq!(uneven.fund_each, 3 * PRICE, "a buyer has up to 3 of the 7");
        for bad in [
            Scenario::PayOnly {
                orders: 0,
                buyers: 1,
            },
            Scenario::PayOnly {
                orders: 1,
                buyers: 0,
            },
        ] {
            assert!(bad.plan().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_cart_scenario_checks_out_past_the_sell_out() {
        let plan = Scenario::Cart {
            stock: 1_000,
            buyers: 100,
            orders_per_buyer: None,
        }
        .plan()
        .unwrap();
        assert_eq!(plan.weights, Weights::only(Op::Checkout));
        assert_eq!(plan.stop(None, None), (Some(600), None));
        assert_eq!(plan.product_stock, Some(1_000));
        assert_eq!(plan.fund_each, 21 * PRICE);
    }

    #[test]
    fn open_ended_scenarios_run_ten_seconds_by_default() {
        let plan = Scenario::Charge { users: 50 }.plan().unwrap();
        assert_eq!(plan.stop(None, None), (None, Some(DEFAULT_DURATION)));
        assert_eq!(plan.pool(), 50);
        assert_eq!(plan.stop(Some(7), None), (Some(7), None));
    }

    #[test]
    fn repeat_holders_get_one_seat_each_and_the_floor_needs_no_fixture() {
        let plan = Scenario::CouponRepeat { holders: 500 }.plan().unwrap();
        assert_eq!(plan.weights, Weights::only(Op::CouponAgain));
        assert_eq!((plan.coupon_stock, plan.holders), (Some(1_000), 500));
        assert_eq!(plan.stop(None, None), (None, Some(DEFAULT_DURATION)));
        let floor = Scenario::Health.plan().unwrap();
        assert_eq!(floor.weights, Weights::only(Op::Health));
        assert_eq!(
            (floor.coupon_stock, floor.product_stock, floor.pool()),
            (None, None, 0)
        );
    }

    #[test]
    fn mixed_creates_only_what_its_weights_use() {
        let plan = Scenario::Mixed(Mixed {
            weights: "popular=1,charge=1".parse().unwrap(),
            ..Mixed::default()
        })
        .plan()
        .unwrap();
        assert_eq!((plan.coupon_stock, plan.product_stock), (None, None));
        assert_eq!((plan.buyers, plan.charged), (0, 1_000));
        let full = Scenario::Mixed(Mixed::default()).plan().unwrap();
        assert_eq!(full.coupon_stock, Some(1_000));
        assert_eq!(full.product_stock, Some(100_000));
        assert_eq!(full.pool(), 1_000);
    }

    #[test]
    fn impossible_sizes_are_refused_up_front() {
        let bad = [
            Scenario::CouponStampede { users: 0, stock: 1 },
            Scenario::CouponStampede {
                users: 1,
                stock: 1_000_001,
            },
            Scenario::HotProduct {
                stock: 0,
                buyers: 1,
                orders_per_buyer: None,
            },
            Scenario::HotProduct {
                stock: 1,
                buyers: 0,
                orders_per_buyer: None,
            },
            Scenario::HotProduct {
                stock: 1,
                buyers: 1,
                orders_per_buyer: Some(u64::MAX),
            },
            Scenario::Popular { days: 0, limit: 5 },
            Scenario::Popular {
                days: 3,
                limit: 101,
            },
            Scenario::Charge { users: 0 },
            Scenario::Charge { users: 1 << 40 },
            Scenario::CouponRepeat { holders: 0 },
            Scenario::CouponRepeat { holders: 500_001 },
        ];
        for scenario in bad {
            assert!(scenario.plan().is_err(), "{scenario:?} should be refused");
        }
    }

    #[test]
    fn the_lifecycle_orders_two_products_and_needs_postgres() {
        let plan = Scenario::Lifecycle {
            stock: 1_000,
            buyers: 20,
        }
        .plan()
        .unwrap();
        assert_eq!(plan.weights, Weights::only(Op::Lifecycle));
        assert_eq!((plan.product_stock, plan.products), (Some(1_000), 2));
        assert_eq!((plan.buyers, plan.fund_each), (20, LIFECYCLE_FUNDS));
        assert!(plan.checked_in_postgres);
        assert_eq!(plan.stop(None, None), (None, Some(DEFAULT_DURATION)));
        for bad in [
            Scenario::Lifecycle {
                stock: 0,
                buyers: 1,
            },
            Scenario::Lifecycle {
                stock: 1,
                buyers: 0,
            },
        ] {
            assert!(bad.plan().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn list_orders_reads_for_ten_seconds_and_checks_its_sizes() {
        let listing = Listing {
            user_id: Listing::DEFAULT_USER,
            min_orders: 10,
            page_size: 20,
        };
        let plan = Scenario::ListOrders(listing).plan().unwrap();
        assert_eq!(plan.weights, Weights::only(Op::ListOrders));
        assert_eq!(plan.stop(None, None), (None, Some(DEFAULT_DURATION)));
        assert_eq!(plan.pool(), 0, "no buyer is funded");
        for bad in [
            Listing {
                page_size: 101,
                ..listing
            },
            Listing {
                user_id: 0,
                ..listing
            },
        ] {
            assert!(Scenario::ListOrders(bad).plan().is_err());
        }
    }
}
