//! One worker: a loop of units of work with exactly one call in flight, its own clients, random
//! stream, recorder and observations. Workers share nothing but read-only fixtures, so a call
//! costs no synchronisation beyond taking its unit of work.

use std::{collections::VecDeque, sync::Arc, time::Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::{Code, transport::Channel};

use super::{
    connect::{AdminClient, describe},
    holders::{Holder, judge_repeat},
    judge::popular_problem,
    lifecycle::Lifecycle,
    listing::{Listing, Walk, next_page},
    seen::{Observed, PaymentSeen, PlacedOrder},
    stats::{Class, Recorder, Rpc},
    users::{UserSpace, worker_seed},
    weights::{Op, Weights},
};
use ecommerce::proto::{
    ChargeBalanceRequest, CheckoutRequest, GetPopularProductsRequest, IssueCouponRequest, Order,
    OrderLine, PayRequest, PlaceOrderRequest, SetItemRequest,
    balance_service_client::BalanceServiceClient, cart_service_client::CartServiceClient,
    coupon_service_client::CouponServiceClient, order_service_client::OrderServiceClient,
    payment_service_client::PaymentServiceClient, product_service_client::ProductServiceClient,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// One in this many successful Pays is followed by a second Pay of the same order.
const REPEAT_PAY_ONE_IN: u32 = 20;
/// One in this many answered checkouts is sent again with the same key.
const REPEAT_CHECKOUT_ONE_IN: u32 = 10;
/// A cart line holds 1..=this many units of the product.
const MAX_CART_UNITS: i32 = 3;
/// Of ten charges: this many carry no key, one repeats an earlier key, the rest a new key.
const UNKEYED_CHARGES_IN_TEN: u32 = 7;
const REPEATED_CHARGES_IN_TEN: u32 = 1;
/// Charges are 100..=10,000 won in steps of 100.
const CHARGE_STEP: i64 = 100;
const CHARGE_STEPS: i64 = 100;
/// Keyed charges remembered for repeating.
const RECENT_KEYS: usize = 32;

/// What every worker reads.
pub struct Shared {
    pub weights: Weights,
    pub coupon_id: i64,
    pub product_id: i64,
    pub buyers: Vec<i64>,
    pub charged: Vec<i64>,
    pub holders: Vec<Holder>,
    pub users: UserSpace,
    /// Prefix of this run's idempotency keys.
    pub tag: String,
    pub popular: (i32, i32),
    pub listing: Option<Listing>,
    /// Every product of the run (the lifecycle scenario orders from all of them).
    pub products: Vec<i64>,
    /// Orders placed during the set-up; unit of work `n` pays the `n`th.
    pub prepared: Vec<PlacedOrder>,
}

#[derive(Clone)]
struct KeyedCharge {
    user_id: i64,
    amount: i64,
    key: String,
}

pub struct Worker {
    index: usize,
    rng: StdRng,
    shared: Arc<Shared>,
    coupons: CouponServiceClient<Channel>,
    orders: OrderServiceClient<Channel>,
    payments: PaymentServiceClient<Channel>,
    products: ProductServiceClient<Channel>,
    balance: BalanceServiceClient<Channel>,
    carts: CartServiceClient<Channel>,
    health: HealthClient<Channel>,
    /// Orders placed and waiting for a [`Op::Pay`], oldest first.
    unpaid: VecDeque<PlacedOrder>,
    recent_keys: VecDeque<KeyedCharge>,
    keys_made: u64,
    /// This worker's walk through the listed buyer's orders.
    walk: Walk,
    /// The lifecycle scenario's clients, when the run has that scenario.
    life: Option<Lifecycle>,
    pub observed: Observed,
}

impl Worker {
    pub fn new(
        index: usize,
        seed: u64,
        shared: Arc<Shared>,
        channel: Channel,
        admin: AdminClient,
    ) -> Self {
        let life = shared
            .weights
            .contains(Op::Lifecycle)
            .then(|| Lifecycle::new(index, channel.clone(), admin));
        Self {
            index,
            rng: StdRng::seed_from_u64(worker_seed(seed, index)),
            shared,
            coupons: CouponServiceClient::new(channel.clone()),
            orders: OrderServiceClient::new(channel.clone()),
            payments: PaymentServiceClient::new(channel.clone()),
            products: ProductServiceClient::new(channel.clone()),
            balance: BalanceServiceClient::new(channel.clone()),
            carts: CartServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
            unpaid: VecDeque::new(),
            recent_keys: VecDeque::new(),
            keys_made: 0,
            walk: Walk::default(),
            life,
            observed: Observed::default(),
        }
    }

    /// Unit of work number `n` (unique across workers).
    pub async fn step(&mut self, n: u64, rec: &mut Recorder) {
        let total = self.shared.weights.total();
        let op = self.shared.weights.pick(if total > 1 {
            self.rng.random_range(0..total)
        } else {
            0
        });
        match op {
            Op::Coupon => self.issue_coupon(n, rec).await,
            Op::CouponAgain => self.issue_coupon_again(rec).await,
            Op::Order => {
                if let Some(order) = self.place_order(rec).await {
                    self.unpaid.push_back(order);
                }
            }
            Op::Pay => match self.unpaid.pop_front() {
                Some(order) => self.pay(order, rec).await,
                // Nothing to pay yet: place the order a later Pay will take.
                None => {
                    if let Some(order) = self.place_order(rec).await {
                        self.unpaid.push_back(order);
                    }
                }
            },
            Op::OrderThenPay => {
                if let Some(order) = self.place_order(rec).await {
                    self.pay(order, rec).await;
                }
            }
            // Each once, never repeated: the same work as the naive payment it is compared with.
            Op::PayPrepared => {
                let order = usize::try_from(n)
                    .ok()
                    .and_then(|n| self.shared.prepared.get(n));
                if let Some(&order) = order {
                    self.pay_once(order, rec).await;
                }
            }
            Op::Popular => self.popular(rec).await,
            Op::Charge => self.charge(rec).await,
            Op::Health => self.health_check(rec).await,
            Op::Checkout => self.checkout(rec).await,
            Op::Lifecycle => {
                if let Some(life) = &mut self.life {
                    let observed = &mut self.observed;
                    life.live(
                        &self.shared,
                        &mut self.rng,
                        rec,
                        &mut observed.lifecycle,
                        &mut observed.book,
                    )
                    .await;
                }
            }
            Op::ListOrders => {
                if let Some(listing) = self.shared.listing {
                    let observed = &mut self.observed;
                    next_page(
                        &mut self.walk,
                        &mut self.orders,
                        &listing,
                        &mut self.rng,
                        rec,
                        observed,
                    )
                    .await;
                }
            }
        }
    }

    /// A holder, picked at random, asks for the coupon again.
    async fn issue_coupon_again(&mut self, rec: &mut Recorder) {
        let holders = &self.shared.holders;
        let holder = holders[self.rng.random_range(0..holders.len())];
        let request = IssueCouponRequest {
            user_id: holder.user_id,
            coupon_id: self.shared.coupon_id,
        };
        let started = Instant::now();
        let result = self.coupons.issue_coupon(request).await;
        rec.record(Rpc::IssueCouponHeld, started, &result);
        if let Some(problem) = judge_repeat(holder, &result) {
            self.observed.repeat_coupons.add(|| problem);
        }
    }

    async fn health_check(&mut self, rec: &mut Recorder) {
        let started = Instant::now();
        let result = self.health.check(HealthCheckRequest::default()).await;
        rec.record(Rpc::HealthCheck, started, &result);
        if let Ok(response) = result {
            let status = response.into_inner().status;
            if status != ServingStatus::Serving as i32 {
                self.observed
                    .health_problems
                    .add(|| format!("answered {status} instead of SERVING"));
            }
        }
    }

    async fn issue_coupon(&mut self, n: u64, rec: &mut Recorder) {
        let user_id = self.shared.users.coupon_user(n);
        let request = IssueCouponRequest {
            user_id,
            coupon_id: self.shared.coupon_id,
        };
        let started = Instant::now();
        let result = self.coupons.issue_coupon(request).await;
        if rec.record(Rpc::IssueCoupon, started, &result) == Class::Ok {
            self.observed.coupon_winners.push(user_id);
        }
    }

    fn buyer(&mut self) -> i64 {
        let buyers = &self.shared.buyers;
        buyers[self.rng.random_range(0..buyers.len())]
    }

    async fn place_order(&mut self, rec: &mut Recorder) -> Option<PlacedOrder> {
        let user_id = self.buyer();
        let request = PlaceOrderRequest {
            user_id,
            items: vec![OrderLine {
                product_id: self.shared.product_id,
                quantity: 1,
            }],
            user_coupon_id: 0,
            idempotency_key: String::new(),
        };
        let started = Instant::now();
        let result = self.orders.place_order(request).await;
        match rec.record(Rpc::PlaceOrder, started, &result) {
            Class::Ok => {
                let order = result.ok().and_then(|r| r.into_inner().order);
                match order {
                    Some(order) => {
                        let placed = PlacedOrder {
                            order_id: order.id,
                            user_id,
                            units: 1,
                            amount: order.final_amount,
                        };
                        self.observed.orders.push(placed);
                        Some(placed)
                    }
                    None => {
                        // An OK without the order: it exists, but this run cannot follow it.
                        self.observed.unsure_order_units += 1;
                        None
                    }
                }
            }
            Class::Indeterminate => {
                self.observed.unsure_order_units += 1;
                None
            }
            Class::Refused => None,
        }
    }

    /// Fills a buyer's cart with one line and checks it out with a fresh key. Two workers may
    /// share a buyer: SetItem sets (not adds) the quantity, so a cart never holds more than
    /// [`MAX_CART_UNITS`], and one of two checkouts of the same cart finds it empty.
    async fn checkout(&mut self, rec: &mut Recorder) {
        let user_id = self.buyer();
        let request = SetItemRequest {
            user_id,
            product_id: self.shared.product_id,
            quantity: self.rng.random_range(1..=MAX_CART_UNITS),
        };
        let started = Instant::now();
        let result = self.carts.set_item(request).await;
        if rec.record(Rpc::SetItem, started, &result) != Class::Ok {
            return;
        }
        self.keys_made += 1;
        let request = CheckoutRequest {
            user_id,
            user_coupon_id: 0,
            idempotency_key: format!(
                "{}-cart-w{}-{}",
                self.shared.tag, self.index, self.keys_made
            ),
        };
        let started = Instant::now();
        let result = self.carts.checkout(request.clone()).await;
        match rec.record(Rpc::Checkout, started, &result) {
            Class::Ok => match result.ok().and_then(|r| r.into_inner().order) {
                Some(order) => {
                    self.observed.orders.push(placed(&order, user_id));
                    if self.rng.random_ratio(1, REPEAT_CHECKOUT_ONE_IN) {
                        self.checkout_again(request, order.id, rec).await;
                    }
                }
                None => self.observed.unsure_order_units += i64::from(MAX_CART_UNITS),
            },
            Class::Indeterminate => self.observed.unsure_order_units += i64::from(MAX_CART_UNITS),
            Class::Refused => {}
        }
    }

    /// Sends a checkout that was just answered with `order_id` again: anything but that order
    /// (or an unknown outcome) breaks "one order per checkout key".
    async fn checkout_again(
        &mut self,
        request: CheckoutRequest,
        order_id: i64,
        rec: &mut Recorder,
    ) {
        let started = Instant::now();
        let result = self.carts.checkout(request).await;
        rec.record(Rpc::CheckoutAgain, started, &result);
        match result {
            Ok(response) => {
                let again = response.into_inner().order.map_or(0, |o| o.id);
                if again != order_id {
                    self.observed.repeat_checkouts.add(|| {
                        format!("checkout of order {order_id} sent again placed order {again}")
                    });
                }
            }
            // Not sent (a rate limit or load shedding): nothing to judge.
            Err(status)
                if Class::of(status.code()) == Class::Indeterminate
                    || status.code() == Code::ResourceExhausted => {}
            Err(status) => self.observed.repeat_checkouts.add(|| {
                format!(
                    "checkout of order {order_id} sent again: {}",
                    describe(&status)
                )
            }),
        }
    }

    /// Pays `order`; one in [`REPEAT_PAY_ONE_IN`] successes is followed by a repeat.
    async fn pay(&mut self, order: PlacedOrder, rec: &mut Recorder) {
        if let Some(request) = self.pay_once(order, rec).await
            && self.rng.random_ratio(1, REPEAT_PAY_ONE_IN)
        {
            self.pay_again(request, rec).await;
        }
    }

    /// Pays `order` without a key, as a buyer's first click does; returns the request when
    /// the payment was confirmed.
    async fn pay_once(&mut self, order: PlacedOrder, rec: &mut Recorder) -> Option<PayRequest> {
        let request = PayRequest {
            order_id: order.order_id,
            user_id: order.user_id,
            idempotency_key: String::new(),
        };
        let started = Instant::now();
        let result = self.payments.pay(request.clone()).await;
        match rec.record(Rpc::Pay, started, &result) {
            Class::Ok => {
                let payment = result.ok().and_then(|r| r.into_inner().payment);
                let Some(payment) = payment else {
                    self.observed.unsure_pays.push(order.order_id);
                    self.observed.book.unsure_debit(order.user_id, order.amount);
                    return None;
                };
                self.observed.payments.push(PaymentSeen {
                    payment_id: payment.id,
                    order_id: payment.order_id,
                    user_id: order.user_id,
                    amount: payment.amount,
                });
                self.observed.book.debit(order.user_id, payment.amount);
                Some(request)
            }
            Class::Indeterminate => {
                self.observed.unsure_pays.push(order.order_id);
                self.observed.book.unsure_debit(order.user_id, order.amount);
                None
            }
            Class::Refused => None,
        }
    }

    /// Pays an order that was just paid: anything but ALREADY_EXISTS (or an unknown outcome)
    /// breaks "one payment per order".
    async fn pay_again(&mut self, request: PayRequest, rec: &mut Recorder) {
        let order_id = request.order_id;
        let started = Instant::now();
        let result = self.payments.pay(request).await;
        rec.record(Rpc::PayAgain, started, &result);
        match result {
            Ok(response) => {
                let payment_id = response.into_inner().payment.map_or(0, |p| p.id);
                self.observed
                    .repeat_pays
                    .add(|| format!("order {order_id} paid a second time (payment {payment_id})"));
            }
            Err(status)
                if status.code() == Code::AlreadyExists
                    || Class::of(status.code()) == Class::Indeterminate => {}
            Err(status) => self
                .observed
                .repeat_pays
                .add(|| format!("order {order_id}: {}", describe(&status))),
        }
    }

    async fn popular(&mut self, rec: &mut Recorder) {
        let (days, limit) = self.shared.popular;
        let started = Instant::now();
        let result = self
            .products
            .get_popular_products(GetPopularProductsRequest { days, limit })
            .await;
        rec.record(Rpc::GetPopularProducts, started, &result);
        if let Ok(response) = result {
            self.observed.popular_answers += 1;
            if let Some(problem) = popular_problem(&response.into_inner().items, limit) {
                self.observed.popular_problems.add(|| problem);
            }
        }
    }

    async fn charge(&mut self, rec: &mut Recorder) {
        let roll = self.rng.random_range(0..10);
        let (charge, rpc) = if roll >= 10 - REPEATED_CHARGES_IN_TEN && !self.recent_keys.is_empty()
        {
            let i = self.rng.random_range(0..self.recent_keys.len());
            (self.recent_keys[i].clone(), Rpc::ChargeBalanceReplay)
        } else {
            let users = &self.shared.charged;
            let user_id = users[self.rng.random_range(0..users.len())];
            let amount = CHARGE_STEP * self.rng.random_range(1..=CHARGE_STEPS);
            let key = if roll < UNKEYED_CHARGES_IN_TEN {
                String::new()
            } else {
                self.keys_made += 1;
                format!("{}-w{}-{}", self.shared.tag, self.index, self.keys_made)
            };
            let charge = KeyedCharge {
                user_id,
                amount,
                key,
            };
            if !charge.key.is_empty() {
                if self.recent_keys.len() == RECENT_KEYS {
                    self.recent_keys.pop_front();
                }
                self.recent_keys.push_back(charge.clone());
            }
            (charge, Rpc::ChargeBalance)
        };
        let request = ChargeBalanceRequest {
            user_id: charge.user_id,
            amount: charge.amount,
            idempotency_key: charge.key.clone(),
        };
        let started = Instant::now();
        let result = self.balance.charge_balance(request).await;
        let class = rec.record(rpc, started, &result);
        let key = (!charge.key.is_empty()).then_some(charge.key);
        match (class, result) {
            (Class::Ok, Ok(response)) => {
                let history_id = response.into_inner().history_id;
                self.observed.book.credit(
                    charge.user_id,
                    history_id,
                    charge.amount,
                    key.as_deref(),
                );
                if let Some(key) = key {
                    self.observed
                        .replays
                        .entry(key)
                        .or_default()
                        .insert(history_id);
                }
            }
            (Class::Indeterminate, _) => {
                self.observed
                    .book
                    .unsure_credit(charge.user_id, charge.amount, key)
            }
            _ => {}
        }
    }
}

/// An order a checkout placed, as the stock and order checks follow it.
fn placed(order: &Order, user_id: i64) -> PlacedOrder {
    PlacedOrder {
        order_id: order.id,
        user_id,
        units: order.items.iter().map(|i| i64::from(i.quantity)).sum(),
        amount: order.final_amount,
    }
}
