//! Sold-out markers: once a product is found out of stock, orders for it are refused from
//! Redis for a few seconds instead of queueing on its Postgres row lock.
//!
//! A marker is only a shortcut. It expires by itself (bounding how long a stale one can refuse
//! orders after stock comes back) and is deleted whenever stock is released or changed. When
//! Redis is unreachable the check is skipped and Postgres decides.

use std::time::Duration;

use fred::{interfaces::KeysInterface, types::Expiration};

use super::Redis;
use crate::{domain::ProductId, store::StoreError};

// One hash tag for all markers: an order's markers are read with one MGET, also on a cluster.
fn key(redis: &Redis, product: ProductId) -> String {
    redis.key(format_args!("product:{{products}}:{product}:sold-out"))
}

/// The first of `products` currently marked sold out.
pub async fn first_marked(
    redis: &Redis,
    products: &[ProductId],
) -> Result<Option<ProductId>, StoreError> {
    let keys: Vec<String> = products.iter().map(|p| key(redis, *p)).collect();
    let marks: Vec<Option<String>> = if keys.len() == 1 {
        vec![redis.client().get(&keys[0]).await?]
    } else {
        redis.client().mget(keys).await?
    };
    Ok(products
        .iter()
        .zip(marks)
        .find_map(|(product, mark)| mark.map(|_| *product)))
}

pub async fn mark(redis: &Redis, product: ProductId, ttl: Duration) -> Result<(), StoreError> {
    let _: () = redis
        .client()
        .set(
            key(redis, product),
            "1",
            Some(Expiration::PX(ttl.as_millis() as i64)),
            None,
            false,
        )
        .await?;
    Ok(())
}

pub async fn clear(redis: &Redis, products: &[ProductId]) -> Result<(), StoreError> {
    if products.is_empty() {
        return Ok(());
    }
    let keys: Vec<String> = products.iter().map(|p| key(redis, *p)).collect();
    let _: i64 = redis.client().del(keys).await?;
    Ok(())
}
