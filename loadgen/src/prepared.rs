//! The pay-only scenario's orders, placed during the set-up so that the run measures Pay alone.
//!
//! Guarantees: each order is placed with its own idempotency key, so a retried PlaceOrder never
//! places a second order; order `i` belongs to buyer `i mod buyers`, so consecutive orders (and
//! so concurrent Pays) are of distinct buyers, as in pgbench's naive payment; a set-up that
//! cannot place every order fails instead of running short.

use anyhow::{Context, anyhow};
use futures::{StreamExt, TryStreamExt, stream};

use super::{
    connect::{Connections, describe, retry},
    seen::PlacedOrder,
};
use ecommerce::proto::{OrderLine, PlaceOrderRequest, order_service_client::OrderServiceClient};

/// Places `count` one-unit orders of `product_id`, round-robin over `buyers`, in order.
pub async fn place(
    connections: &Connections,
    product_id: i64,
    buyers: &[i64],
    count: u64,
    tag: &str,
    concurrency: usize,
) -> anyhow::Result<Vec<PlacedOrder>> {
    anyhow::ensure!(!buyers.is_empty(), "no buyer to prepare orders for");
    stream::iter(0..count)
        .map(|i| {
            let user_id = buyers[(i % buyers.len() as u64) as usize];
            let client = OrderServiceClient::new(connections.channel(i as usize));
            let request = PlaceOrderRequest {
                user_id,
                items: vec![OrderLine {
                    product_id,
                    quantity: 1,
                }],
                user_coupon_id: 0,
                idempotency_key: format!("{tag}-prepared-{i}"),
            };
            async move {
                let order = retry(|| {
                    let (mut client, request) = (client.clone(), request.clone());
                    async move { client.place_order(request).await }
                })
                .await
                .map_err(|s| anyhow!("preparing order {i} of user {user_id}: {}", describe(&s)))?
                .order
                .with_context(|| format!("PlaceOrder answered order {i} without the order"))?;
                Ok::<_, anyhow::Error>(PlacedOrder {
                    order_id: order.id,
                    user_id,
                    units: 1,
                    amount: order.final_amount,
                })
            }
        })
        .buffered(concurrency.max(1))
        .try_collect()
        .await
}
