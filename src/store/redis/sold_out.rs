//! Sold-out markers: once a product is found out of stock, orders for it are refused from
//! Redis for a few seconds instead of queueing on its Postgres row lock.
//!
//! A marker is only a shortcut. It expires by itself (bounding how long a stale one can refuse
//! orders after stock comes back) and is deleted whenever stock is released or changed. Each
//! marker carries the product's stock generation as the refused order read it, and a release
//! records its own (newer) generation, so a marker set late by an order that looked before the
//! release is refused. When Redis is unreachable the check is skipped and Postgres decides.

use std::time::Duration;

use fred::interfaces::KeysInterface;

use super::{LuaScript, Redis};
use crate::{
    domain::{ProductId, Restock},
    store::StoreError,
};

/// How long a release's generation is remembered: far longer than any order can take between
/// reading the stock and marking the product.
const RESTOCK_MEMORY: Duration = Duration::from_secs(600);

pub struct SoldOutMarkers {
    redis: Redis,
    mark: LuaScript,
    clear: LuaScript,
}

impl SoldOutMarkers {
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            mark: LuaScript::new("sold_out.mark", include_str!("lua/mark_sold_out.lua")),
            clear: LuaScript::new("sold_out.clear", include_str!("lua/clear_sold_out.lua")),
        }
    }

    // One hash tag for all markers: an order's markers are read with one MGET, also on a
    // cluster, and a release clears several products in one script.
    fn marker(&self, product: ProductId) -> String {
        self.redis
            .key(format_args!("product:{{products}}:{product}:sold-out"))
    }

    fn restocked(&self, product: ProductId) -> String {
        self.redis
            .key(format_args!("product:{{products}}:{product}:restocked"))
    }

    /// The first of `products` currently marked sold out.
    pub async fn first_marked(
        &self,
        products: &[ProductId],
    ) -> Result<Option<ProductId>, StoreError> {
        let client = self.redis.client();
        let marks: Vec<Option<String>> = if let [product] = products {
            vec![client.get(self.marker(*product)).await?]
        } else {
            let keys: Vec<String> = products.iter().map(|p| self.marker(*p)).collect();
            client.mget(keys).await?
        };
        Ok(products
            .iter()
            .zip(marks)
            .find_map(|(product, mark)| mark.map(|_| *product)))
    }

    /// Marks `product` sold out as of `stock_gen`, unless its stock came back since.
    pub async fn mark(
        &self,
        product: ProductId,
        stock_gen: i64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let keys = [self.marker(product), self.restocked(product)];
        let marked: i64 = self
            .mark
            .call(
                &self.redis,
                &keys.each_ref().map(String::as_str),
                &[&stock_gen.to_string(), &ttl.as_millis().to_string()],
            )
            .await?;
        Ok(marked == 1)
    }

    pub async fn clear(&self, restocks: &[Restock]) -> Result<(), StoreError> {
        if restocks.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = restocks
            .iter()
            .flat_map(|r| [self.marker(r.product), self.restocked(r.product)])
            .collect();
        let mut args: Vec<String> = restocks.iter().map(|r| r.stock_gen.to_string()).collect();
        args.push(RESTOCK_MEMORY.as_millis().to_string());
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _: i64 = self.clear.call(&self.redis, &keys, &args).await?;
        Ok(())
    }
}
