//! Per-user rate limits: one budget per user id, shared by the calls a bot would flood
//! (IssueCoupon, PlaceOrder, Checkout, Pay, ChargeBalance) and by every replica (the bucket is
//! in Redis, decided by one Lua call).
//!
//! Invariants:
//! - a user gets at most `burst + rate × t` of these calls served over any `t`, whatever the
//!   mix of methods and replicas; a refused call is not charged, so the budget refills while a
//!   bot keeps knocking;
//! - a refusal touches nothing but that one Redis key: no Postgres, no other user's state. A
//!   limited user cannot change what anyone else is answered;
//! - the check comes first in each flow, before its idempotency claim, so a refused call costs
//!   no Postgres. A keyed retry refused this way and sent again after the RetryInfo delay is
//!   admitted (the budget has refilled by then unless the user spent it meanwhile) and then
//!   replays its saved answer through the claim as any retry does;
//! - Redis is a shortcut here, never a dependency: a check it does not answer within the
//!   timeout (or fails) lets the call through, counted and logged, so a Redis outage never
//!   refuses a buyer.
//!
//! Cancel safety: the check is one Redis call; a caller that goes away after it was charged
//! has spent one call of its budget, nothing more.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use crate::{
    domain::UserId,
    error::AppError,
    metrics,
    store::{
        StoreError,
        redis::{
            Redis,
            user_rate::{Gcra, UserRateBuckets},
        },
    },
};

/// The calls that share a user's budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitedCall {
    IssueCoupon,
    PlaceOrder,
    Checkout,
    Pay,
    ChargeBalance,
}

impl LimitedCall {
    const ALL: [LimitedCall; 5] = [
        LimitedCall::IssueCoupon,
        LimitedCall::PlaceOrder,
        LimitedCall::Checkout,
        LimitedCall::Pay,
        LimitedCall::ChargeBalance,
    ];

    fn method(self) -> &'static str {
        match self {
            LimitedCall::IssueCoupon => "IssueCoupon",
            LimitedCall::PlaceOrder => "PlaceOrder",
            LimitedCall::Checkout => "Checkout",
            LimitedCall::Pay => "Pay",
            LimitedCall::ChargeBalance => "ChargeBalance",
        }
    }
}

/// A fail-open warning is logged at most this often; the counter sees every one.
const WARN_EVERY: Duration = Duration::from_secs(10);

pub struct UserRateLimit {
    /// `None`: limits are off.
    buckets: Option<UserRateBuckets>,
    timeout: Duration,
    refused: [metrics::Counter; 5],
    failed_open: [metrics::Counter; 5],
    started: Instant,
    /// Milliseconds after `started` of the last fail-open warning (0: none yet).
    last_warned_ms: AtomicU64,
}

impl UserRateLimit {
    /// `rate`: `None` turns the limits off.
    pub fn new(redis: Redis, rate: Option<Gcra>, timeout: Duration) -> Self {
        Self {
            buckets: rate.map(|rate| UserRateBuckets::new(redis, rate)),
            timeout,
            refused: LimitedCall::ALL.map(|call| metrics::rate_limited(call.method())),
            failed_open: LimitedCall::ALL.map(|call| metrics::rate_limit_fail_open(call.method())),
            started: Instant::now(),
            last_warned_ms: AtomicU64::new(0),
        }
    }

    /// Charges one `call` to `user`'s budget, or refuses it with RATE_LIMITED and the delay
    /// after which it would be admitted.
    pub async fn admit(&self, user: UserId, call: LimitedCall) -> Result<(), AppError> {
        let Some(buckets) = &self.buckets else {
            return Ok(());
        };
        let slot = call as usize;
        match tokio::time::timeout(self.timeout, buckets.take(user)).await {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(retry_after))) => {
                self.refused[slot].increment(1);
                Err(AppError::RateLimited { retry_after })
            }
            Ok(Err(e)) => {
                self.fail_open(slot, Some(e));
                Ok(())
            }
            Err(_elapsed) => {
                self.fail_open(slot, None);
                Ok(())
            }
        }
    }

    fn fail_open(&self, slot: usize, error: Option<StoreError>) {
        self.failed_open[slot].increment(1);
        let now_ms = (self.started.elapsed().as_millis() as u64).max(1);
        let last = self.last_warned_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= WARN_EVERY.as_millis() as u64;
        if due
            && self
                .last_warned_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            match error {
                Some(e) => {
                    tracing::warn!(error = %e, "user rate check failed; calls let through unchecked (ecommerce_rate_limit_fail_open_total counts them)")
                }
                None => tracing::warn!(
                    timeout_ms = self.timeout.as_millis() as u64,
                    "user rate check timed out; calls let through unchecked (ecommerce_rate_limit_fail_open_total counts them)"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_limited_call_has_its_own_counters() {
        for (slot, call) in LimitedCall::ALL.iter().enumerate() {
            assert_eq!(*call as usize, slot, "{call:?}");
        }
    }
}
