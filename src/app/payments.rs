//! Paying an order from the buyer's balance.
//!
//! Invariants: at most one payment per order; the balance never goes negative and always
//! equals its ledger; every payment has exactly one PaymentCompleted event in the outbox,
//! written in the payment's transaction, so the data platform gets every payment even if this
//! process dies right after the commit.
//!
//! Cancel safety: the payment is one transaction, so a call dropped before its commit leaves
//! nothing; after the commit, the ranking bump runs in its own task and finishes regardless.

use std::sync::Arc;

use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::Notify;
use tracing::Instrument as _;
use uuid::Uuid;

use super::{
    Popular,
    idempotency::{NextAction, next_action},
    popular::Sale,
    rate_limit::{LimitedCall, UserRateLimit},
};
use crate::{
    domain::{IdempotencyKey, OrderId, OrderStatus, Payment, PaymentCompleted, PaymentId, UserId},
    error::{AppError, Resource},
    metrics,
    store::postgres::{
        self as postgres,
        idempotency::{self, Operation},
        orders, outbox,
        payments::{self, PaymentRecord},
    },
    telemetry,
};

pub struct PayCommand {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub idempotency_key: Option<IdempotencyKey>,
}

/// The payment flow.
pub struct Payments {
    pg: PgPool,
    /// Counts each payment's items in the ranking.
    popular: Arc<Popular>,
    /// Wakes the outbox job: a payment's event should leave at once.
    outbox_nudge: Arc<Notify>,
    rate: Arc<UserRateLimit>,
}

impl Payments {
    pub fn new(
        pg: PgPool,
        popular: Arc<Popular>,
        outbox_nudge: Arc<Notify>,
        rate: Arc<UserRateLimit>,
    ) -> Self {
        Self {
            pg,
            popular,
            outbox_nudge,
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
        let mut tx = self.pg.begin().await?;
        let key = cmd.idempotency_key.as_ref();
        match next_action(&mut tx, cmd.user_id, Operation::Pay, key, || {
            cmd.order_id.get().to_string()
        })
        .await?
        {
            NextAction::Start => {}
            NextAction::ReturnSaved(payment_id) => {
                let id = PaymentId::parse(payment_id, "payment_id")?;
                return payments::get(&mut *tx, id).await?.ok_or_else(|| {
                    AppError::internal(format!("idempotency result {id} has no payment"))
                });
            }
        }

        let order = orders::lock(&mut tx, cmd.order_id)
            .await?
            .ok_or(AppError::NotFound {
                resource: Resource::Order,
                id: cmd.order_id.get(),
            })?;
        if order.user_id != cmd.user_id {
            return Err(AppError::NotOrderOwner);
        }
        match order.status {
            OrderStatus::PendingPayment if order.expires_at <= Utc::now() => {
                return Err(AppError::OrderExpired);
            }
            OrderStatus::PendingPayment => {}
            OrderStatus::Paid => return Err(AppError::OrderAlreadyPaid),
            status @ (OrderStatus::Cancelled | OrderStatus::Expired) => {
                return Err(AppError::OrderClosed { status });
            }
        }

        let amount = order.final_amount;
        let balance_after = payments::deduct(&mut tx, cmd.user_id, amount)
            .await?
            .ok_or(AppError::InsufficientBalance { required: amount })?;
        let (payment, tx_id) = payments::record(
            &mut tx,
            PaymentRecord {
                order_id: order.id,
                user_id: order.user_id,
                amount,
                balance_after,
                user_coupon_id: order.user_coupon_id,
            },
        )
        .await?;
        let items = orders::items(&mut *tx, order.id).await?;
        let event = PaymentCompleted {
            event_id: Uuid::new_v4(),
            payment_id: payment.id,
            order_id: order.id,
            user_id: order.user_id,
            amount,
            items,
            paid_at: payment.paid_at,
        };
        let payload = serde_json::to_value(&event).map_err(AppError::internal)?;
        outbox::enqueue(
            &mut tx,
            event.event_id,
            PaymentCompleted::EVENT_TYPE,
            payment.id.get(),
            &payload,
            &telemetry::TraceContext::current(),
        )
        .await?;
        if let Some(key) = &cmd.idempotency_key {
            idempotency::complete(&mut tx, cmd.user_id, Operation::Pay, key, payment.id.get())
                .await?;
        }
        postgres::commit(tx).await?;

        self.outbox_nudge.notify_one();
        // The ranking bump runs to the end even if the caller has gone (the ranking job would
        // only restore a lost bump at its next run). The reply waits for it, so a read that
        // follows the reply on this replica counts this payment.
        let sale = Sale {
            payment_id: payment.id,
            tx: tx_id,
            paid_at: payment.paid_at,
            items: event.items,
        };
        let popular = self.popular.clone();
        let bump = async move { popular.record_sale(&sale).await };
        let _ = tokio::spawn(bump.in_current_span()).await;
        Ok(payment)
    }
}
