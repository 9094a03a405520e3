//! Lifecycle events: every order transition writes one event to the outbox, in the
//! transition's own transaction, numbered with the order's next event number.
//!
//! Invariant: exactly one event per transition, committed or rolled back with it, and an
//! order's events numbered 1, 2, 3... in the order of its transitions: each number is taken
//! from `orders.event_sequence` under the order's row lock, which the transition holds anyway.
//! Placing is 1 (the column's default, so PlaceOrder's batches and Checkout write their
//! `OrderPlaced` events in the statement that writes their orders); Pay, cancel and expiry take
//! theirs in their batch statements (the locked row's number + 1); refunds take theirs through
//! [`record`].
//!
//! Cancel safety: nothing here commits; a transition dropped before its commit leaves neither
//! its change nor its event.

use sqlx::PgConnection;

use super::idempotency::Keyed;
use crate::{
    domain::{EventSequence, IdempotencyKey, OrderEvent, OrderId, UserId},
    store::{
        StoreError,
        postgres::{
            orders,
            outbox::{self, NewEvent},
        },
    },
    telemetry::TraceContext,
};

/// Writes one event per order of `orders` (distinct ids, whose rows `tx` holds locked for the
/// transition the events report): `build(i, sequence)` makes the event of `orders[i]` with
/// that order's next event number. One statement takes the numbers, one inserts the events.
///
/// The refund flow calls it with the refunded order, building an `OrderRefunded`.
pub(in crate::app) async fn record<E: OrderEvent>(
    tx: &mut PgConnection,
    orders: &[OrderId],
    trace: &TraceContext,
    build: impl Fn(usize, EventSequence) -> E,
) -> Result<(), StoreError> {
    if orders.is_empty() {
        return Ok(());
    }
    let sequences = orders::next_event_sequences(&mut *tx, orders).await?;
    let events = sequences
        .into_iter()
        .enumerate()
        .map(|(i, sequence)| NewEvent::of(&build(i, sequence), trace.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    outbox::enqueue_many(tx, events).await
}

/// A call on its way to a group-commit batch, with the trace context of its caller, captured in
/// the caller's task before it joins the batch: the event the batch writes for it carries the
/// caller's trace, not the batch's.
pub(in crate::app) struct Traced<C> {
    pub cmd: C,
    pub trace: TraceContext,
}

impl<C> Traced<C> {
    pub fn new(cmd: C) -> Self {
        Self {
            cmd,
            trace: TraceContext::current(),
        }
    }
}

impl<C: Keyed> Keyed for Traced<C> {
    fn user_id(&self) -> UserId {
        self.cmd.user_id()
    }

    fn key(&self) -> Option<&IdempotencyKey> {
        self.cmd.key()
    }

    fn fingerprint(&self) -> String {
        self.cmd.fingerprint()
    }
}
