//! Best sellers: one sorted set per day (`rank:{products}:YYYYMMDD`, member = product id,
//! score = paid quantity). All keys share one hash tag, so a union of days and every script
//! runs on one cluster node. Keys expire after the retention period.
//!
//! Invariant: a day's bucket counts every committed payment of the day exactly once, and takes
//! away every committed refund of those payments' units exactly once, whenever the rebuild runs,
//! except a bump that never reached Redis (the next rebuild puts it in). A refund is a bump
//! too, of negative quantities, in the bucket of the day its order was paid, and follows the
//! same rules as a payment's (read "payment or refund" for "payment" below; a refund is named
//! `r<refund id>` in `counted`). Beside each bucket live the Postgres snapshot it was last
//! rebuilt from (`...:snapshot`) and the payments counted by bumps since (`...:counted`,
//! payment id -> transaction id and items).
//! - A bump (rank_bump.lua) is refused if the snapshot saw its transaction (the rebuild counted
//!   it) or its payment is already in `counted` (a repeated call); otherwise it adds the items
//!   and records the payment, in one step.
//! - A rebuild reads the counts and the snapshot in one Postgres transaction, writes the counts
//!   under a staging key, then (rank_rebuild.lua, one step) adds the payments of `counted` the
//!   snapshot did not see (they committed after it, so only their bump has them), forgets those
//!   it saw, renames the staging key over the bucket and stores the snapshot. A bump racing the
//!   rebuild lands either before that step (carried over or already in the counts) or after it
//!   (judged against the new snapshot): never lost, never doubled. A rebuild from a snapshot
//!   older than the stored one (two replicas at once) changes nothing.
//!
//! `counted` holds the payments bumped since the last rebuild that it had not seen: about one
//! job interval of payments, and each rebuild's step walks it once.

use std::time::Duration;

use chrono::NaiveDate;
use fred::{
    interfaces::{KeysInterface, SortedSetsInterface},
    types::Value,
};

use super::{LuaScript, Redis};
use crate::{
    domain::{PaymentId, ProductId, RefundId, Snapshot, TxId},
    store::StoreError,
};

/// What a bump counts: a payment's units, or a refund taking some of them away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    Payment(PaymentId),
    Refund(RefundId),
}

impl std::fmt::Display for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Counted::Payment(id) => write!(f, "{id}"),
            Counted::Refund(id) => write!(f, "r{id}"),
        }
    }
}

pub struct Ranking {
    redis: Redis,
    bump: LuaScript,
    rebuild: LuaScript,
}

/// A day's keys: the bucket, the snapshot it was rebuilt from, the payments counted since.
struct DayKeys {
    bucket: String,
    snapshot: String,
    counted: String,
}

impl DayKeys {
    fn new(redis: &Redis, day: NaiveDate) -> Self {
        let bucket = bucket(redis, day);
        Self {
            snapshot: format!("{bucket}:snapshot"),
            counted: format!("{bucket}:counted"),
            bucket,
        }
    }
}

fn bucket(redis: &Redis, day: NaiveDate) -> String {
    redis.key(format_args!("rank:{{products}}:{}", day.format("%Y%m%d")))
}

/// Items as the scripts read them: `product qty product qty ...`.
fn items_arg(sold: &[(ProductId, i64)]) -> String {
    let pairs: Vec<String> = sold
        .iter()
        .map(|(product, quantity)| format!("{product} {quantity}"))
        .collect();
    pairs.join(" ")
}

/// A ranking script with the visibility functions it uses in front.
macro_rules! with_snapshot {
    ($name:literal, $script:literal) => {
        LuaScript::new(
            $name,
            concat!(
                include_str!("lua/snapshot.lua"),
                "\n",
                include_str!($script)
            ),
        )
    };
}

impl Ranking {
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            bump: with_snapshot!("ranking.bump", "lua/rank_bump.lua"),
            rebuild: with_snapshot!("ranking.rebuild", "lua/rank_rebuild.lua"),
        }
    }

    /// Counts committed payment or refund `counted` (transaction `tx`; a refund's quantities
    /// are negative) in `day`'s bucket, unless the bucket already holds it. Returns whether it
    /// was counted now.
    pub async fn count(
        &self,
        day: NaiveDate,
        counted: Counted,
        tx: TxId,
        sold: &[(ProductId, i64)],
        retention: Duration,
    ) -> Result<bool, StoreError> {
        let keys = DayKeys::new(&self.redis, day);
        let (ttl, counted, tx) = (
            retention.as_secs().to_string(),
            counted.to_string(),
            tx.to_string(),
        );
        let items = items_arg(sold);
        let counted: i64 = self
            .bump
            .call(
                &self.redis,
                &[&keys.bucket, &keys.snapshot, &keys.counted],
                &[&ttl, &counted, &tx, &items],
            )
            .await?;
        Ok(counted == 1)
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

    /// Replaces `day`'s bucket with `sold`, read from Postgres in `snapshot`, keeping the
    /// payments counted since that the snapshot did not see. Readers see the old bucket or the
    /// new one. `None` when the bucket was already rebuilt from a later snapshot.
    pub async fn rebuild(
        &self,
        day: NaiveDate,
        snapshot: &Snapshot,
        sold: &[(ProductId, i64)],
        retention: Duration,
    ) -> Result<Option<usize>, StoreError> {
        let keys = DayKeys::new(&self.redis, day);
        let client = self.redis.client();
        let staging = format!("{}:rebuild:{}", keys.bucket, uuid::Uuid::new_v4().simple());
        for chunk in sold.chunks(1000) {
            let members: Vec<(f64, Value)> = chunk
                .iter()
                .map(|(product, quantity)| (*quantity as f64, Value::from(product.get())))
                .collect();
            let _: i64 = client
                .zadd(&staging, None, None, false, false, members)
                .await?;
        }
        if !sold.is_empty() {
            // A job that dies before the swap leaves nothing behind for long.
            let _: i64 = client.expire(&staging, 3600, None).await?;
        }
        let (ttl, snapshot) = (retention.as_secs().to_string(), snapshot.to_string());
        let carried: i64 = self
            .rebuild
            .call(
                &self.redis,
                &[&keys.bucket, &keys.snapshot, &keys.counted, &staging],
                &[&ttl, &snapshot],
            )
            .await?;
        Ok(usize::try_from(carried).ok())
    }
}
