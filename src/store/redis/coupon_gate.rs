//! The first-come-first-served gate of one coupon, in Redis.
//!
//! Keys (all under the prefix and the hash tag `{<coupon id>}`, so one coupon lives in one
//! cluster slot): `coupon:{id}:state` (total, next fresh seat, issue window, generation),
//! `coupon:{id}:holders` (user -> "seat:won_at_ms"), `coupon:{id}:free` (seats given back) and
//! `coupon:{id}:lock` (who is rebuilding).
//!
//! The gate decides fast; Postgres records. A seat granted here becomes a coupon only once its
//! row is inserted, and the schema refuses a second coupon per user or a seat beyond the total,
//! so a gate that forgot or repeated something can slow a caller down but never over-issue.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use fred::{
    interfaces::{HashesInterface, KeysInterface, ListInterface},
    types::{Expiration, SetOptions, Value},
};

use super::{LuaScript, Redis};
use crate::{
    domain::{Coupon, CouponId, UserId},
    store::StoreError,
};

/// How long one rebuild may hold the coupon's lock.
const LOCK_TTL: Duration = Duration::from_secs(10);
/// How long "no such coupon" is remembered, so unknown ids do not reach Postgres every time.
const MISSING_TTL: Duration = Duration::from_secs(5);
/// Holders and free seats are staged in chunks of this many entries.
const STAGE_CHUNK: usize = 1000;

/// A granted seat, with what is needed to undo it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub seat: i64,
    holder: String,
    generation: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Granted(Grant),
    /// The gate holds no state for this coupon: rebuild it from Postgres.
    NotLoaded,
    NoSuchCoupon,
    OutsideWindow,
    AlreadyHolder,
    SoldOut,
}

/// Whether a rebuild may overwrite a loaded gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallMode {
    /// Only if nothing is loaded (first use, or after Redis lost it).
    IfAbsent,
    /// Replace whatever is there (repair).
    Replace,
}

/// A holder as the gate records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateHolder {
    pub seat: i64,
    pub won_at_ms: i64,
}

/// The whole gate of one coupon at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateView {
    pub total: i64,
    pub next_seat: i64,
    pub free_seats: i64,
    pub holders: HashMap<i64, GateHolder>,
}

impl GateView {
    /// Seats the gate would still grant.
    pub fn remaining(&self) -> i64 {
        (self.total - self.next_seat + 1).max(0) + self.free_seats
    }
}

/// The proof of holding a coupon's rebuild lock.
pub struct LockToken(String);

pub struct CouponGate {
    issue: LuaScript,
    release: LuaScript,
    install: LuaScript,
    unlock: LuaScript,
    view: LuaScript,
}

impl Default for CouponGate {
    fn default() -> Self {
        Self {
            issue: LuaScript::new(include_str!("lua/issue_coupon.lua")),
            release: LuaScript::new(include_str!("lua/release_seat.lua")),
            install: LuaScript::new(include_str!("lua/load_coupon.lua")),
            unlock: LuaScript::new(include_str!("lua/unlock.lua")),
            view: LuaScript::new(include_str!("lua/view_coupon.lua")),
        }
    }
}

struct Keys {
    state: String,
    holders: String,
    free: String,
}

fn keys(redis: &Redis, coupon: CouponId) -> Keys {
    Keys {
        state: redis.key(format_args!("coupon:{{{coupon}}}:state")),
        holders: redis.key(format_args!("coupon:{{{coupon}}}:holders")),
        free: redis.key(format_args!("coupon:{{{coupon}}}:free")),
    }
}

fn lock_key(redis: &Redis, coupon: CouponId) -> String {
    redis.key(format_args!("coupon:{{{coupon}}}:lock"))
}

impl CouponGate {
    /// Decides one request in one atomic script.
    pub async fn decide(
        &self,
        redis: &Redis,
        coupon: CouponId,
        user: UserId,
        now: DateTime<Utc>,
    ) -> Result<Decision, StoreError> {
        let k = keys(redis, coupon);
        let user = user.get().to_string();
        let now_ms = now.timestamp_millis().to_string();
        let reply: Vec<String> = self
            .issue
            .call(redis, &[&k.state, &k.holders, &k.free], &[&user, &now_ms])
            .await?;
        let unexpected = || StoreError::Inconsistent(format!("issue script replied {reply:?}"));
        Ok(match reply.first().map(String::as_str) {
            Some("OK") => match reply.as_slice() {
                [_, seat, holder, generation] => Decision::Granted(Grant {
                    seat: seat.parse().map_err(|_| unexpected())?,
                    holder: holder.clone(),
                    generation: generation.clone(),
                }),
                _ => return Err(unexpected()),
            },
            Some("NOT_LOADED") => Decision::NotLoaded,
            Some("NOT_FOUND") => Decision::NoSuchCoupon,
            Some("NOT_ISSUABLE") => Decision::OutsideWindow,
            Some("ALREADY") => Decision::AlreadyHolder,
            Some("SOLD_OUT") => Decision::SoldOut,
            _ => return Err(unexpected()),
        })
    }

    /// Undoes a grant whose coupon could not be recorded. `give_seat_back` is false when the
    /// seat is taken in Postgres after all. Returns whether anything was undone.
    pub async fn release(
        &self,
        redis: &Redis,
        coupon: CouponId,
        user: UserId,
        grant: &Grant,
        give_seat_back: bool,
    ) -> Result<bool, StoreError> {
        let k = keys(redis, coupon);
        let user = user.get().to_string();
        let seat = grant.seat.to_string();
        let give_back = if give_seat_back { "1" } else { "0" };
        let undone: i64 = self
            .release
            .call(
                redis,
                &[&k.state, &k.holders, &k.free],
                &[&user, &grant.holder, &grant.generation, give_back, &seat],
            )
            .await?;
        Ok(undone == 1)
    }

    /// Takes the coupon's rebuild lock, if no one else holds it.
    pub async fn try_lock(
        &self,
        redis: &Redis,
        coupon: CouponId,
    ) -> Result<Option<LockToken>, StoreError> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let set: Option<String> = redis
            .client()
            .set(
                lock_key(redis, coupon),
                token.as_str(),
                Some(Expiration::PX(LOCK_TTL.as_millis() as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(set.map(|_| LockToken(token)))
    }

    pub async fn unlock(
        &self,
        redis: &Redis,
        coupon: CouponId,
        token: LockToken,
    ) -> Result<(), StoreError> {
        let key = lock_key(redis, coupon);
        let _: i64 = self.unlock.call(redis, &[&key], &[&token.0]).await?;
        Ok(())
    }

    /// Remembers for a few seconds that the coupon does not exist.
    pub async fn mark_missing(&self, redis: &Redis, coupon: CouponId) -> Result<(), StoreError> {
        let k = keys(redis, coupon);
        let client = redis.client();
        let _: i64 = client.hsetnx(&k.state, "missing", 1).await?;
        let _: i64 = client
            .pexpire(&k.state, MISSING_TTL.as_millis() as i64, None)
            .await?;
        Ok(())
    }

    /// Drops whatever the gate knows of a coupon (a new coupon must not meet a stale "missing").
    pub async fn forget(&self, redis: &Redis, coupon: CouponId) -> Result<(), StoreError> {
        let k = keys(redis, coupon);
        let _: i64 = redis.client().del(k.state).await?;
        Ok(())
    }

    /// Installs the gate of `coupon` from its Postgres record: `held` are the seats issued in
    /// Postgres. Free seats are the gaps below the highest held seat; fresh seats follow it.
    /// Returns whether the gate was installed.
    pub async fn install(
        &self,
        redis: &Redis,
        token: &LockToken,
        coupon: &Coupon,
        held: &[(UserId, i64)],
        mode: InstallMode,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let id = coupon.id;
        let k = keys(redis, id);
        let staged_holders = redis.key(format_args!("coupon:{{{id}}}:staged-holders:{}", token.0));
        let staged_free = redis.key(format_args!("coupon:{{{id}}}:staged-free:{}", token.0));
        let plan = SeatPlan::from_held(held.iter().map(|(_, seat)| *seat));
        let client = redis.client();
        let stage_ttl = LOCK_TTL.as_millis() as i64 * 2;
        for chunk in held.chunks(STAGE_CHUNK) {
            let fields: Vec<(String, String)> = chunk
                .iter()
                // Seats recorded in Postgres are settled: won "at 0", never orphans.
                .map(|(user, seat)| (user.get().to_string(), format!("{seat}:0")))
                .collect();
            let _: i64 = client.hset(&staged_holders, fields).await?;
            let _: i64 = client.pexpire(&staged_holders, stage_ttl, None).await?;
        }
        for chunk in plan.free.chunks(STAGE_CHUNK) {
            let seats: Vec<Value> = chunk.iter().map(|s| Value::from(*s)).collect();
            let _: i64 = client.rpush(&staged_free, seats).await?;
            let _: i64 = client.pexpire(&staged_free, stage_ttl, None).await?;
        }

        let lock = lock_key(redis, id);
        let mode = match mode {
            InstallMode::IfAbsent => "absent",
            InstallMode::Replace => "replace",
        };
        // Keep the gate a day past the window (late requests answer NOT_ISSUABLE from Redis),
        // and at least an hour from now.
        let expire_at = (coupon.window.ends_at() + chrono::Duration::days(1))
            .max(now + chrono::Duration::hours(1))
            .timestamp_millis()
            .to_string();
        let args = [
            token.0.clone(),
            mode.to_owned(),
            coupon.total_quantity.to_string(),
            plan.next.to_string(),
            coupon.window.starts_at().timestamp_millis().to_string(),
            coupon.window.ends_at().timestamp_millis().to_string(),
            uuid::Uuid::new_v4().simple().to_string(),
            expire_at,
        ];
        let installed: i64 = self
            .install
            .call(
                redis,
                &[
                    &k.state,
                    &k.holders,
                    &k.free,
                    &lock,
                    &staged_holders,
                    &staged_free,
                ],
                &args.each_ref().map(String::as_str),
            )
            .await?;
        Ok(installed == 1)
    }

    /// The gate's state, read atomically; `None` when nothing is loaded.
    pub async fn view(
        &self,
        redis: &Redis,
        coupon: CouponId,
    ) -> Result<Option<GateView>, StoreError> {
        let k = keys(redis, coupon);
        let reply: Vec<Value> = self
            .view
            .call(redis, &[&k.state, &k.holders, &k.free], &[])
            .await?;
        let unexpected = || StoreError::Inconsistent(format!("coupon {coupon}: bad gate view"));
        let int = |v: &Value| v.as_i64().ok_or_else(unexpected);
        let [total, next_seat, free_seats, holders] = reply.as_slice() else {
            return Ok(None);
        };
        let mut map = HashMap::new();
        let pairs = holders.clone().into_array();
        for pair in pairs.chunks(2) {
            let [user, value] = pair else {
                return Err(unexpected());
            };
            let user = user.as_string().ok_or_else(unexpected)?;
            if user == "_" {
                continue;
            }
            let value = value.as_string().ok_or_else(unexpected)?;
            let (seat, won_at) = value.split_once(':').ok_or_else(unexpected)?;
            map.insert(
                user.parse().map_err(|_| unexpected())?,
                GateHolder {
                    seat: seat.parse().map_err(|_| unexpected())?,
                    won_at_ms: won_at.parse().map_err(|_| unexpected())?,
                },
            );
        }
        Ok(Some(GateView {
            total: int(total)?,
            next_seat: int(next_seat)?,
            free_seats: int(free_seats)?,
            holders: map,
        }))
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

    #[test]
    fn remaining_counts_fresh_and_returned_seats() {
        let view = GateView {
            total: 10,
            next_seat: 8,
            free_seats: 2,
            holders: HashMap::new(),
        };
        assert_eq!(view.remaining(), 5);
        let exhausted = GateView {
            next_seat: 11,
            free_seats: 0,
            ..view
        };
        assert_eq!(exhausted.remaining(), 0);
    }
}
