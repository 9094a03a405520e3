//! Paying an order from the buyer's balance.
//!
//! Invariants: at most one payment per order; the balance never goes negative and always
//! equals its ledger; every payment has exactly one PaymentCompleted event in the outbox,
//! written in the payment's transaction, so the data platform gets every payment even if this
//! process dies right after the commit.
//!
//! Payments are group-committed ([`super::group_commit`]) like orders: one transaction pays a
//! batch. The idempotency key is looked up before a payment joins a batch and claimed in it
//! without waiting (a key being claimed elsewhere sends the payment to run alone). The batch
//! locks its orders (ascending id), then its buyers' balances (ascending user id): the global
//! lock order (orders → balances → coupons → products) that cancels and expiry follow too.
//! Then it decides payment by payment, in queue order, as if each ran alone after the earlier
//! ones: order found, the caller's, open and not expired, balance enough (what the earlier
//! payments of the batch left of it). A refused payment takes nothing and gives its key claim
//! back. The accepted ones are written by multi-row statements (ledger entries, payments, the
//! orders as PAID, the coupons as USED, one debit per buyer, the outbox events), and the batch
//! commits before anyone hears OK.
//!
//! Cancel safety: a batch runs in a task of its own, so it commits or rolls back whatever its
//! callers do; a payment whose caller left before its batch started is not made at all. After
//! the commit, the ranking bump runs in its own task and finishes regardless.

use std::{collections::HashMap, sync::Arc};

use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

use super::{
    Popular,
    group_commit::{GroupCommit, Step, batch_failed},
    idempotency::{BatchKeys, Keyed, call_keys, claim_batch, saved_result, settle_batch},
};
use crate::{
    domain::{
        IdempotencyKey, OrderId, OrderItem, OrderStatus, Payment, PaymentCompleted, PaymentId,
        UserId, Won,
    },
    error::{AppError, Resource},
    metrics,
    store::{
        StoreError,
        postgres::{
            idempotency::Operation,
            orders::{self, OrderRow},
            outbox::{self, NewEvent},
            payments::{self, PaymentRecord},
        },
    },
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

/// The payment flow.
pub struct Payments {
    pg: PgPool,
    /// Counts each payment's items in the ranking.
    popular: Arc<Popular>,
    /// Wakes the outbox job: a payment's event should leave at once.
    outbox_nudge: Arc<Notify>,
    paying: GroupCommit<PayCommand, Paid>,
}

impl Payments {
    /// `write_batch_max`: payments made by one transaction at most (1: each alone).
    pub fn new(
        pg: PgPool,
        popular: Arc<Popular>,
        outbox_nudge: Arc<Notify>,
        write_batch_max: usize,
    ) -> Self {
        let batch = Arc::new(PayBatch { pg: pg.clone() });
        let paying = GroupCommit::start(
            "pay",
            write_batch_max,
            Arc::new(move |calls, alone| Box::pin(batch.clone().run(calls, alone))),
        );
        Self {
            pg,
            popular,
            outbox_nudge,
            paying,
        }
    }

    pub async fn pay(&self, cmd: PayCommand) -> Result<Payment, AppError> {
        let result = self.try_pay(cmd).await;
        metrics::payment(metrics::outcome(&result));
        result
    }

    async fn try_pay(&self, cmd: PayCommand) -> Result<Payment, AppError> {
        if let Some(id) = saved_result(&self.pg, Operation::Pay, &cmd).await? {
            return saved_payment(&self.pg, id).await;
        }
        let paid = match self.paying.submit(cmd).await? {
            Paid::Busy(cmd) => self.paying.alone(cmd).await?,
            paid => paid,
        };
        match paid {
            Paid::Replayed(result) => result,
            Paid::Made { payment, items } => {
                self.outbox_nudge.notify_one();
                // The ranking bump runs to the end even if the caller has gone (the ranking job
                // would only restore a lost bump at its next run).
                let (popular, paid_at) = (self.popular.clone(), payment.paid_at);
                let _ =
                    tokio::spawn(async move { popular.record_sale(&items, paid_at).await }).await;
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
    /// Made by this call, with the order's items for the ranking.
    Made {
        payment: Payment,
        items: Vec<OrderItem>,
    },
    /// Refused, or a replay of an earlier payment (no new sale to count).
    Replayed(Result<Payment, AppError>),
    /// Its key is being claimed by another transaction: it must run alone.
    Busy(PayCommand),
}

/// Pays a batch in one transaction (the module docs say how).
struct PayBatch {
    pg: PgPool,
}

impl PayBatch {
    async fn run(self: Arc<Self>, calls: Vec<PayCommand>, alone: bool) -> Vec<Paid> {
        let mut steps: Vec<Step> = calls.iter().map(|_| Step::Open).collect();
        let mut made = Vec::new();
        if let Err(e) = self
            .decide_and_commit(&calls, alone, &mut steps, &mut made)
            .await
        {
            return calls
                .into_iter()
                .map(|_| Paid::Replayed(Err(batch_failed(&e))))
                .collect();
        }
        let mut made: Vec<Option<(Payment, Vec<OrderItem>)>> = made.into_iter().map(Some).collect();
        let mut answers = Vec::with_capacity(calls.len());
        for (cmd, step) in calls.into_iter().zip(steps) {
            answers.push(match step {
                Step::Busy => Paid::Busy(cmd),
                Step::Replay(id) => Paid::Replayed(saved_payment(&self.pg, id).await),
                Step::Refused(e) => Paid::Replayed(Err(e)),
                Step::Done(i) => match made[i].take() {
                    Some((payment, items)) => Paid::Made { payment, items },
                    None => Paid::Replayed(Err(AppError::internal("a payment answered twice"))),
                },
                Step::Open => Paid::Replayed(Err(AppError::internal("a payment left undecided"))),
            });
        }
        answers
    }

    async fn decide_and_commit(
        &self,
        calls: &[PayCommand],
        alone: bool,
        steps: &mut [Step],
        made: &mut Vec<(Payment, Vec<OrderItem>)>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pg.begin().await?;

        // 1. Keys: claimed without waiting; a key twice in one batch runs alone the second time.
        let keys = call_keys(calls);
        let BatchKeys { fresh, open } =
            claim_batch(&mut tx, Operation::Pay, &keys, alone, steps).await?;

        // 2. Rows, in the global lock order: orders, then the buyers' balances.
        let mut order_ids: Vec<OrderId> = open.iter().map(|&i| calls[i].order_id).collect();
        order_ids.sort_unstable();
        order_ids.dedup();
        let mut orders: HashMap<OrderId, OrderRow> = if order_ids.is_empty() {
            HashMap::new()
        } else {
            orders::lock_many(&mut tx, &order_ids)
                .await?
                .into_iter()
                .map(|o| (o.id, o))
                .collect()
        };
        let mut buyers: Vec<UserId> = open
            .iter()
            .filter(|&&i| {
                orders
                    .get(&calls[i].order_id)
                    .is_some_and(|o| o.user_id == calls[i].user_id)
            })
            .map(|&i| calls[i].user_id)
            .collect();
        buyers.sort_unstable();
        buyers.dedup();
        let mut balances: HashMap<UserId, Option<Won>> =
            buyers.iter().map(|&u| (u, None)).collect();
        if !buyers.is_empty() {
            for (user, balance) in payments::lock_balances(&mut tx, &buyers).await? {
                balances.insert(user, Some(balance));
            }
        }

        // 3. Payment by payment, as if alone, against the rows as the earlier ones left them.
        let now = Utc::now();
        let mut paying: Vec<(usize, OrderRow, Won)> = Vec::new();
        for &i in &open {
            let cmd = &calls[i];
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
            return Ok(());
        }

        // 4. Ids and the batch's time first, so that the events can name their payments.
        let (paid_at, ids) = payments::reserve_ids(&mut tx, paying.len()).await?;
        let paid_orders: Vec<OrderId> = paying.iter().map(|(_, o, _)| o.id).collect();
        let mut items: HashMap<OrderId, Vec<OrderItem>> = HashMap::new();
        for (order, item) in orders::items_of(&mut *tx, &paid_orders).await? {
            items.entry(order).or_default().push(item);
        }
        let mut records = Vec::with_capacity(paying.len());
        let mut events = Vec::with_capacity(paying.len());
        for ((_, order, balance_after), &id) in paying.iter().zip(&ids) {
            let order_items = items.remove(&order.id).unwrap_or_default();
            let event = PaymentCompleted {
                event_id: Uuid::new_v4(),
                payment_id: id,
                order_id: order.id,
                user_id: order.user_id,
                amount: order.final_amount,
                items: order_items,
                paid_at,
            };
            let payload = serde_json::to_value(&event)
                .map_err(|e| StoreError::Inconsistent(format!("event payload: {e}")))?;
            events.push(NewEvent {
                event_id: event.event_id,
                event_type: PaymentCompleted::EVENT_TYPE,
                aggregate_id: id.get(),
                payload,
            });
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
        payments::record_many(&mut tx, &records, paid_at).await?;
        outbox::enqueue_many(&mut tx, events).await?;
        settle_batch(&mut tx, Operation::Pay, &keys, &fresh, steps, |n| {
            made[n].0.id.get()
        })
        .await?;
        tx.commit().await?;
        Ok(())
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
        OrderStatus::Paid => return Err(AppError::OrderAlreadyPaid),
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
