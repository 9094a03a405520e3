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
//! The total and the window live in the state hash and the issue script reads them on every
//! call, so an operator's change (`terms.rs`: one script, under the rebuild lock) holds on every
//! replica from the next request.
//!
//! A holder value carries the id of the holder's coupon row only once that row is known to be
//! committed (the win's insert returned, a later call or the reconciliation job found the row,
//! or a rebuild read it), so a repeat call is answered COUPON_ALREADY_ISSUED by the issue
//! script alone, truthfully; a holder without the id may still be in flight or an orphan, and
//! only that one needs Postgres. Rows are never deleted (a refund gives the same row back), so
//! the id stays true for as long as the holder does.
//!
//! Seat conservation holds inside the gate at every instant: holders + seats left = total.
//! Every holder is either pending (its row may not exist yet) or known to have its row, so the
//! reconciliation job compares the gate with Postgres by counts and by the pending wins only,
//! in bounded steps, never by reading a whole holders hash.

use std::time::Duration;

use chrono::{DateTime, Utc};
use fred::{
    interfaces::{HashesInterface, KeysInterface},
    types::{Expiration, SetOptions},
};

mod audit;
mod install;
mod terms;

pub use self::{audit::GateSummary, terms::TermsApplied};
use super::{LuaScript, Redis};
use crate::{
    domain::{Coupon, CouponId, UserCouponId, UserId},
    store::StoreError,
};

/// How long one rebuild may hold the coupon's lock.
const LOCK_TTL: Duration = Duration::from_secs(10);
/// How long "no such coupon" is remembered, so unknown ids do not reach Postgres every time.
const MISSING_TTL: Duration = Duration::from_secs(5);
/// When a gate's keys expire (ms since the epoch): a day past the window (late requests
/// answer NOT_ISSUABLE from Redis), and at least an hour from now.
fn expire_at(coupon: &Coupon, now: DateTime<Utc>) -> i64 {
    (coupon.window.ends_at() + chrono::Duration::days(1))
        .max(now + chrono::Duration::hours(1))
        .timestamp_millis()
}

/// A seat held at the gate, with what is needed to undo it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub seat: i64,
    /// When the seat was won (ms since the epoch); 0 for a holder loaded from Postgres.
    pub won_at_ms: i64,
    /// The holder's coupon row, once it is known to be committed.
    pub user_coupon_id: Option<UserCouponId>,
    holder: String,
    generation: String,
}

impl Grant {
    fn parse(holder: &str, generation: &str) -> Option<Self> {
        let (seat, rest) = holder.split_once(':')?;
        let (won_at, user_coupon_id) = match rest.split_once(':') {
            Some((won_at, id)) => (
                won_at,
                Some(UserCouponId::parse(id.parse().ok()?, "user_coupon_id").ok()?),
            ),
            None => (rest, None),
        };
        Some(Self {
            seat: seat.parse().ok()?,
            won_at_ms: won_at.parse().ok()?,
            user_coupon_id,
            holder: holder.to_owned(),
            generation: generation.to_owned(),
        })
    }

    /// The holder value of this grant once its row `user_coupon_id` is committed.
    fn recorded_as(&self, user_coupon_id: UserCouponId) -> String {
        format!("{}:{}:{user_coupon_id}", self.seat, self.won_at_ms)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Granted(Grant),
    /// The gate holds no state for this coupon: rebuild it from Postgres.
    NotLoaded,
    NoSuchCoupon,
    OutsideWindow,
    /// The user already holds a seat: recorded in Postgres (known when the grant carries its
    /// `user_coupon_id`), being recorded, or orphaned.
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
    record: LuaScript,
    extend: LuaScript,
    set_terms: LuaScript,
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
            issue: LuaScript::new(
                "coupon_gate.decide",
                include_str!("../lua/issue_coupon.lua"),
            ),
            release: LuaScript::new(
                "coupon_gate.release",
                include_str!("../lua/release_seat.lua"),
            ),
            install: LuaScript::new(
                "coupon_gate.install",
                include_str!("../lua/load_coupon.lua"),
            ),
            unlock: LuaScript::new("coupon_gate.unlock", include_str!("../lua/unlock.lua")),
            summary: LuaScript::new(
                "coupon_gate.summary",
                include_str!("../lua/gate_summary.lua"),
            ),
            pending: LuaScript::new(
                "coupon_gate.pending",
                include_str!("../lua/pending_wins.lua"),
            ),
            settle: LuaScript::new("coupon_gate.settle", include_str!("../lua/settle_wins.lua")),
            record: LuaScript::new(
                "coupon_gate.record",
                include_str!("../lua/record_holder.lua"),
            ),
            extend: LuaScript::new(
                "coupon_gate.extend_lock",
                include_str!("../lua/extend_lock.lua"),
            ),
            set_terms: LuaScript::new(
                "coupon_gate.set_terms",
                include_str!("../lua/set_coupon_terms.lua"),
            ),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parse_seat_and_win_time() {
        let grant = Grant::parse("7:1700000000123", "g1").unwrap();
        assert_eq!((grant.seat, grant.won_at_ms), (7, 1_700_000_000_123));
        assert_eq!(grant.user_coupon_id, None);
        assert_eq!(Grant::parse("7", "g1"), None);
        assert_eq!(Grant::parse("x:1", "g1"), None);
        assert_eq!(Grant::parse("7:1:x", "g1"), None);
    }

    #[test]
    fn a_recorded_grant_carries_its_row_id() {
        let grant = Grant::parse("7:1700000000123", "g1").unwrap();
        let id = |raw| Some(UserCouponId::parse(raw, "user_coupon_id").unwrap());
        let recorded = Grant::parse(&grant.recorded_as(id(42).unwrap()), "g1").unwrap();
        assert_eq!(
            (recorded.seat, recorded.won_at_ms, recorded.user_coupon_id),
            (7, 1_700_000_000_123, id(42))
        );
        let loaded = Grant::parse("3:0:9", "g2").unwrap();
        assert_eq!(
            (loaded.seat, loaded.won_at_ms, loaded.user_coupon_id),
            (3, 0, id(9))
        );
        assert_eq!(Grant::parse("3:0:0", "g2"), None);
    }

    /// The window rule lives twice: in the gate's Lua (the decision) and in
    /// [`IssueWindow::contains`] (what the reconciliation expects). Both are asked about the
    /// instants around each edge, against the real script on the Redis of the tests
    /// (`TEST_REDIS_URL`, default 127.0.0.1:6379), under a key prefix of its own.
    #[tokio::test]
    async fn the_gate_and_the_domain_agree_on_the_issue_window() {
        use crate::domain::{
            Coupon, CouponTerms, Discount, DisplayName, IssueWindow, ValidDays, Won,
        };
        use chrono::{Duration as Span, TimeZone};

        let url =
            std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!("unit-window-{}:", std::process::id());
        let redis = Redis::connect(&url, 1, Duration::from_secs(2), &prefix).unwrap();
        assert!(
            redis.wait_connected(Duration::from_secs(5)).await,
            "Redis at {url}"
        );
        let gate = CouponGate::new(redis.clone());

        let starts = Utc.timestamp_millis_opt(1_800_000_000_000).unwrap();
        let ends = starts + Span::minutes(10);
        let window = IssueWindow::parse(starts, ends).unwrap();
        let coupon = Coupon {
            id: CouponId::parse(1, "coupon_id").unwrap(),
            terms: CouponTerms {
                name: DisplayName::parse("window".into(), "name").unwrap(),
                discount: Discount::Fixed {
                    amount: Won::new(100),
                },
                min_order_amount: Won::ZERO,
                valid_days: ValidDays::parse(1).unwrap(),
            },
            total_quantity: 100,
            window,
            created_at: starts,
        };
        let token = gate.try_lock(coupon.id).await.unwrap().expect("the lock");
        assert!(
            gate.install(&token, &coupon, &[], InstallMode::Replace, starts)
                .await
                .unwrap()
        );
        let ms = Span::milliseconds;
        let instants = [
            starts - Span::days(1),
            starts - ms(1),
            starts,
            starts + ms(1),
            ends - ms(1),
            ends,
            ends + ms(1),
            ends + Span::days(1),
        ];
        for (user, now) in (1..).zip(instants) {
            let decision = gate
                .decide(coupon.id, UserId::parse(user, "user_id").unwrap(), now)
                .await
                .unwrap();
            let refused = matches!(decision, Decision::OutsideWindow);
            assert_eq!(
                !refused,
                window.contains(now),
                "at {now}: the gate said {decision:?}"
            );
        }
        gate.unlock(coupon.id, token).await.unwrap();
        let keys = ["state", "holders", "free", "pending"]
            .map(|k| redis.key(format_args!("coupon:{{1}}:{k}")));
        let _: i64 = redis.client().del(keys.to_vec()).await.unwrap();
    }
}
