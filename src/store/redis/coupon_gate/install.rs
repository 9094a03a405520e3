//! Installing a gate rebuilt from Postgres: staged in chunks (no single command over a large
//! coupon), the lock kept alive meanwhile, then swapped in by one script.

use std::time::Duration;

use chrono::{DateTime, Utc};
use fred::{
    interfaces::{HashesInterface, KeysInterface, ListInterface},
    types::Value,
};

use super::{CouponGate, InstallMode, LOCK_TTL, LockToken};
use crate::{
    domain::{Coupon, CouponId},
    store::{StoreError, postgres::coupons::HeldSeat},
};

/// Holders and free seats are staged in chunks of this many entries.
const STAGE_CHUNK: usize = 1000;
/// Staged chunks between two extensions of the lock (a rebuild of 1,000,000 holders takes
/// longer than one lock TTL).
const CHUNKS_PER_EXTENSION: usize = 10;
/// Staged keys outlive the lock, so an extension always finds them; a rebuild that dies leaves
/// them to expire.
const STAGE_TTL: Duration = Duration::from_secs(60);

impl CouponGate {
    /// Installs the gate of `coupon` from its Postgres record: `held` are the seats issued in
    /// Postgres (holder, seat, coupon row id; every holder carries its row's id). Free seats are the gaps below the highest held seat; fresh seats follow it.
    /// Returns whether the gate was installed (false: the lock was lost, or in
    /// [`InstallMode::IfAbsent`] another caller loaded it first).
    ///
    /// Holders and free seats are staged in chunks first (no single command over a large
    /// coupon), keeping the lock alive as they go, then swapped in by one script.
    pub async fn install(
        &self,
        token: &LockToken,
        coupon: &Coupon,
        held: &[HeldSeat],
        mode: InstallMode,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let id = coupon.id;
        let staged = [
            self.redis
                .key(format_args!("coupon:{{{id}}}:staged-holders:{}", token.0)),
            self.redis
                .key(format_args!("coupon:{{{id}}}:staged-free:{}", token.0)),
        ];
        let plan = SeatPlan::from_held(held.iter().map(|h| h.seat));
        let installed = match self.stage(token, id, held, &plan.free, &staged).await {
            Ok(true) => {
                self.swap_in(token, coupon, plan.next, &staged, mode, now)
                    .await
            }
            other => other,
        };
        if !matches!(installed, Ok(true)) {
            // Freed in the background: a large staged hash must not block Redis.
            let _: Result<i64, _> = self.redis.client().unlink(staged.to_vec()).await;
        }
        installed
    }

    /// Writes the holders and the free seats to the staged keys; false when the lock was lost
    /// on the way.
    async fn stage(
        &self,
        token: &LockToken,
        id: CouponId,
        held: &[HeldSeat],
        free: &[i64],
        [staged_holders, staged_free]: &[String; 2],
    ) -> Result<bool, StoreError> {
        let client = self.redis.client();
        let lock = self.lock_key(id);
        let ttls = [
            LOCK_TTL.as_millis().to_string(),
            STAGE_TTL.as_millis().to_string(),
        ];
        let extend = || async {
            let extended: i64 = self
                .extend
                .call(
                    &self.redis,
                    &[&lock, staged_holders, staged_free],
                    &[&token.0, &ttls[0], &ttls[1]],
                )
                .await?;
            Ok::<_, StoreError>(extended == 1)
        };
        let holder_chunks = held.chunks(STAGE_CHUNK).len();
        let chunks = holder_chunks + free.chunks(STAGE_CHUNK).len();
        let mut holders = held.chunks(STAGE_CHUNK);
        let mut free = free.chunks(STAGE_CHUNK);
        for i in 0..chunks {
            if let Some(chunk) = holders.next() {
                let fields: Vec<(String, String)> = chunk
                    .iter()
                    // Seats recorded in Postgres are settled: won "at 0", never pending, and
                    // their row's id answers a repeat call from the gate.
                    .map(|h| {
                        (
                            h.user_id.get().to_string(),
                            format!("{}:0:{}", h.seat, h.user_coupon_id),
                        )
                    })
                    .collect();
                let _: i64 = client.hset(staged_holders, fields).await?;
            } else if let Some(chunk) = free.next() {
                let seats: Vec<Value> = chunk.iter().map(|s| Value::from(*s)).collect();
                let _: i64 = client.rpush(staged_free, seats).await?;
            }
            // Also right after the first free seats, so the staged list gets its TTL at once.
            let due = i % CHUNKS_PER_EXTENSION == 0 || i == holder_chunks;
            if due && !extend().await? {
                return Ok(false);
            }
        }
        extend().await
    }

    /// Swaps the staged state in, atomically.
    async fn swap_in(
        &self,
        token: &LockToken,
        coupon: &Coupon,
        next_seat: i64,
        [staged_holders, staged_free]: &[String; 2],
        mode: InstallMode,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let k = self.keys(coupon.id);
        let lock = self.lock_key(coupon.id);
        let mode = match mode {
            InstallMode::IfAbsent => "absent",
            InstallMode::Replace => "replace",
        };
        let expire_at = super::expire_at(coupon, now).to_string();
        let args = [
            token.0.clone(),
            mode.to_owned(),
            coupon.total_quantity.to_string(),
            next_seat.to_string(),
            coupon.window.starts_at().timestamp_millis().to_string(),
            coupon.window.ends_at().timestamp_millis().to_string(),
            uuid::Uuid::new_v4().simple().to_string(),
            expire_at,
        ];
        let installed: i64 = self
            .install
            .call(
                &self.redis,
                &[
                    &k.state,
                    &k.holders,
                    &k.free,
                    &lock,
                    staged_holders,
                    staged_free,
                    &k.pending,
                ],
                &args.each_ref().map(String::as_str),
            )
            .await?;
        Ok(installed == 1)
    }
}

/// How seats are laid out after a rebuild: every seat below the highest held one that nobody
/// holds is free; the fresh seats start right after it.
#[derive(Debug, PartialEq, Eq)]
struct SeatPlan {
    free: Vec<i64>,
    next: i64,
}

impl SeatPlan {
    fn from_held(held: impl Iterator<Item = i64>) -> Self {
        let mut seats: Vec<i64> = held.collect();
        seats.sort_unstable();
        seats.dedup();
        let highest = seats.last().copied().unwrap_or(0);
        let mut free = Vec::new();
        let mut held = seats.iter().peekable();
        for seat in 1..=highest {
            if held.peek() == Some(&&seat) {
                held.next();
            } else {
                free.push(seat);
            }
        }
        Self {
            free,
            next: highest + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seat_plan_frees_the_gaps_and_continues_after_the_highest() {
        assert_eq!(
            SeatPlan::from_held([].into_iter()),
            SeatPlan {
                free: vec![],
                next: 1
            }
        );
        assert_eq!(
            SeatPlan::from_held([1, 2, 3].into_iter()),
            SeatPlan {
                free: vec![],
                next: 4
            }
        );
        assert_eq!(
            SeatPlan::from_held([5, 2].into_iter()),
            SeatPlan {
                free: vec![1, 3, 4],
                next: 6
            }
        );
    }
}
