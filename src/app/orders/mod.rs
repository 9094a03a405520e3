//! Placing, reading, cancelling and expiring orders.
//!
//! Invariant: an order reserves all its stock and its coupon, priced and checked against the
//! balance, in one transaction, or leaves no trace; cancelling or expiring an open order gives
//! back exactly what it held. Orders without an idempotency key for a product known to be sold
//! out are refused from Redis without touching Postgres; keyed orders look their key up first,
//! so a retry of a success is never refused by that shortcut.
//!
//! Every transition writes its event in its own transaction ([`super::events`]): an
//! `OrderPlaced` per order placed (a batch writes its orders' events in the statement that
//! writes the orders), an `OrderCancelled` or `OrderExpired` per order closed; each commit then
//! nudges the outbox job.
//!
//! Placing is group-committed ([`super::group_commit`]): concurrent orders are placed by one
//! transaction, so a hot product's row is locked once and its stock taken once (`stock - sum`)
//! for the whole batch, and one WAL flush commits them all. The transaction is two statements
//! and the commit, whatever the batch's size ([`place_batch`](crate::store::postgres::place_batch)),
//! so the hot rows stay locked for one round trip and the commit. Each order still gets exactly
//! the answer it would get alone, because the batch decides order by order, in queue order, as
//! if they ran one after another (see [`PlaceBatch`]):
//! - the idempotency key is claimed in the batch without waiting, and the claim answers a
//!   replay or a reused key (a key another transaction is claiming sends its order to run
//!   alone, where it waits for that transaction as before); it is looked up before only when a
//!   sold-out product would refuse the order from memory, so a retry of a success gets it;
//! - the statement that claims the keys also locks every coupon, then every product the open
//!   orders name (ascending ids: the global lock order, orders → balances → coupons →
//!   products, which cancels and expiry follow too, so batches never deadlock with them or with
//!   each other, on this replica or another), reads them and the buyers' balances once, and
//!   reserves an order id for each open order;
//! - each order is then checked in Rust against those rows as the earlier orders of the batch
//!   left them; one that fails (unknown product, not selling, out of stock, bad coupon, balance
//!   too low) takes nothing and changes nothing for the others; its key claim is given back;
//! - the orders that passed are written by one statement of data-modifying CTEs over UNNEST'ed
//!   arrays (orders, items, stock, coupons, events, the keys' results), and the batch commits.
//!   Nobody hears OK before that commit.
//!
//! Checkout places its order by the same two statements ([`PlaceBatch::decide_and_write`], one
//! call, not batched) inside the cart's transaction, which it commits with the emptied cart;
//! its key, claimed for Checkout by its caller, gets the order's id in the second statement.
//!
//! Cancel safety: a batch runs in a task of its own, so it commits or rolls back whatever its
//! callers do; an order whose caller left before its batch started, or while the batch waited
//! for its row locks (a hot product held by another transaction: a deadline passes), is not
//! placed at all, so an abandoned order holds no stock or coupon.
//! Cancelling and expiring are each one transaction, so a call dropped before its commit leaves
//! nothing. After a commit that gave stock back, the sold-out markers are cleared in a task of
//! their own, which finishes even if the caller has gone.
//!
//! The flows live in one file each: [`place`] (PlaceOrder and Checkout's placement), [`close`]
//! (cancel and expiry) and [`read`] (GetOrder).

mod close;
mod place;
mod read;

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use tokio::sync::Notify;

pub(super) use place::saved_order;
use place::{PlaceBatch, Placed, Placing};

use super::{
    group_commit::{GroupCommit, WriteBatches},
    idempotency::Keyed,
    rate_limit::UserRateLimit,
    sold_out::SoldOut,
};
use crate::domain::{IdempotencyKey, OrderLines, ProductId, UserCouponId, UserId};

pub struct PlaceOrderCommand {
    pub user_id: UserId,
    pub lines: OrderLines,
    pub user_coupon_id: Option<UserCouponId>,
    pub idempotency_key: Option<IdempotencyKey>,
}

impl Keyed for PlaceOrderCommand {
    fn user_id(&self) -> UserId {
        self.user_id
    }

    fn key(&self) -> Option<&IdempotencyKey> {
        self.idempotency_key.as_ref()
    }

    fn fingerprint(&self) -> String {
        format!(
            "{};coupon={}",
            self.lines.fingerprint(),
            self.user_coupon_id.map_or(0, UserCouponId::get)
        )
    }
}

impl PlaceOrderCommand {
    fn product_ids(&self) -> Vec<ProductId> {
        self.lines.as_slice().iter().map(|l| l.product_id).collect()
    }
}

/// The order flows.
pub struct Orders {
    pg: PgPool,
    sold_out: Arc<SoldOut>,
    placing: GroupCommit<Placing, Placed>,
    /// The placement rules, shared by the batches and by a checkout's transaction.
    batch: Arc<PlaceBatch>,
    rate: Arc<UserRateLimit>,
    /// Wakes the outbox job after a commit that wrote events, so they leave at once.
    outbox_nudge: Arc<Notify>,
}

impl Orders {
    /// `order_ttl`: an unpaid order expires after this. `batches`: how orders are gathered into
    /// transactions ([`WriteBatches`]).
    pub fn new(
        pg: PgPool,
        sold_out: Arc<SoldOut>,
        order_ttl: Duration,
        batches: WriteBatches,
        rate: Arc<UserRateLimit>,
        outbox_nudge: Arc<Notify>,
    ) -> Self {
        let batch = Arc::new(PlaceBatch {
            pg: pg.clone(),
            sold_out: sold_out.clone(),
            order_ttl,
        });
        let runner = batch.clone();
        let placing = GroupCommit::start(
            "orders.place_batch",
            batches,
            Arc::new(move |calls, alone, callers, turn| {
                Box::pin(runner.clone().run(calls, alone, callers, turn))
            }),
        );
        Self {
            pg,
            sold_out,
            placing,
            batch,
            rate,
            outbox_nudge,
        }
    }
}
