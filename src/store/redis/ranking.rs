//! Best sellers: one sorted set per day (`rank:{products}:YYYYMMDD`, member = product id,
//! score = paid quantity). All buckets share one hash tag, so a union of days runs on one
//! cluster node. Buckets expire after the retention period.
//!
//! The buckets are a cache of Postgres: the ranking job recomputes them from paid orders and
//! swaps each one in with RENAME, so lost, missed or doubled bumps are corrected.

use std::time::Duration;

use chrono::NaiveDate;
use fred::{
    interfaces::{KeysInterface, SortedSetsInterface},
    types::Value,
};

use super::{LuaScript, Redis};
use crate::{domain::ProductId, store::StoreError};

pub struct Ranking {
    redis: Redis,
    bump: LuaScript,
}

fn bucket(redis: &Redis, day: NaiveDate) -> String {
    redis.key(format_args!("rank:{{products}}:{}", day.format("%Y%m%d")))
}

impl Ranking {
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            bump: LuaScript::new("ranking.bump", include_str!("lua/rank_bump.lua")),
        }
    }

    /// Adds `sold` (product, quantity) to `day`'s bucket.
    pub async fn add(
        &self,
        day: NaiveDate,
        sold: &[(ProductId, i64)],
        retention: Duration,
    ) -> Result<(), StoreError> {
        let key = bucket(&self.redis, day);
        let mut args = Vec::with_capacity(1 + sold.len() * 2);
        args.push(retention.as_secs().to_string());
        for (product, quantity) in sold {
            args.push(product.get().to_string());
            args.push(quantity.to_string());
        }
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let _: i64 = self.bump.call(&self.redis, &[&key], &arg_refs).await?;
        Ok(())
    }

    /// Paid quantity per product summed over `days`, unsorted.
    pub async fn totals(&self, days: &[NaiveDate]) -> Result<Vec<(i64, i64)>, StoreError> {
        let keys: Vec<String> = days.iter().map(|d| bucket(&self.redis, *d)).collect();
        let reply: Value = self.redis.client().zunion(keys, None, None, true).await?;
        let flat = reply.into_array();
        let mut totals = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks(2) {
            let [member, score] = pair else {
                return Err(StoreError::Inconsistent("odd ZUNION reply".into()));
            };
            let product = member.as_i64();
            let score = score.as_f64();
            match (product, score) {
                (Some(product), Some(score)) => totals.push((product, score.round() as i64)),
                _ => {
                    return Err(StoreError::Inconsistent(format!(
                        "bad ranking entry {pair:?}"
                    )));
                }
            }
        }
        Ok(totals)
    }

    /// Replaces `day`'s bucket with `sold`, atomically: readers see the old bucket or the new one.
    pub async fn replace(
        &self,
        day: NaiveDate,
        sold: &[(ProductId, i64)],
        retention: Duration,
    ) -> Result<(), StoreError> {
        let key = bucket(&self.redis, day);
        let client = self.redis.client();
        if sold.is_empty() {
            let _: i64 = client.del(&key).await?;
            return Ok(());
        }
        let staging = format!("{key}:rebuild:{}", uuid::Uuid::new_v4().simple());
        for chunk in sold.chunks(1000) {
            let members: Vec<(f64, Value)> = chunk
                .iter()
                .map(|(product, quantity)| (*quantity as f64, Value::from(product.get())))
                .collect();
            let _: i64 = client
                .zadd(&staging, None, None, false, false, members)
                .await?;
        }
        let _: i64 = client
            .expire(&staging, retention.as_secs() as i64, None)
            .await?;
        let _: () = client.rename(&staging, &key).await?;
        Ok(())
    }
}
