//! The first-come-first-served gate of one coupon, in Redis.
//!
//! Keys (all under the prefix and the hash tag `{<coupon id>}`, so one coupon lives in one
//! cluster slot): `coupon:{id}:state` (total, next fresh seat, issue window, generation),
//! `coupon:{id}:holders` (user -> "seat:won_at_ms"), `coupon:{id}:free` (seats given back),
//! `coupon:{id}:pending` (wins not yet confirmed in Postgres, by win time) and
//! `coupon:{id}:lock` (who is rebuilding).
//!
//! The gate decides fast; Postgres records. A seat granted here becomes a coupon only once its
//! row is inserted, and the schema refuses a second coupon per user or a seat beyond the total,
//! so a gate that forgot or repeated something can slow a caller down but never over-issue.
//!
//! Seat conservation holds inside the gate at every instant: holders + seats left = total.
//! Every holder is either pending (its row may not exist yet) or known to have its row, so the
//! reconciliation job compares the gate with Postgres by counts and by the pending wins only,
//! in bounded steps, never by reading a whole holders hash.

use std::time::Duration;

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
/// Staged chunks between two extensions of the lock (a rebuild of 1,000,000 holders takes
/// longer than one lock TTL).
const CHUNKS_PER_EXTENSION: usize = 10;
/// Staged keys outlive the lock, so an extension always finds them; a rebuild that dies leaves
/// them to expire.
const STAGE_TTL: Duration = Duration::from_secs(60);

/// A seat held at the gate, with what is needed to undo it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub seat: i64,
    /// When the seat was won (ms since the epoch); 0 for a holder loaded from Postgres.
    pub won_at_ms: i64,
    holder: String,
    generation: String,
}

impl Grant {
    fn parse(holder: &str, generation: &str) -> Option<Self> {
        let (seat, won_at) = holder.split_once(':')?;
        Some(Self {
            seat: seat.parse().ok()?,
            won_at_ms: won_at.parse().ok()?,
            holder: holder.to_owned(),
            generation: generation.to_owned(),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Granted(Grant),
    /// The gate holds no state for this coupon: rebuild it from Postgres.
    NotLoaded,
    NoSuchCoupon,
    OutsideWindow,
    /// The user already holds a seat (recorded in Postgres, being recorded, or orphaned).
    AlreadyHolder(Grant),
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

/// The counts of one coupon's gate at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateSummary {
    pub total: i64,
    pub next_seat: i64,
    pub free_seats: i64,
    pub holders: i64,
    pub pending: i64,
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

/// The proof of holding a coupon's rebuild lock.
pub struct LockToken(String);

pub struct CouponGate {
    redis: Redis,
    issue: LuaScript,
    release: LuaScript,
    install: LuaScript,
    unlock: LuaScript,
    summary: LuaScript,
    pending: LuaScript,
    settle: LuaScript,
    extend: LuaScript,
}

/// The keys every gate script takes, in this order.
struct Keys {
    state: String,
    holders: String,
    free: String,
    pending: String,
}

impl Keys {
    fn all(&self) -> [&str; 4] {
        [&self.state, &self.holders, &self.free, &self.pending]
    }
}

impl CouponGate {
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            issue: LuaScript::new(include_str!("lua/issue_coupon.lua")),
            release: LuaScript::new(include_str!("lua/release_seat.lua")),
            install: LuaScript::new(include_str!("lua/load_coupon.lua")),
            unlock: LuaScript::new(include_str!("lua/unlock.lua")),
            summary: LuaScript::new(include_str!("lua/gate_summary.lua")),
            pending: LuaScript::new(include_str!("lua/pending_wins.lua")),
            settle: LuaScript::new(include_str!("lua/settle_wins.lua")),
            extend: LuaScript::new(include_str!("lua/extend_lock.lua")),
        }
    }

    fn keys(&self, coupon: CouponId) -> Keys {
        Keys {
            state: self.redis.key(format_args!("coupon:{{{coupon}}}:state")),
            holders: self.redis.key(format_args!("coupon:{{{coupon}}}:holders")),
            free: self.redis.key(format_args!("coupon:{{{coupon}}}:free")),
            pending: self.redis.key(format_args!("coupon:{{{coupon}}}:pending")),
        }
    }

    fn lock_key(&self, coupon: CouponId) -> String {
        self.redis.key(format_args!("coupon:{{{coupon}}}:lock"))
    }

    /// Decides one request in one atomic script.
    pub async fn decide(
        &self,
        coupon: CouponId,
        user: UserId,
        now: DateTime<Utc>,
    ) -> Result<Decision, StoreError> {
        let k = self.keys(coupon);
        let user = user.get().to_string();
        let now_ms = now.timestamp_millis().to_string();
        let reply: Vec<String> = self
            .issue
            .call(&self.redis, &k.all(), &[&user, &now_ms])
            .await?;
        let unexpected = || StoreError::Inconsistent(format!("issue script replied {reply:?}"));
        Ok(match reply.as_slice() {
            [ok, _, holder, generation] if ok == "OK" => {
                Decision::Granted(Grant::parse(holder, generation).ok_or_else(unexpected)?)
            }
            [already, holder, generation] if already == "ALREADY" => {
                Decision::AlreadyHolder(Grant::parse(holder, generation).ok_or_else(unexpected)?)
            }
            [word] => match word.as_str() {
                "NOT_LOADED" => Decision::NotLoaded,
                "NOT_FOUND" => Decision::NoSuchCoupon,
                "NOT_ISSUABLE" => Decision::OutsideWindow,
                "SOLD_OUT" => Decision::SoldOut,
                _ => return Err(unexpected()),
            },
            _ => return Err(unexpected()),
        })
    }

    /// Undoes a grant that did not become a coupon (or an orphan): removes the holder if it is
    /// still exactly this grant. `give_seat_back` is false when the seat is taken in Postgres
    /// after all. Returns whether anything was undone.
    pub async fn release(
        &self,
        coupon: CouponId,
        user: UserId,
        grant: &Grant,
        give_seat_back: bool,
    ) -> Result<bool, StoreError> {
        self.release_raw(coupon, &user.get().to_string(), grant, give_seat_back)
            .await
    }

    async fn release_raw(
        &self,
        coupon: CouponId,
        user: &str,
        grant: &Grant,
        give_seat_back: bool,
    ) -> Result<bool, StoreError> {
        let k = self.keys(coupon);
        let seat = grant.seat.to_string();
        let give_back = if give_seat_back { "1" } else { "0" };
        let undone: i64 = self
            .release
            .call(
                &self.redis,
                &k.all(),
                &[user, &grant.holder, &grant.generation, give_back, &seat],
            )
            .await?;
        Ok(undone == 1)
    }

    /// Takes the coupon's rebuild lock, if no one else holds it.
    pub async fn try_lock(&self, coupon: CouponId) -> Result<Option<LockToken>, StoreError> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let set: Option<String> = self
            .redis
            .client()
            .set(
                self.lock_key(coupon),
                token.as_str(),
                Some(Expiration::PX(LOCK_TTL.as_millis() as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(set.map(|_| LockToken(token)))
    }

    pub async fn unlock(&self, coupon: CouponId, token: LockToken) -> Result<(), StoreError> {
        let key = self.lock_key(coupon);
        let _: i64 = self.unlock.call(&self.redis, &[&key], &[&token.0]).await?;
        Ok(())
    }

    /// Remembers for a few seconds that the coupon does not exist.
    pub async fn mark_missing(&self, coupon: CouponId) -> Result<(), StoreError> {
        let k = self.keys(coupon);
        let client = self.redis.client();
        let _: i64 = client.hsetnx(&k.state, "missing", 1).await?;
        let _: i64 = client
            .pexpire(&k.state, MISSING_TTL.as_millis() as i64, None)
            .await?;
        Ok(())
    }

    /// Drops whatever the gate knows of a coupon (a new coupon must not meet a stale "missing").
    pub async fn forget(&self, coupon: CouponId) -> Result<(), StoreError> {
        let k = self.keys(coupon);
        let _: i64 = self.redis.client().del(k.state).await?;
        Ok(())
    }

    /// Installs the gate of `coupon` from its Postgres record: `held` are the seats issued in
    /// Postgres. Free seats are the gaps below the highest held seat; fresh seats follow it.
    /// Returns whether the gate was installed (false: the lock was lost, or in
    /// [`InstallMode::IfAbsent`] another caller loaded it first).
    ///
    /// Holders and free seats are staged in chunks first (no single command over a large
    /// coupon), keeping the lock alive as they go, then swapped in by one script.
    pub async fn install(
        &self,
        token: &LockToken,
        coupon: &Coupon,
        held: &[(UserId, i64)],
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
        let plan = SeatPlan::from_held(held.iter().map(|(_, seat)| *seat));
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
        held: &[(UserId, i64)],
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
                    // Seats recorded in Postgres are settled: won "at 0", never pending.
                    .map(|(user, seat)| (user.get().to_string(), format!("{seat}:0")))
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

    /// The gate's counts, read atomically in constant time; `None` when nothing is loaded.
    pub async fn summary(&self, coupon: CouponId) -> Result<Option<GateSummary>, StoreError> {
        let k = self.keys(coupon);
        let reply: Vec<Value> = self.summary.call(&self.redis, &k.all(), &[]).await?;
        let unexpected = || StoreError::Inconsistent(format!("coupon {coupon}: bad gate summary"));
        let int = |v: &Value| v.as_i64().ok_or_else(unexpected);
        let [total, next_seat, free_seats, holders, pending, _gen] = reply.as_slice() else {
            return Ok(None);
        };
        Ok(Some(GateSummary {
            total: int(total)?,
            next_seat: int(next_seat)?,
            free_seats: int(free_seats)?,
            holders: int(holders)?,
            pending: int(pending)?,
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

    /// Clears the pending mark of these wins (Postgres has their rows), where the holder is
    /// still the one the chunk saw. Returns how many were settled.
    pub async fn settle(
        &self,
        coupon: CouponId,
        chunk: &PendingChunk,
        recorded: impl Fn(i64) -> bool,
    ) -> Result<usize, StoreError> {
        let mut args = vec![chunk.generation.clone()];
        for win in chunk.wins.iter().filter(|w| recorded(w.user)) {
            args.push(win.user.to_string());
            args.push(
                win.grant
                    .as_ref()
                    .map_or(String::new(), |g| g.holder.clone()),
            );
        }
        if args.len() == 1 {
            return Ok(0);
        }
        let k = self.keys(coupon);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let settled: i64 = self.settle.call(&self.redis, &k.all(), &args).await?;
        Ok(settled as usize)
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
        let summary = GateSummary {
            total: 10,
            next_seat: 8,
            free_seats: 2,
            holders: 5,
            pending: 0,
        };
        assert_eq!(summary.remaining(), 5);
        let exhausted = GateSummary {
            next_seat: 11,
            free_seats: 0,
            ..summary
        };
        assert_eq!(exhausted.remaining(), 0);
    }

    #[test]
    fn grants_parse_seat_and_win_time() {
        let grant = Grant::parse("7:1700000000123", "g1").unwrap();
        assert_eq!((grant.seat, grant.won_at_ms), (7, 1_700_000_000_123));
        assert_eq!(Grant::parse("7", "g1"), None);
        assert_eq!(Grant::parse("x:1", "g1"), None);
    }
}
