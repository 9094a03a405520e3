//! Per-user rate budgets: one GCRA bucket per user id, decided by one Lua call so that every
//! replica shares the budget (and Redis's clock). A bucket is one key of one integer that
//! expires once the bucket is full again, so idle users cost nothing.

use std::time::Duration;

use fred::types::{Key, Value};

use super::{LuaScript, Redis};
use crate::{domain::UserId, store::StoreError};

/// How fast calls are admitted: `burst` at once, then one per `interval`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// What one call costs, in microseconds.
    interval_us: i64,
    /// How far ahead of now the bucket may run, in microseconds (`burst` calls).
    capacity_us: i64,
}

impl Gcra {
    /// `per_sec` calls a second after a burst of `burst`; both at least 1.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        let interval_us = 1_000_000 / i64::from(per_sec.max(1));
        Self {
            interval_us: interval_us.max(1),
            capacity_us: interval_us.max(1) * i64::from(burst.max(1)),
        }
    }
}

pub struct UserRateBuckets {
    redis: Redis,
    script: LuaScript,
    gcra: Gcra,
}

impl UserRateBuckets {
    pub fn new(redis: Redis, gcra: Gcra) -> Self {
        Self {
            redis,
            script: LuaScript::new("rate_limit.check", include_str!("lua/user_rate.lua")),
            gcra,
        }
    }

    /// Charges one call to `user`'s bucket: `None` when admitted, or how long until a call
    /// would be (a refused call is not charged).
    pub async fn take(&self, user: UserId) -> Result<Option<Duration>, StoreError> {
        // The user id is the hash tag: one key per call, any cluster slot.
        let key = self.redis.key(format_args!("rate:{{{user}}}"));
        let Gcra {
            interval_us,
            capacity_us,
        } = self.gcra;
        let wait_us: i64 = self
            .script
            .call_encoded(&self.redis, || {
                (
                    Key::from(key.as_str()).into(),
                    Value::Array(vec![
                        Value::Integer(interval_us),
                        Value::Integer(capacity_us),
                    ]),
                )
            })
            .await?;
        Ok((wait_us > 0).then(|| Duration::from_micros(wait_us.unsigned_abs())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_holds_burst_calls_of_one_interval_each() {
        let g = Gcra::new(100, 20);
        assert_eq!((g.interval_us, g.capacity_us), (10_000, 200_000));
        let g = Gcra::new(3, 1);
        assert_eq!((g.interval_us, g.capacity_us), (333_333, 333_333));
        let g = Gcra::new(2_000_000, 5);
        assert_eq!((g.interval_us, g.capacity_us), (1, 5));
    }
}
