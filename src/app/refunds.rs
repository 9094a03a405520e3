//! Refunding paid orders (AdminService/RefundOrder).
//!
//! Invariants: refunds never give back more than an order was paid, per line and in total,
//! however they race each other, a cancel or the expiry job; once every unit is refunded they
//! have given back exactly the final amount (`domain::Allocation` shares it). The buyer's
//! balance is credited with its REFUND ledger entry in the same transaction, so it always equals
//! its ledger. A full refund gives the order's coupon back while the coupon is still valid.
//!
//! One transaction, in the global lock order (orders → balances → coupons → products, as
//! payments, cancels and expiry take them, so none of them deadlock with a refund): claim the
//! idempotency key, lock the order and decide the refund against its rows as they are now
//! (PAID or PARTIALLY_REFUNDED, enough units left), lock the buyer's balance, give the coupon
//! back, put the units back in stock, write the refund with the counters it bumps (the
//! schema's CHECKs on them refuse anything past what was paid, whatever the code does) and its
//! `OrderRefunded` event, numbered under the order's lock ([`super::events`]). Refunds
//! of one order thus run one after the other, each seeing what the previous one left.
//! After the commit the restocked products lose their sold-out markers (so every replica can
//! sell the units within 100 ms) and the refunded units leave the ranking's bucket of the day
//! the order was paid.
//!
//! The idempotency key is required and scoped to the order's buyer (operation REFUND): a refund
//! moves that buyer's money, so its key lives beside the buyer's other money keys and is purged
//! with them, while AdminService has no caller identity of its own (one shared admin token) that
//! would keep two operators' `refund-1` for different buyers apart. The request's fingerprint
//! holds the order id, so one key reused for another order of the same buyer is refused
//! (IDEMPOTENCY_KEY_REUSED). The buyer is read (without a lock: it never changes) before the
//! key is claimed, and the key is claimed before the order is locked, as every keyed call
//! claims first: a duplicate waits on the key, never on the order while holding the key.
//!
//! Cancel safety: after the key lookup, the refund runs in a task of its own that the call only
//! awaits: its transaction commits or rolls back as a whole whatever the caller does, and a
//! committed refund always clears its markers and bumps the ranking. A caller that went away
//! learns the outcome by retrying with its key.

use std::sync::Arc;

use tokio::sync::Notify;
use tracing::Instrument as _;

use super::{
    Popular, SoldOut, events,
    idempotency::{Keyed, NextAction, next_action, saved_result},
    popular::Unsold,
};
use crate::{
    domain::{
        IdempotencyKey, Order, OrderId, OrderRefunded, OrderStatus, ProductId, Refund, RefundId,
        RefundPlan, RefundReason, RefundRefusal, RefundSelection, Restock, TxId, UserId,
        ValidationError, Won,
    },
    error::{AppError, Resource},
    metrics,
    store::postgres::{
        self as postgres,
        idempotency::{self, Operation},
        orders::{self, OrderRow},
        payments,
        refunds::{self, RefundRecord},
    },
    telemetry::{self, TraceContext},
};

pub struct RefundCommand {
    pub order_id: OrderId,
    pub selection: RefundSelection,
    pub restock: bool,
    pub reason: RefundReason,
    pub idempotency_key: IdempotencyKey,
}

/// A refund with the buyer its key is scoped to.
struct KeyedRefund<'a> {
    buyer: UserId,
    cmd: &'a RefundCommand,
}

impl Keyed for KeyedRefund<'_> {
    fn user_id(&self) -> UserId {
        self.buyer
    }

    fn key(&self) -> Option<&IdempotencyKey> {
        Some(&self.cmd.idempotency_key)
    }

    fn fingerprint(&self) -> String {
        let cmd = self.cmd;
        format!(
            "order={};lines={};restock={};reason={}",
            cmd.order_id,
            cmd.selection.fingerprint(),
            cmd.restock,
            cmd.reason.as_str()
        )
    }
}

/// The refund flow.
pub struct Refunds {
    flow: Arc<RefundFlow>,
}

struct RefundFlow {
    pg: sqlx::PgPool,
    /// Cleared for restocked products.
    sold_out: Arc<SoldOut>,
    /// Refunded units leave the ranking.
    popular: Arc<Popular>,
    /// Wakes the outbox job: the refund's event should leave at once.
    outbox_nudge: Arc<Notify>,
}

/// A refund made by this call's transaction.
struct Made {
    order: Order,
    refund: Refund,
    restocks: Vec<Restock>,
    tx: TxId,
}

/// What a refund's transaction did.
enum Committed {
    Made(Box<Made>),
    /// The key already holds this refund.
    Replayed(i64),
}

impl Refunds {
    pub fn new(
        pg: sqlx::PgPool,
        sold_out: Arc<SoldOut>,
        popular: Arc<Popular>,
        outbox_nudge: Arc<Notify>,
    ) -> Self {
        Self {
            flow: Arc::new(RefundFlow {
                pg,
                sold_out,
                popular,
                outbox_nudge,
            }),
        }
    }

    /// Refunds `cmd`; returns the order as the refund left it, and the refund. A replay returns
    /// the first refund and the order as it is now.
    pub async fn refund(&self, cmd: RefundCommand) -> Result<(Order, Refund), AppError> {
        let result = self
            .try_refund(cmd)
            .instrument(telemetry::step("refunds.refund"))
            .await;
        metrics::refund(metrics::outcome(&result));
        result
    }

    async fn try_refund(&self, cmd: RefundCommand) -> Result<(Order, Refund), AppError> {
        let flow = &self.flow;
        let buyer = orders::buyer(&flow.pg, cmd.order_id)
            .await?
            .ok_or(not_found(cmd.order_id))?;
        let keyed = KeyedRefund { buyer, cmd: &cmd };
        if let Some(id) = saved_result(&flow.pg, Operation::Refund, &keyed).await? {
            return flow.saved(id).await;
        }
        let flow = flow.clone();
        let refund = async move { flow.refund(buyer, cmd).await };
        tokio::spawn(refund.in_current_span())
            .await
            .map_err(AppError::internal)?
    }
}

impl RefundFlow {
    async fn refund(&self, buyer: UserId, cmd: RefundCommand) -> Result<(Order, Refund), AppError> {
        let Made {
            order,
            refund,
            restocks,
            tx,
        } = match self.commit(buyer, &cmd).await? {
            Committed::Replayed(id) => return self.saved(id).await,
            Committed::Made(made) => *made,
        };
        self.outbox_nudge.notify_one();
        self.sold_out.clear(restocks).await;
        if let Some(paid_at) = order.paid_at {
            let unsold = Unsold {
                refund_id: refund.id,
                tx,
                paid_at,
                lines: refund.lines.clone(),
            };
            self.popular.record_refund(&unsold).await;
        }
        Ok((order, refund))
    }

    /// The refund's transaction (the module docs give its steps).
    async fn commit(&self, buyer: UserId, cmd: &RefundCommand) -> Result<Committed, AppError> {
        let mut tx = self.pg.begin().await?;
        let keyed = KeyedRefund { buyer, cmd };
        let key = Some(&cmd.idempotency_key);
        if let NextAction::ReturnSaved(id) =
            next_action(&mut tx, buyer, Operation::Refund, key, || {
                keyed.fingerprint()
            })
            .await?
        {
            return Ok(Committed::Replayed(id));
        }
        let order = orders::lock(&mut tx, cmd.order_id)
            .await?
            .ok_or(not_found(cmd.order_id))?;
        if !order.status.is_refundable() {
            return Err(AppError::OrderNotRefundable {
                status: order.status,
            });
        }
        let items = orders::items(&mut *tx, order.id).await?;
        let plan = RefundPlan::new(&items, order.final_amount, &cmd.selection)
            .map_err(|refusal| refused(refusal, &order))?;

        let balance = payments::lock_balances(&mut tx, &[buyer])
            .await?
            .into_iter()
            .next()
            .map(|(_, balance)| balance)
            .ok_or_else(|| AppError::internal(format!("paid order {} has no balance", order.id)))?;
        // The credit gives back money the balance once held; only an i64 overflow refuses it.
        if balance.checked_add(plan.amount).is_none() {
            return Err(AppError::BalanceLimitExceeded {
                max: Won::new(i64::MAX),
            });
        }
        let coupon_returned = match order.user_coupon_id {
            Some(coupon) if plan.completes => {
                refunds::return_coupon(&mut tx, coupon, order.id).await?
            }
            _ => false,
        };
        let restocks = if cmd.restock {
            let units: Vec<(ProductId, i64)> = plan
                .lines
                .iter()
                .map(|l| (l.product_id, i64::from(l.quantity)))
                .collect();
            orders::restock(&mut tx, &units).await?
        } else {
            Vec::new()
        };
        let status = if plan.completes {
            OrderStatus::Refunded
        } else {
            OrderStatus::PartiallyRefunded
        };
        let recorded = refunds::record(
            &mut tx,
            &RefundRecord {
                order_id: order.id,
                user_id: buyer,
                lines: &plan.lines,
                amount: plan.amount,
                status,
                restocked: cmd.restock,
                coupon_returned,
                reason: cmd.reason.as_str(),
            },
        )
        .await?;
        // Its event, numbered under the order's lock, commits with it.
        let trace = TraceContext::current();
        events::record(&mut tx, &[order.id], &trace, |_, sequence| OrderRefunded {
            order_id: order.id,
            user_id: buyer,
            sequence,
            refund_id: recorded.id.get(),
            amount: plan.amount,
            refunded_amount: recorded.order.refunded_amount,
            fully_refunded: plan.completes,
            lines: plan.lines.clone(),
            restocked: cmd.restock,
            reason: cmd.reason.as_str().to_owned(),
            refunded_at: recorded.created_at,
        })
        .await?;
        idempotency::complete(
            &mut tx,
            buyer,
            Operation::Refund,
            &cmd.idempotency_key,
            recorded.id.get(),
        )
        .await?;
        postgres::commit(tx).await?;

        let items = items
            .into_iter()
            .map(|mut item| {
                if let Some(line) = plan.lines.iter().find(|l| l.product_id == item.product_id) {
                    item.refunded_quantity += line.quantity;
                }
                item
            })
            .collect();
        let refund = Refund {
            id: recorded.id,
            order_id: order.id,
            user_id: buyer,
            lines: plan.lines,
            amount: plan.amount,
            balance_after: recorded.balance_after,
            restocked: cmd.restock,
            coupon_returned,
            reason: cmd.reason.as_str().to_owned(),
            created_at: recorded.created_at,
        };
        Ok(Committed::Made(Box::new(Made {
            order: recorded.order.with_items(items),
            refund,
            restocks,
            tx: recorded.tx,
        })))
    }

    /// The refund stored under a key, and its order as it is now.
    async fn saved(&self, id: i64) -> Result<(Order, Refund), AppError> {
        let id = RefundId::parse(id, "refund_id")?;
        let mut conn = self.pg.acquire().await?;
        let refund = refunds::get(&mut conn, id)
            .await?
            .ok_or_else(|| AppError::internal(format!("idempotency result {id} has no refund")))?;
        let order = orders::get(&mut conn, refund.order_id)
            .await?
            .ok_or_else(|| AppError::internal(format!("refund {id} has no order")))?;
        Ok((order, refund))
    }
}

fn not_found(order: OrderId) -> AppError {
    AppError::NotFound {
        resource: Resource::Order,
        id: order.get(),
    }
}

fn refused(refusal: RefundRefusal, order: &OrderRow) -> AppError {
    match refusal {
        RefundRefusal::NotInOrder(product) => AppError::InvalidArgument(ValidationError::new(
            "lines",
            format!("product {product} is not a line of order {}", order.id),
        )),
        RefundRefusal::ExceedsRemaining { product, remaining } => {
            AppError::RefundExceedsRemaining {
                product_id: product.get(),
                remaining,
            }
        }
        RefundRefusal::NothingLeft => AppError::OrderNotRefundable {
            status: order.status,
        },
        RefundRefusal::Inconsistent => {
            AppError::internal(format!("order {} cannot share its amount", order.id))
        }
    }
}
