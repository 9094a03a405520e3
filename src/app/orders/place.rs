//! Placing orders: PlaceOrder's batches and Checkout's one order in the cart's transaction.
//!
//! Invariant: an order reserves all its stock and its coupon, priced and checked against the
//! balance, and writes its `OrderPlaced` event, in one transaction, or leaves no trace; each
//! order of a batch gets the answer it would get alone (the parent module's docs say how).
//!
//! Cancel safety: a batch runs in a task of its own ([`super::super::group_commit`]), so its
//! awaits (`BEGIN`, the lock statement, the write statement, the commit) run to their end
//! whatever its callers do. An order whose caller left before its batch started is not in it;
//! one whose caller left while the lock statement waited for its row locks is left out right
//! after it, before anything is taken for it, and the write statement gives its key claim back
//! (or the rollback does, when the batch writes nothing). A failure at any await rolls the
//! whole batch back and every caller hears it. Checkout runs in its caller's task instead:
//! dropped at any await before its commit, its transaction rolls back the emptied cart, the key
//! claim, the locks and the writes together.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tracing::Instrument as _;

use super::{Orders, PlaceOrderCommand};
use crate::{
    app::{
        events::Traced,
        group_commit::{Callers, Step, Turn, left_in},
        idempotency::{asked, call_keys, saved_result, settled, step_of},
        rate_limit::LimitedCall,
        sold_out::SoldOut,
    },
    domain::{
        Order, OrderId, OrderPlaced, OrderStatus, Pricing, ProductId, UserCoupon, UserCouponId,
        UserCouponStatus, UserId, ValidationError, Won,
    },
    error::{AppError, Resource},
    metrics,
    store::{
        StoreError,
        postgres::{
            self as postgres,
            idempotency::Operation,
            orders::{self, LineRefusal, StockRow},
            outbox::NewEvent,
            place_batch::{self, PlaceRequest},
        },
    },
    telemetry,
};

/// An order on its way to a batch, with the trace context of the call that placed it.
pub(super) type Placing = Traced<PlaceOrderCommand>;

impl Orders {
    pub async fn place(&self, cmd: PlaceOrderCommand) -> Result<Order, AppError> {
        let result = self
            .try_place(cmd)
            .instrument(telemetry::step("orders.place"))
            .await;
        metrics::order_placed(metrics::outcome(&result));
        if result.is_ok() {
            self.outbox_nudge.notify_one();
        }
        result
    }

    async fn try_place(&self, cmd: PlaceOrderCommand) -> Result<Order, AppError> {
        self.rate
            .admit(cmd.user_id, LimitedCall::PlaceOrder)
            .await?;
        // A sold-out product is refused from memory, but a retry of a success must get that
        // success: the key is looked up only then. Otherwise the batch's claim answers a replay
        // or a reused key, with no round trip of its own.
        if let Err(refusal) = self.refuse_sold_out(&cmd.product_ids()).await {
            return match saved_result(&self.pg, Operation::PlaceOrder, &cmd).await? {
                Some(id) => saved_order_from(&self.pg, id).await,
                None => Err(refusal),
            };
        }
        match self.placing.submit(Traced::new(cmd)).await? {
            Placed::Answer(result) => result,
            Placed::Busy(cmd) => match self.placing.alone(cmd).await? {
                Placed::Answer(result) => result,
                Placed::Busy(_) => Err(AppError::internal("a lone order found its key busy")),
            },
        }
    }

    /// Places `cmd` inside `tx` (whose caller has claimed the command's key for `operation`,
    /// if it has one: the order's id is recorded under it) and commits: all or nothing.
    /// Checkout ends here, so it places orders by the batches' rules and statements
    /// ([`PlaceBatch::decide_and_write`], one call) and fails with the same errors as
    /// PlaceOrder.
    pub(in crate::app) async fn place_in(
        &self,
        mut tx: Transaction<'static, Postgres>,
        cmd: PlaceOrderCommand,
        operation: Operation,
    ) -> Result<Order, AppError> {
        let mut steps = [Step::Open];
        let mut sold_out = BTreeMap::new();
        let call = Traced::new(cmd);
        let mut placed = self
            .batch
            .decide_and_write(
                &mut tx,
                std::slice::from_ref(&call),
                Keys::Claimed(operation),
                &Callers::default(),
                &mut steps,
                &mut sold_out,
            )
            .await?;
        let [step] = steps;
        match (step, placed.pop()) {
            (Step::Done(_), Some(order)) => {
                postgres::commit(tx).await?;
                self.outbox_nudge.notify_one();
                Ok(order)
            }
            (Step::Refused(e), _) => {
                drop(tx);
                self.batch.mark_sold_out(sold_out).await;
                Err(e)
            }
            _ => Err(AppError::internal("an order left undecided")),
        }
    }

    /// OUT_OF_STOCK when one of `products` is known to be sold out.
    pub(in crate::app) async fn refuse_sold_out(
        &self,
        products: &[ProductId],
    ) -> Result<(), AppError> {
        match self.sold_out.first(products).await {
            Some(product) => Err(AppError::OutOfStock {
                product_id: product.get(),
            }),
            None => Ok(()),
        }
    }
}

/// The order a key's first call placed, for its replay.
pub(in crate::app) async fn saved_order(
    tx: &mut PgConnection,
    order_id: i64,
) -> Result<Order, AppError> {
    let id = OrderId::parse(order_id, "order_id")?;
    orders::get(tx, id)
        .await?
        .ok_or_else(|| AppError::internal(format!("idempotency result {id} has no order")))
}

/// [`saved_order`] on a connection of its own.
async fn saved_order_from(pg: &PgPool, order_id: i64) -> Result<Order, AppError> {
    saved_order(&mut *pg.acquire().await?, order_id).await
}

/// A coupon the caller may put on a new order: theirs, available and not expired at `now`.
fn usable_coupon(
    coupon: Option<UserCoupon>,
    user_id: UserId,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<UserCoupon, AppError> {
    let coupon = coupon
        .filter(|c| c.user_id == user_id)
        .ok_or(AppError::CouponUnusable { why: "not_owned" })?;
    match coupon.status.effective(coupon.expires_at, now) {
        UserCouponStatus::Available => Ok(coupon),
        UserCouponStatus::Reserved => Err(AppError::CouponUnusable { why: "reserved" }),
        UserCouponStatus::Used => Err(AppError::CouponUnusable { why: "used" }),
        UserCouponStatus::Expired => Err(AppError::CouponUnusable { why: "expired" }),
    }
}

/// What a batch did with one order.
pub(super) enum Placed {
    Answer(Result<Order, AppError>),
    /// Its key is being claimed by another transaction (or by an earlier order of the same
    /// batch): it must run alone, where its claim may wait.
    Busy(Placing),
}

/// Places a batch of orders in one transaction (the module docs say how).
pub(super) struct PlaceBatch {
    pub(super) pg: PgPool,
    pub(super) sold_out: Arc<SoldOut>,
    pub(super) order_ttl: Duration,
}

impl PlaceBatch {
    pub(super) async fn run(
        self: Arc<Self>,
        calls: Vec<Placing>,
        alone: bool,
        callers: Callers,
        turn: Turn,
    ) -> Vec<Placed> {
        let mut steps: Vec<Step> = calls.iter().map(|_| Step::Open).collect();
        let mut sold_out = BTreeMap::new();
        let placed = match self
            .decide_and_commit(&calls, alone, &callers, turn, &mut steps, &mut sold_out)
            .await
        {
            Ok(placed) => placed,
            Err(e) => {
                return calls
                    .into_iter()
                    .map(|_| Placed::Answer(Err(AppError::from(&e))))
                    .collect();
            }
        };
        // Only now, with the batch committed (or nothing to commit), are the markers true.
        self.mark_sold_out(sold_out).await;
        let mut placed: Vec<Option<Order>> = placed.into_iter().map(Some).collect();
        let mut answers = Vec::with_capacity(calls.len());
        for (cmd, step) in calls.into_iter().zip(steps) {
            answers.push(match step {
                Step::Busy => Placed::Busy(cmd),
                Step::Replay(id) => Placed::Answer(saved_order_from(&self.pg, id).await),
                Step::Refused(e) => Placed::Answer(Err(e)),
                Step::Done(i) => Placed::Answer(
                    placed[i]
                        .take()
                        .ok_or_else(|| AppError::internal("an order answered twice")),
                ),
                Step::Open => Placed::Answer(Err(AppError::internal("an order left undecided"))),
            });
        }
        answers
    }

    /// Products found with no stock at all are marked sold out, so the next orders for them
    /// are refused from Redis.
    async fn mark_sold_out(&self, sold_out: BTreeMap<ProductId, i64>) {
        for (product, stock_gen) in sold_out {
            self.sold_out.mark(product, stock_gen).await;
        }
    }

    /// A batch in its own transaction: its calls claim their keys (without waiting, unless
    /// `alone`), are decided and written, and the batch commits; with nothing to write it rolls
    /// back instead, which gives back the claims of the refused calls. Returns the orders
    /// placed (`Step::Done(n)`: the n-th).
    async fn decide_and_commit(
        &self,
        calls: &[Placing],
        alone: bool,
        callers: &Callers,
        mut turn: Turn,
        steps: &mut [Step],
        sold_out: &mut BTreeMap<ProductId, i64>,
    ) -> Result<Vec<Order>, StoreError> {
        let mut tx = postgres::begin_batch(&self.pg).await?;
        let placed = self
            .decide_and_write(
                &mut tx,
                calls,
                Keys::Claim { wait: alone },
                callers,
                steps,
                sold_out,
            )
            .await?;
        if placed.is_empty() {
            tx.rollback().await?;
            return Ok(placed);
        }
        turn.committing();
        postgres::commit(tx).await?;
        Ok(placed)
    }

    /// Decides `calls` and writes the accepted ones with their `OrderPlaced` events in `tx`,
    /// settling their keys as `keys` says, without committing: the placement rules of
    /// PlaceOrder's batches and of a checkout's transaction, in two statements
    /// ([`place_batch`]). Sets each call's step (`Done(n)`: the n-th order returned) and
    /// collects the products found sold out, to mark once the transaction is over. With no
    /// order accepted nothing is written, and the caller must roll back.
    async fn decide_and_write(
        &self,
        tx: &mut PgConnection,
        calls: &[Placing],
        keys: Keys,
        callers: &Callers,
        steps: &mut [Step],
        sold_out: &mut BTreeMap<ProductId, i64>,
    ) -> Result<Vec<Order>, StoreError> {
        // 1. One statement: the keys claimed (a key twice in one batch runs alone the second
        // time), then the rows in the global lock order (coupons, then products), the callers'
        // balances, the time and the order ids.
        let call_keys = call_keys(calls);
        let asked = asked(&call_keys, steps);
        if asked.is_empty() {
            return Ok(Vec::new());
        }
        // The calls whose key the write settles: those claimed by the lock statement are added
        // as it tells.
        let (operation, mut fresh): (_, Vec<usize>) = match keys {
            Keys::Claim { .. } => (Operation::PlaceOrder, Vec::new()),
            Keys::Claimed(operation) => (
                operation,
                asked
                    .iter()
                    .copied()
                    .filter(|&i| call_keys[i].key().is_some())
                    .collect(),
            ),
        };
        let requests: Vec<PlaceRequest> = asked
            .iter()
            .map(|&i| PlaceRequest {
                user_id: calls[i].cmd.user_id,
                key: call_keys[i]
                    .key()
                    .filter(|_| matches!(keys, Keys::Claim { .. }))
                    .map(|k| (k, call_keys[i].fingerprint())),
                user_coupon_id: calls[i].cmd.user_coupon_id,
                lines: calls[i].cmd.lines.as_slice(),
            })
            .collect();
        let wait = matches!(keys, Keys::Claim { wait: true });
        let locked = place_batch::lock(&mut *tx, &requests, wait).await?;
        let mut coupons: HashMap<UserCouponId, UserCoupon> =
            locked.coupons.into_iter().map(|c| (c.id, c)).collect();
        let mut products: HashMap<ProductId, StockRow> =
            locked.products.into_iter().map(|p| (p.id, p)).collect();
        let mut found: HashMap<usize, (OrderId, Won)> = HashMap::new();
        for (&i, call) in asked.iter().zip(locked.found) {
            if let Some(claim) = call.claim {
                steps[i] = step_of(i, claim, &mut fresh);
            }
            if let Some(id) = call.order_id {
                found.insert(i, (id, call.balance.unwrap_or(Won::ZERO)));
            }
        }
        let open: Vec<usize> = asked
            .into_iter()
            .filter(|&i| matches!(steps[i], Step::Open))
            .collect();

        // The locks are where a batch waits (a hot product): an order whose caller left
        // meanwhile (deadline, disconnect) is left out now, before anything is taken for it,
        // and its key claim is given back.
        let open = left_in(&open, callers, steps);

        // 2. Order by order, as if alone, against the rows as the earlier ones left them.
        let now = chrono::Utc::now();
        let expires_at = locked.now
            + chrono::Duration::from_std(self.order_ttl)
                .map_err(|_| StoreError::Inconsistent("an order TTL out of range".into()))?;
        let mut placed = Vec::new();
        let mut events = Vec::new();
        for i in open {
            let cmd = &calls[i].cmd;
            let (id, balance) = *found
                .get(&i)
                .ok_or_else(|| StoreError::Inconsistent("an open order without its id".into()))?;
            steps[i] = match decide(cmd, balance, &mut coupons, &mut products, now) {
                Ok((items, pricing)) => {
                    // As the write statement will store it: its times are the transaction's.
                    let order = Order {
                        id,
                        user_id: cmd.user_id,
                        status: OrderStatus::PendingPayment,
                        items,
                        pricing,
                        refunded: Won::ZERO,
                        user_coupon_id: cmd.user_coupon_id,
                        created_at: locked.now,
                        expires_at,
                        paid_at: None,
                        cancelled_at: None,
                    };
                    events.push(NewEvent::of(
                        &OrderPlaced::of(&order),
                        calls[i].trace.clone(),
                    )?);
                    placed.push(order);
                    Step::Done(placed.len() - 1)
                }
                Err(Refusal::Line(LineRefusal::OutOfStock {
                    product,
                    left: 0,
                    stock_gen,
                })) => {
                    sold_out.insert(product, stock_gen);
                    Step::Refused(AppError::OutOfStock {
                        product_id: product.get(),
                    })
                }
                Err(refusal) => Step::Refused(refusal.into()),
            };
        }
        if placed.is_empty() {
            return Ok(Vec::new());
        }

        // 3. One statement: every write of the accepted orders, and the keys settled.
        let settled = settled(&call_keys, &fresh, steps, |n| placed[n].id.get());
        place_batch::write(&mut *tx, &placed, events, operation, &settled).await?;
        Ok(placed)
    }
}

/// Whose idempotency keys a placement claims and settles.
#[derive(Clone, Copy)]
enum Keys {
    /// The calls' own PlaceOrder keys: claimed by the lock statement (waiting for another
    /// transaction's claim only when `wait`) and settled by the write.
    Claim { wait: bool },
    /// A call whose caller claimed its key for this operation: the write records the order
    /// under it.
    Claimed(Operation),
}

/// Why one order of a batch is refused.
enum Refusal {
    Line(LineRefusal),
    App(AppError),
}

impl From<Refusal> for AppError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::App(e) => e,
            Refusal::Line(LineRefusal::NoProduct(id)) => AppError::NotFound {
                resource: Resource::Product,
                id: id.get(),
            },
            Refusal::Line(LineRefusal::NotSelling(id)) => AppError::ProductNotSelling {
                product_id: id.get(),
            },
            Refusal::Line(LineRefusal::OutOfStock { product, .. }) => AppError::OutOfStock {
                product_id: product.get(),
            },
        }
    }
}

/// The checks of one order, in the order a lone order makes them: coupon, lines (ascending
/// product id), total, discount, balance. On success the order's stock and coupon are taken
/// from the batch's rows; on refusal they are left as they were.
fn decide(
    cmd: &PlaceOrderCommand,
    balance: Won,
    coupons: &mut HashMap<UserCouponId, UserCoupon>,
    products: &mut HashMap<ProductId, StockRow>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(Vec<crate::domain::OrderItem>, Pricing), Refusal> {
    let coupon = match cmd.user_coupon_id {
        Some(id) => {
            Some(usable_coupon(coupons.get(&id).cloned(), cmd.user_id, now).map_err(Refusal::App)?)
        }
        None => None,
    };
    let mut items = Vec::with_capacity(cmd.lines.as_slice().len());
    let give_back = |products: &mut HashMap<ProductId, StockRow>,
                     items: &[crate::domain::OrderItem]| {
        for item in items {
            if let Some(row) = products.get_mut(&item.product_id) {
                row.stock += i64::from(item.quantity);
            }
        }
    };
    for line in cmd.lines.as_slice() {
        let reserved = match products.get_mut(&line.product_id) {
            Some(row) => row.reserve(line),
            None => Err(LineRefusal::NoProduct(line.product_id)),
        };
        match reserved {
            Ok(item) => items.push(item),
            Err(refusal) => {
                give_back(products, &items);
                return Err(Refusal::Line(refusal));
            }
        }
    }
    let priced = (|| {
        let total = Pricing::total_of(&items)
            .ok_or_else(|| ValidationError::new("items", "the order total is too large"))?;
        let discount = match &coupon {
            Some(c) => c
                .terms
                .discount_for(total)
                .ok_or(AppError::CouponUnusable {
                    why: "below_min_order_amount",
                })?,
            None => Won::ZERO,
        };
        let pricing = Pricing::new(total, discount);
        if balance < pricing.final_amount {
            return Err(AppError::InsufficientBalance {
                required: pricing.final_amount,
            });
        }
        Ok(pricing)
    })();
    match priced {
        Ok(pricing) => {
            if let Some(c) = cmd.user_coupon_id.and_then(|id| coupons.get_mut(&id)) {
                c.status = UserCouponStatus::Reserved;
            }
            Ok((items, pricing))
        }
        Err(e) => {
            give_back(products, &items);
            Err(Refusal::App(e))
        }
    }
}
