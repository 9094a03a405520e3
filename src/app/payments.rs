//! Paying an order from the buyer's balance.
//!
//! Invariants: at most one payment per order; the balance never goes negative and always
//! equals its ledger; every payment has exactly one PaymentCompleted event in the outbox,
//! written in the payment's transaction and numbered with its order's next event number, so
//! the data platform gets every payment even if this process dies right after the commit.
//!
//! Payments are group-committed ([`super::group_commit`]) like orders: one transaction pays a
//! batch, in two statements and the commit ([`pay_batch`]), whatever the batch's size. The
//! idempotency key is claimed in the batch without waiting, with no look-up before (the claim
//! answers a replay or a reused key; a key being claimed elsewhere sends the payment to run alone).
//! The first statement claims the keys, locks the orders (ascending id), then the buyers' balances
//! (ascending user id): the global lock order (orders → balances → coupons → products) that cancels
//! and expiry follow too. Then the batch decides in Rust, payment by payment, in queue order, as if
//! each ran alone after the earlier ones: order found, the caller's, open and not expired, balance
//! enough (what the earlier payments of the batch left of it). A refused payment takes nothing and
//! gives its key claim back. The second statement writes the accepted ones (ledger entries,
//! payments, the orders as PAID, the coupons as USED, one debit per buyer, the outbox events) and
//! settles the keys, and the batch commits before anyone hears OK.
//!
//! Cancel safety: a batch runs in a task of its own, so it commits or rolls back whatever its
//! callers do; a payment whose caller left before its batch started, or while the batch waited
//! for its row locks, is not made at all. After
//! the commit, the ranking bump runs in its own task and finishes regardless.

use std::{collections::HashMap, sync::Arc};

use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::Notify;
use tracing::Instrument as _;
use uuid::Uuid;

use super::{
    Popular,
    events::Traced,
    group_commit::{Callers, GroupCommit, Step, Turn, WriteBatches, left_in},
    idempotency::{Keyed, asked, call_keys, settled, step_of},
    popular::Sale,
    rate_limit::{LimitedCall, UserRateLimit},
};
use crate::{
    domain::{
        IdempotencyKey, OrderId, OrderItem, OrderStatus, Payment, PaymentCompleted, PaymentId,
        TxId, UserId, Won,
    },
    error::{AppError, Resource},
    metrics,
    store::{
        StoreError,
        postgres::{
            self as postgres,
            orders::OrderRow,
            outbox::NewEvent,
            pay_batch::{self, PayRequest, PaymentRecord},
            payments,
        },
    },
    telemetry,
};

pub struct PayCommand {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub idempotency_key: Option<IdempotencyKey>,
}

impl Keyed for PayCommand {
    fn user_id(&self) -> UserId {
        self.user_id
    }

    fn key(&self) -> Option<&IdempotencyKey> {
        self.idempotency_key.as_ref()
    }

    fn fingerprint(&self) -> String {
        self.order_id.get().to_string()
    }
}

/// A payment on its way to a batch, with the trace context of the call that made it.
type Paying = Traced<PayCommand>;

/// The payment flow.
pub struct Payments {
    /// Counts each payment's items in the ranking.
    popular: Arc<Popular>,
    /// Wakes the outbox job: a payment's event should leave at once.
    outbox_nudge: Arc<Notify>,
    paying: GroupCommit<Paying, Paid>,
    rate: Arc<UserRateLimit>,
}

impl Payments {
    /// `batches`: how payments are gathered into transactions ([`WriteBatches`]).
    pub fn new(
        pg: PgPool,
        popular: Arc<Popular>,
        outbox_nudge: Arc<Notify>,
        batches: WriteBatches,
        rate: Arc<UserRateLimit>,
    ) -> Self {
        let batch = Arc::new(PayBatch { pg });
        let paying = GroupCommit::start(
            "payments.pay_batch",
            batches,
            Arc::new(move |calls, alone, callers, turn| {
                Box::pin(batch.clone().run(calls, alone, callers, turn))
            }),
        );
        Self {
            popular,
            outbox_nudge,
            paying,
            rate,
        }
    }

    pub async fn pay(&self, cmd: PayCommand) -> Result<Payment, AppError> {
        let result = self
            .try_pay(cmd)
            .instrument(telemetry::step("payments.pay"))
            .await;
        metrics::payment(metrics::outcome(&result));
        result
    }

    async fn try_pay(&self, cmd: PayCommand) -> Result<Payment, AppError> {
        self.rate.admit(cmd.user_id, LimitedCall::Pay).await?;
        // No look-up of the key first: the batch's claim answers a replay or a reused key, and
        // nothing before it could refuse a retry of a success.
        let paid = match self.paying.submit(Traced::new(cmd)).await? {
            Paid::Busy(call) => self.paying.alone(call).await?,
            paid => paid,
        };
        match paid {
            Paid::Replayed(result) => result,
            Paid::Made { payment, items, tx } => {
                self.outbox_nudge.notify_one();
                // The ranking bump runs to the end even if the caller has gone (the ranking job
                // would only restore a lost bump at its next run). The reply waits for it, so a
                // read that follows the reply on this replica counts this payment.
                let sale = Sale {
                    payment_id: payment.id,
                    tx,
                    paid_at: payment.paid_at,
                    items,
                };
                let popular = self.popular.clone();
                let bump = async move { popular.record_sale(&sale).await };
                let _ = tokio::spawn(bump.in_current_span()).await;
                Ok(payment)
            }
            Paid::Busy(_) => Err(AppError::internal("a lone payment found its key busy")),
        }
    }
}

/// The payment stored as an idempotency key's result.
async fn saved_payment(pg: &PgPool, id: i64) -> Result<Payment, AppError> {
    let id = PaymentId::parse(id, "payment_id")?;
    payments::get(pg, id)
        .await?
        .ok_or_else(|| AppError::internal(format!("idempotency result {id} has no payment")))
}

/// What a batch did with one payment.
enum Paid {
    /// Made by this call, with the order's items and the batch's transaction for the ranking.
    Made {
        payment: Payment,
        items: Vec<OrderItem>,
        tx: TxId,
    },
    /// Refused, or a replay of an earlier payment (no new sale to count).
    Replayed(Result<Payment, AppError>),
    /// Its key is being claimed by another transaction: it must run alone.
    Busy(Paying),
}

/// Pays a batch in one transaction (the module docs say how).
struct PayBatch {
    pg: PgPool,
}

impl PayBatch {
    async fn run(
        self: Arc<Self>,
        calls: Vec<Paying>,
        alone: bool,
        callers: Callers,
        turn: Turn,
    ) -> Vec<Paid> {
        let mut steps: Vec<Step> = calls.iter().map(|_| Step::Open).collect();
        let mut made = Vec::new();
        let tx = match self
            .decide_and_commit(&calls, alone, &callers, turn, &mut steps, &mut made)
            .await
        {
            Ok(tx) => tx,
            Err(e) => {
                return calls
                    .into_iter()
                    .map(|_| Paid::Replayed(Err(AppError::from(&e))))
                    .collect();
            }
        };
        let mut made: Vec<Option<(Payment, Vec<OrderItem>)>> = made.into_iter().map(Some).collect();
        let mut answers = Vec::with_capacity(calls.len());
        for (cmd, step) in calls.into_iter().zip(steps) {
            answers.push(match step {
                Step::Busy => Paid::Busy(cmd),
                Step::Replay(id) => Paid::Replayed(saved_payment(&self.pg, id).await),
                Step::Refused(e) => Paid::Replayed(Err(e)),
                Step::Done(i) => match made[i].take() {
                    Some((payment, items)) => match tx {
                        Some(tx) => Paid::Made { payment, items, tx },
                        None => Paid::Replayed(Err(AppError::internal(
                            "a payment without its transaction",
                        ))),
                    },
                    None => Paid::Replayed(Err(AppError::internal("a payment answered twice"))),
                },
                Step::Open => Paid::Replayed(Err(AppError::internal("a payment left undecided"))),
            });
        }
        answers
    }

    async fn decide_and_commit(
        &self,
        calls: &[Paying],
        alone: bool,
        callers: &Callers,
        mut turn: Turn,
        steps: &mut [Step],
        made: &mut Vec<(Payment, Vec<OrderItem>)>,
    ) -> Result<Option<TxId>, StoreError> {
        let mut tx = postgres::begin_batch(&self.pg).await?;

        // 1. One statement: the keys claimed without waiting (a key twice in one batch runs
        // alone the second time), then the rows in the global lock order (orders, then the
        // buyers' balances), the orders' items, the time and the payment ids.
        let keys = call_keys(calls);
        let asked = asked(&keys, steps);
        if asked.is_empty() {
            tx.rollback().await?;
            return Ok(None);
        }
        let requests: Vec<PayRequest> = asked
            .iter()
            .map(|&i| PayRequest {
                user_id: calls[i].cmd.user_id,
                order_id: calls[i].cmd.order_id,
                key: keys[i].key().map(|k| (k, keys[i].fingerprint())),
            })
            .collect();
        let (paid_at, found) = pay_batch::lock(&mut tx, &requests, alone).await?;
        let mut fresh = Vec::new();
        let mut orders: HashMap<OrderId, OrderRow> = HashMap::new();
        let mut items: HashMap<OrderId, Vec<OrderItem>> = HashMap::new();
        let mut balances: HashMap<UserId, Option<Won>> = HashMap::new();
        let mut ids: HashMap<usize, PaymentId> = HashMap::new();
        for (&i, found) in asked.iter().zip(found) {
            if let Some(claim) = found.claim {
                steps[i] = step_of(i, claim, &mut fresh);
            }
            if let Some((order, order_items)) = found.order {
                if order.user_id == calls[i].cmd.user_id {
                    balances.insert(order.user_id, found.balance);
                }
                items.insert(order.id, order_items);
                orders.insert(order.id, order);
            }
            if let Some(id) = found.payment_id {
                ids.insert(i, id);
            }
        }
        let open: Vec<usize> = asked
            .into_iter()
            .filter(|&i| matches!(steps[i], Step::Open))
            .collect();

        // A payment whose caller left while the batch waited for those locks is left out.
        let open = left_in(&open, callers, steps);

        // 2. Payment by payment, as if alone, against the rows as the earlier ones left them.
        let now = Utc::now();
        let mut paying: Vec<(usize, OrderRow, Won)> = Vec::new();
        for i in open {
            let cmd = &calls[i].cmd;
            steps[i] = match decide(cmd, &mut orders, &mut balances, now) {
                Ok((order, balance_after)) => {
                    paying.push((i, order, balance_after));
                    Step::Done(paying.len() - 1)
                }
                Err(e) => Step::Refused(e),
            };
        }
        if paying.is_empty() {
            tx.rollback().await?;
            return Ok(None);
        }

        // 3. One statement: every write of the accepted payments, and the keys settled.
        let mut records = Vec::with_capacity(paying.len());
        let mut events = Vec::with_capacity(paying.len());
        for (i, order, balance_after) in &paying {
            let id = *ids
                .get(i)
                .ok_or_else(|| StoreError::Inconsistent("a payment without its id".into()))?;
            let event = PaymentCompleted {
                event_id: Uuid::new_v4(),
                payment_id: id,
                order_id: order.id,
                user_id: order.user_id,
                amount: order.final_amount,
                // An order paid twice in one batch is paid once: the second is refused.
                items: items.remove(&order.id).unwrap_or_default(),
                paid_at,
                // The number the batch's write takes for the order, whose row this batch holds.
                sequence: order.event_sequence + 1,
            };
            events.push(NewEvent::of(&event, calls[*i].trace.clone())?);
            records.push(PaymentRecord {
                id,
                order_id: order.id,
                user_id: order.user_id,
                amount: order.final_amount,
                balance_after: *balance_after,
                user_coupon_id: order.user_coupon_id,
            });
            made.push((
                Payment {
                    id,
                    order_id: order.id,
                    user_id: order.user_id,
                    amount: order.final_amount,
                    balance_after: *balance_after,
                    paid_at,
                },
                event.items,
            ));
        }
        let settled = settled(&keys, &fresh, steps, |n| made[n].0.id.get());
        // One transaction id for every payment of the batch: they commit together.
        let tx_id = pay_batch::write(&mut tx, &records, paid_at, events, &settled).await?;
        turn.committing();
        postgres::commit(tx).await?;
        Ok(Some(tx_id))
    }
}

/// The checks of one payment, in the order a lone payment makes them: the order exists, is the
/// caller's, is open and not expired; the balance covers it. On success the order is marked
/// paid and the balance debited in the batch's rows; the balance after is returned.
fn decide(
    cmd: &PayCommand,
    orders: &mut HashMap<OrderId, OrderRow>,
    balances: &mut HashMap<UserId, Option<Won>>,
    now: chrono::DateTime<Utc>,
) -> Result<(OrderRow, Won), AppError> {
    let order = orders.get_mut(&cmd.order_id).ok_or(AppError::NotFound {
        resource: Resource::Order,
        id: cmd.order_id.get(),
    })?;
    if order.user_id != cmd.user_id {
        return Err(AppError::NotOrderOwner);
    }
    match order.status {
        OrderStatus::PendingPayment if order.expires_at <= now => {
            return Err(AppError::OrderExpired);
        }
        OrderStatus::PendingPayment => {}
        OrderStatus::Paid | OrderStatus::PartiallyRefunded | OrderStatus::Refunded => {
            return Err(AppError::OrderAlreadyPaid);
        }
        status @ (OrderStatus::Cancelled | OrderStatus::Expired) => {
            return Err(AppError::OrderClosed { status });
        }
    }
    let amount = order.final_amount;
    let balance = balances.entry(cmd.user_id).or_insert(None);
    // A buyer who never charged can still pay a fully discounted order (their row is opened).
    let after = match *balance {
        Some(b) if b >= amount => Won::new(b.get() - amount.get()),
        None if amount == Won::ZERO => Won::ZERO,
        _ => return Err(AppError::InsufficientBalance { required: amount }),
    };
    *balance = Some(after);
    order.status = OrderStatus::Paid;
    Ok((order.clone(), after))
}
