//! The lifecycle scenario's unit of work: one order's whole life. A buyer places an order of
//! one or two of the run's products (1..=3 units a line); the order is then cancelled, left
//! open, or paid, and a paid order is refunded in part, in full, in part then the rest, or not
//! at all (each refund restocking or not, one in five sent again with its key); finally the
//! buyer's first ListOrders page must show the order as the run left it.
//!
//! Guarantees: every call that changes something carries an idempotency key (PlaceOrder, Pay,
//! RefundOrder) and is sent again with it while its outcome is unknown, so a transport error
//! rarely leaves the run unsure; CancelOrder has no key, and a cancel whose outcome stays
//! unknown ends the order's life. An order whose last step stayed unknown is recorded without
//! an expected state, and the balance book widens by what it could have moved, so the checks
//! ([`crate::lifecycle_checks`]) never guess. Two workers may share a buyer, never an order.

use std::{future::Future, time::Instant};

use rand::{Rng, rngs::StdRng, seq::SliceRandom};
use tonic::{Response, Status, transport::Channel};

use super::{
    connect::{AdminClient, describe},
    listing::{self, Listing},
    seen::Problems,
    stats::{Class, Recorder, Rpc},
    worker::Shared,
};
use crate::ledger::BalanceBook;
use ecommerce::proto::{
    CancelOrderRequest, ListOrdersRequest, Order, OrderLine, OrderStatus, PayRequest,
    PlaceOrderRequest, RefundLine, RefundOrderRequest, order_service_client::OrderServiceClient,
    payment_service_client::PaymentServiceClient,
};

/// Attempts of a call while its outcome is unknown.
const ATTEMPTS: u32 = 3;
/// Units in one line of an order: 1..=this.
const MAX_LINE_UNITS: i32 = 3;
/// The page the buyer's order must be on.
const LIST_PAGE: i32 = 20;
/// One in this many refunds is sent again with its key.
const REPEAT_REFUND_ONE_IN: u32 = 5;

/// What happens to an order after it is placed, out of 100.
const CANCEL_BELOW: u32 = 15;
const LEAVE_OPEN_BELOW: u32 = 25;
/// What happens to a paid order, out of 100.
const NO_REFUND_BELOW: u32 = 25;
const PARTIAL_ONLY_BELOW: u32 = 50;
const FULL_ONLY_BELOW: u32 = 75;

/// The state the run left an order in, as the server must report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    pub status: OrderStatus,
    pub refunded_amount: i64,
}

/// An order the run placed (the server confirmed it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LifeOrder {
    pub order_id: i64,
    pub user_id: i64,
    /// `None` when a step's outcome stayed unknown.
    pub expected: Option<Expected>,
}

/// What the lifecycle workers saw.
#[derive(Clone, Debug, Default)]
pub struct LifeSeen {
    pub orders: Vec<LifeOrder>,
    /// Pay, CancelOrder or RefundOrder refused for an order the run expected them to succeed on.
    pub refused: Problems,
    pub transitions: u64,
    /// RefundOrder answers that do not match the request or the order as the run knew it.
    pub refund_answers: Problems,
    pub refunds: u64,
    /// A refund sent again with its key that did not return the same refund.
    pub replays: Problems,
    pub replayed: u64,
    /// First pages of the buyer's orders that are ill-formed or do not show the order as left.
    pub lists: Problems,
    pub listed: u64,
}

impl LifeSeen {
    pub fn merge(&mut self, other: LifeSeen) {
        self.orders.extend(other.orders);
        self.refused.merge(other.refused);
        self.transitions += other.transitions;
        self.refund_answers.merge(other.refund_answers);
        self.refunds += other.refunds;
        self.replays.merge(other.replays);
        self.replayed += other.replayed;
        self.lists.merge(other.lists);
        self.listed += other.listed;
    }
}

/// How a call ended, after its retries.
enum Answer<T> {
    Ok(T),
    /// Refused; `after_unknown` when an earlier attempt's outcome was unknown.
    Refused {
        status: Status,
        after_unknown: bool,
    },
    Unknown,
}

/// Sends a call (again while its outcome is unknown, up to [`ATTEMPTS`] times), recording
/// every attempt under `rpc`.
async fn call<T, F, Fut>(rpc: Rpc, rec: &mut Recorder, mut send: F) -> Answer<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    for attempt in 0..ATTEMPTS {
        let started = Instant::now();
        let result = send().await;
        rec.record(rpc, started, &result);
        match result {
            Ok(response) => return Answer::Ok(response.into_inner()),
            Err(status) if Class::of(status.code()) == Class::Indeterminate => {}
            Err(status) => {
                return Answer::Refused {
                    status,
                    after_unknown: attempt > 0,
                };
            }
        }
    }
    Answer::Unknown
}

/// One worker's clients for the scenario.
pub struct Lifecycle {
    index: usize,
    orders: OrderServiceClient<Channel>,
    payments: PaymentServiceClient<Channel>,
    admin: AdminClient,
    lives: u64,
}

/// The order being lived: what the run knows of it.
struct Life {
    order: LifeOrder,
    /// Units of each line not refunded yet.
    left: Vec<(i64, i32)>,
    final_amount: i64,
    refunded: i64,
    key: String,
    refunds: u32,
}

impl Life {
    fn expect(&mut self, status: OrderStatus) {
        self.order.expected = Some(Expected {
            status,
            refunded_amount: self.refunded,
        });
    }
}

impl Lifecycle {
    pub fn new(index: usize, channel: Channel, admin: AdminClient) -> Self {
        Self {
            index,
            orders: OrderServiceClient::new(channel.clone()),
            payments: PaymentServiceClient::new(channel),
            admin,
            lives: 0,
        }
    }

    /// One order's life (the module docs say which).
    pub async fn live(
        &mut self,
        shared: &Shared,
        rng: &mut StdRng,
        rec: &mut Recorder,
        seen: &mut LifeSeen,
        book: &mut BalanceBook,
    ) {
        self.lives += 1;
        let key = format!("{}-life-w{}-{}", shared.tag, self.index, self.lives);
        let user_id = shared.buyers[rng.random_range(0..shared.buyers.len())];
        let Some((mut life, placed)) = self.place(shared, rng, rec, user_id, key).await else {
            return;
        };
        let roll = rng.random_range(0..100);
        if roll < CANCEL_BELOW {
            self.cancel(&mut life, rec, seen).await;
        } else if roll >= LEAVE_OPEN_BELOW && self.pay(&mut life, rec, seen, book).await {
            let plan = rng.random_range(0..100);
            if plan >= NO_REFUND_BELOW && !(PARTIAL_ONLY_BELOW..FULL_ONLY_BELOW).contains(&plan) {
                let lines = partial(&life.left, rng);
                self.refund(&mut life, lines, rng, rec, seen, book).await;
            }
            let any_left = life.left.iter().any(|&(_, n)| n > 0);
            if plan >= PARTIAL_ONLY_BELOW && life.order.expected.is_some() && any_left {
                self.refund(&mut life, Vec::new(), rng, rec, seen, book)
                    .await;
            }
        }
        self.list(&life, &placed, rec, seen).await;
        seen.orders.push(life.order);
    }

    async fn place(
        &mut self,
        shared: &Shared,
        rng: &mut StdRng,
        rec: &mut Recorder,
        user_id: i64,
        key: String,
    ) -> Option<(Life, Order)> {
        let mut products = shared.products.clone();
        products.shuffle(rng);
        products.truncate(rng.random_range(1..=products.len()));
        let items: Vec<OrderLine> = products
            .into_iter()
            .map(|product_id| OrderLine {
                product_id,
                quantity: rng.random_range(1..=MAX_LINE_UNITS),
            })
            .collect();
        let request = PlaceOrderRequest {
            user_id,
            items,
            user_coupon_id: 0,
            idempotency_key: format!("{key}-place"),
        };
        let client = &self.orders;
        let answer = call(Rpc::PlaceOrder, rec, || {
            let (mut client, request) = (client.clone(), request.clone());
            async move { client.place_order(request).await }
        })
        .await;
        // A refusal (OUT_OF_STOCK) changed nothing; an unknown order is still checked in
        // Postgres with every order of the run's products.
        let Answer::Ok(response) = answer else {
            return None;
        };
        let order = response.order?;
        let mut life = Life {
            order: LifeOrder {
                order_id: order.id,
                user_id,
                expected: None,
            },
            left: order
                .items
                .iter()
                .map(|i| (i.product_id, i.quantity))
                .collect(),
            final_amount: order.final_amount,
            refunded: 0,
            key,
            refunds: 0,
        };
        life.expect(OrderStatus::PendingPayment);
        Some((life, order))
    }

    async fn cancel(&mut self, life: &mut Life, rec: &mut Recorder, seen: &mut LifeSeen) {
        seen.transitions += 1;
        let request = CancelOrderRequest {
            order_id: life.order.order_id,
            user_id: life.order.user_id,
        };
        let client = &self.orders;
        let answer = call(Rpc::CancelOrder, rec, || {
            let mut client = client.clone();
            async move { client.cancel_order(request).await }
        })
        .await;
        match answer {
            Answer::Ok(_) => life.expect(OrderStatus::Cancelled),
            // Unkeyed: a refusal after an unknown attempt may be that attempt's success.
            Answer::Refused {
                after_unknown: true,
                ..
            }
            | Answer::Unknown => life.order.expected = None,
            Answer::Refused { status, .. } => refused(seen, "CancelOrder", life, &status),
        }
    }

    /// Pays the order; true when it is known PAID.
    async fn pay(
        &mut self,
        life: &mut Life,
        rec: &mut Recorder,
        seen: &mut LifeSeen,
        book: &mut BalanceBook,
    ) -> bool {
        seen.transitions += 1;
        let request = PayRequest {
            order_id: life.order.order_id,
            user_id: life.order.user_id,
            idempotency_key: format!("{}-pay", life.key),
        };
        let client = &self.payments;
        let answer = call(Rpc::Pay, rec, || {
            let (mut client, request) = (client.clone(), request.clone());
            async move { client.pay(request).await }
        })
        .await;
        let user = life.order.user_id;
        match answer {
            Answer::Ok(response) => {
                let amount = response.payment.map_or(life.final_amount, |p| p.amount);
                book.debit(user, amount);
                life.expect(OrderStatus::Paid);
                return true;
            }
            Answer::Refused { status, .. } => refused(seen, "Pay", life, &status),
            Answer::Unknown => {
                book.unsure_debit(user, life.final_amount);
                life.order.expected = None;
            }
        }
        false
    }

    /// Refunds `lines` (none: everything left), restocking or not.
    async fn refund(
        &mut self,
        life: &mut Life,
        lines: Vec<RefundLine>,
        rng: &mut StdRng,
        rec: &mut Recorder,
        seen: &mut LifeSeen,
        book: &mut BalanceBook,
    ) {
        seen.transitions += 1;
        life.refunds += 1;
        let key = format!("{}-refund-{}", life.key, life.refunds);
        let request = RefundOrderRequest {
            order_id: life.order.order_id,
            lines: lines.clone(),
            restock: rng.random_bool(0.5),
            reason: "loadgen lifecycle".into(),
            idempotency_key: key.clone(),
        };
        let admin = &self.admin;
        let send = || {
            let (mut admin, request) = (admin.clone(), request.clone());
            async move { admin.refund_order(request).await }
        };
        let user = life.order.user_id;
        let refund = match call(Rpc::RefundOrder, rec, &send).await {
            Answer::Ok(response) => response.refund.unwrap_or_default(),
            Answer::Refused { status, .. } => return refused(seen, "RefundOrder", life, &status),
            Answer::Unknown => {
                book.unsure_credit(user, life.final_amount - life.refunded, Some(key));
                life.order.expected = None;
                return;
            }
        };
        seen.refunds += 1;
        book.refund(user, refund.id, refund.amount, &key);
        let asked: Vec<(i64, i32)> = if lines.is_empty() {
            life.left.iter().copied().filter(|&(_, n)| n > 0).collect()
        } else {
            lines.iter().map(|l| (l.product_id, l.quantity)).collect()
        };
        let mut given: Vec<(i64, i32)> = refund
            .lines
            .iter()
            .map(|l| (l.product_id, l.quantity))
            .collect();
        given.sort_unstable();
        let mut wanted = asked.clone();
        wanted.sort_unstable();
        let line_sum: i64 = refund.lines.iter().map(|l| l.amount).sum();
        if given != wanted || line_sum != refund.amount || refund.order_id != life.order.order_id {
            let order = life.order.order_id;
            seen.refund_answers.add(|| {
                format!(
                    "order {order}: asked {wanted:?}, refunded {given:?} for {} (lines {line_sum})",
                    refund.amount
                )
            });
        }
        for (product, n) in asked {
            if let Some(line) = life.left.iter_mut().find(|(p, _)| *p == product) {
                line.1 -= n;
            }
        }
        life.refunded += refund.amount;
        if life.left.iter().all(|&(_, n)| n == 0) {
            life.expect(OrderStatus::Refunded);
        } else {
            life.expect(OrderStatus::PartiallyRefunded);
        }
        if rng.random_ratio(1, REPEAT_REFUND_ONE_IN) {
            seen.replayed += 1;
            let again = call(Rpc::RefundOrderAgain, rec, &send).await;
            let order = life.order.order_id;
            match again {
                Answer::Ok(r) if r.refund.as_ref().is_some_and(|r| r.id == refund.id) => {}
                Answer::Ok(r) => seen.replays.add(|| {
                    format!(
                        "order {order}: key {key} returned refund {} after {}",
                        r.refund.map_or(0, |r| r.id),
                        refund.id
                    )
                }),
                Answer::Refused { status, .. } => seen
                    .replays
                    .add(|| format!("order {order}: key {key} sent again: {}", describe(&status))),
                Answer::Unknown => {}
            }
        }
    }

    /// The buyer's first page must show the order as the run left it, unless newer orders of
    /// the buyer (placed by other workers) pushed it off the page.
    async fn list(&mut self, life: &Life, placed: &Order, rec: &mut Recorder, seen: &mut LifeSeen) {
        let user_id = life.order.user_id;
        let request = ListOrdersRequest {
            user_id,
            statuses: Vec::new(),
            page_size: LIST_PAGE,
            page_token: String::new(),
        };
        let client = &self.orders;
        let Answer::Ok(page) = call(Rpc::ListOrders, rec, || {
            let (mut client, request) = (client.clone(), request.clone());
            async move { client.list_orders(request).await }
        })
        .await
        else {
            return;
        };
        seen.listed += 1;
        let shape = Listing {
            user_id,
            min_orders: 0,
            page_size: LIST_PAGE,
        };
        let more = !page.next_page_token.is_empty();
        if let Some(problem) = listing::page_problem(&page.orders, &shape, &[], None, more) {
            seen.lists.add(|| format!("user {user_id}: {problem}"));
            return;
        }
        let order = life.order.order_id;
        match page.orders.iter().find(|o| o.id == order) {
            Some(listed) => {
                if let Some(expected) = life.order.expected
                    && (listed.status != expected.status as i32
                        || listed.refunded_amount != expected.refunded_amount)
                {
                    seen.lists.add(|| {
                        format!(
                            "order {order} listed {} with {} refunded, left {} with {}",
                            listed.status,
                            listed.refunded_amount,
                            expected.status.as_str_name(),
                            expected.refunded_amount
                        )
                    });
                }
            }
            None => {
                let pushed_off = page.orders.len() == LIST_PAGE as usize
                    && page
                        .orders
                        .last()
                        .is_some_and(|last| listing::key(last) > listing::key(placed));
                if !pushed_off {
                    seen.lists
                        .add(|| format!("order {order} missing from user {user_id}'s first page"));
                }
            }
        }
    }
}

/// A refusal of a step the run expected to succeed: nothing changed, the order stays as it was.
fn refused(seen: &mut LifeSeen, rpc: &str, life: &Life, status: &Status) {
    let order = life.order.order_id;
    seen.refused
        .add(|| format!("{rpc} of order {order}: {}", describe(status)));
}

/// A partial refund: some units of some lines, never every unit left (the full refund that may
/// follow takes the rest).
fn partial(left: &[(i64, i32)], rng: &mut StdRng) -> Vec<RefundLine> {
    let units: i32 = left.iter().map(|&(_, n)| n).sum();
    let mut budget = rng.random_range(1..units.max(2)).min(units);
    let mut lines = Vec::new();
    for &(product_id, n) in left {
        if budget == 0 || n == 0 {
            continue;
        }
        let quantity = rng.random_range(1..=n.min(budget));
        budget -= quantity;
        lines.push(RefundLine {
            product_id,
            quantity,
        });
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_partial_refund_leaves_a_unit_whenever_there_are_two() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..1_000 {
            let left = [(1, rng.random_range(1..=3)), (2, rng.random_range(0..=3))];
            let lines = partial(&left, &mut rng);
            let total: i32 = left.iter().map(|l| l.1).sum();
            let taken: i32 = lines.iter().map(|l| l.quantity).sum();
            assert!(taken >= 1, "{left:?} {lines:?}");
            assert!(taken < total || total == 1, "{left:?} {lines:?}");
            for line in &lines {
                let had = left.iter().find(|l| l.0 == line.product_id).unwrap().1;
                assert!((1..=had).contains(&line.quantity), "{left:?} {lines:?}");
            }
        }
    }
}
