//! What the reconciliation job reads and repairs: the gate's counts in constant time, and the
//! pending wins a chunk at a time.

use chrono::{DateTime, Utc};
use fred::types::Value;

use super::{CouponGate, Grant};
use crate::{
    domain::{CouponId, UserCouponId, UserId},
    store::StoreError,
};

/// The counts of one coupon's gate at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateSummary {
    pub total: i64,
    pub next_seat: i64,
    pub free_seats: i64,
    pub holders: i64,
    pub pending: i64,
    /// The end of the issue window the gate decides by (ms since the epoch).
    pub ends_ms: i64,
}

impl GateSummary {
    /// Seats the gate would still grant.
    pub fn remaining(&self) -> i64 {
        (self.total - self.next_seat + 1).max(0) + self.free_seats
    }
}

/// A win pending longer than the grace, as the job found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingWin {
    pub user: i64,
    /// `None` when the holder is gone (released meanwhile).
    pub grant: Option<Grant>,
}

/// One chunk of pending wins, read in one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingChunk {
    generation: String,
    pub wins: Vec<PendingWin>,
}

impl CouponGate {
    /// The gate's counts, read atomically in constant time; `None` when nothing is loaded.
    pub async fn summary(&self, coupon: CouponId) -> Result<Option<GateSummary>, StoreError> {
        let k = self.keys(coupon);
        let reply: Vec<Value> = self.summary.call(&self.redis, &k.all(), &[]).await?;
        let unexpected = || StoreError::Inconsistent(format!("coupon {coupon}: bad gate summary"));
        let int = |v: &Value| v.as_i64().ok_or_else(unexpected);
        let [total, next_seat, free_seats, holders, pending, _gen, ends] = reply.as_slice() else {
            return Ok(None);
        };
        Ok(Some(GateSummary {
            total: int(total)?,
            next_seat: int(next_seat)?,
            free_seats: int(free_seats)?,
            holders: int(holders)?,
            pending: int(pending)?,
            ends_ms: int(ends)?,
        }))
    }

    /// Up to `limit` wins pending since `won_by` or earlier, oldest first; `None` when nothing
    /// is loaded.
    pub async fn pending_since(
        &self,
        coupon: CouponId,
        won_by: DateTime<Utc>,
        limit: usize,
    ) -> Result<Option<PendingChunk>, StoreError> {
        let k = self.keys(coupon);
        let reply: Vec<String> = self
            .pending
            .call(
                &self.redis,
                &k.all(),
                &[&won_by.timestamp_millis().to_string(), &limit.to_string()],
            )
            .await?;
        let unexpected = || StoreError::Inconsistent(format!("coupon {coupon}: bad pending wins"));
        let Some((generation, rest)) = reply.split_first() else {
            return Ok(None);
        };
        let mut wins = Vec::with_capacity(rest.len() / 2);
        for pair in rest.chunks(2) {
            let [user, holder] = pair else {
                return Err(unexpected());
            };
            wins.push(PendingWin {
                user: user.parse().map_err(|_| unexpected())?,
                grant: if holder.is_empty() {
                    None
                } else {
                    Some(Grant::parse(holder, generation).ok_or_else(unexpected)?)
                },
            });
        }
        Ok(Some(PendingChunk {
            generation: generation.clone(),
            wins,
        }))
    }

    /// Settles these wins, where the holder is still the one the chunk saw: `recorded` gives
    /// the id of a win's coupon row when Postgres has it; those wins lose their pending mark
    /// and carry the id from now on. Returns how many were settled.
    pub async fn settle(
        &self,
        coupon: CouponId,
        chunk: &PendingChunk,
        recorded: impl Fn(i64) -> Option<UserCouponId>,
    ) -> Result<usize, StoreError> {
        let mut args = vec![chunk.generation.clone()];
        for win in &chunk.wins {
            let Some(user_coupon_id) = recorded(win.user) else {
                continue;
            };
            args.push(win.user.to_string());
            match &win.grant {
                Some(grant) => {
                    args.push(grant.holder.clone());
                    args.push(grant.recorded_as(user_coupon_id));
                }
                None => args.extend([String::new(), String::new()]),
            }
        }
        if args.len() == 1 {
            return Ok(0);
        }
        // The settle script reads the generation, then (user, holder seen, holder to write)
        // triples.
        let k = self.keys(coupon);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let settled: i64 = self.settle.call(&self.redis, &k.all(), &args).await?;
        Ok(settled as usize)
    }

    /// Records at the gate that `grant`'s row `user_coupon_id` is committed (the caller knows:
    /// its insert returned, or Postgres was read), so the user's next call is answered without
    /// Postgres. The win stays pending until the reconciliation job settles it. Does nothing if
    /// the holder changed or the gate was rebuilt since. Returns whether the gate took it.
    pub async fn record(
        &self,
        coupon: CouponId,
        user: UserId,
        grant: &Grant,
        user_coupon_id: UserCouponId,
    ) -> Result<bool, StoreError> {
        let k = self.keys(coupon);
        let user = user.get().to_string();
        let value = grant.recorded_as(user_coupon_id);
        let written: i64 = self
            .record
            .call(
                &self.redis,
                &k.all(),
                &[&grant.generation, &user, &grant.holder, &value],
            )
            .await?;
        Ok(written == 1)
    }

    /// Releases an orphaned win the job found (no row in Postgres long after the win) and gives
    /// its seat back. Returns whether it was released.
    pub async fn release_orphan(
        &self,
        coupon: CouponId,
        win: &PendingWin,
    ) -> Result<bool, StoreError> {
        match &win.grant {
            Some(grant) => {
                self.release_raw(coupon, &win.user.to_string(), grant, true)
                    .await
            }
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_counts_fresh_and_returned_seats() {
        let summary = GateSummary {
            total: 10,
            next_seat: 8,
            free_seats: 2,
            holders: 5,
            pending: 0,
            ends_ms: 0,
        };
        assert_eq!(summary.remaining(), 5);
        let exhausted = GateSummary {
            next_seat: 11,
            free_seats: 0,
            ..summary
        };
        assert_eq!(exhausted.remaining(), 0);
    }
}
