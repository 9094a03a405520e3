//! Applying an operator's change of a coupon's terms to its gate, under the rebuild lock.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{CouponGate, LockToken};
use crate::{
    domain::{Coupon, CouponId},
    store::StoreError,
};

/// Pause between attempts at a lock another rebuild holds (a rebuild takes milliseconds).
const LOCK_POLL: Duration = Duration::from_millis(5);

/// What applying new terms to a gate did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TermsApplied {
    /// The gate decides by the new terms from its next request on.
    Applied,
    /// No gate is loaded: the next rebuild reads the terms from Postgres.
    NotLoaded,
    /// The total went down: only a rebuild from Postgres lays the seats out again.
    NeedsRebuild,
    /// The lock expired and is someone else's now.
    LockLost,
}

impl CouponGate {
    /// Takes the coupon's rebuild lock, waiting up to `patience` for a rebuild that holds it.
    pub async fn lock_within(
        &self,
        coupon: CouponId,
        patience: Duration,
    ) -> Result<Option<LockToken>, StoreError> {
        let give_up = tokio::time::Instant::now() + patience;
        loop {
            if let Some(token) = self.try_lock(coupon).await? {
                return Ok(Some(token));
            }
            if tokio::time::Instant::now() >= give_up {
                return Ok(None);
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
    }

    /// Sets the gate's total and window to `coupon`'s (as Postgres has it), in one script.
    pub async fn apply_terms(
        &self,
        token: &LockToken,
        coupon: &Coupon,
        now: DateTime<Utc>,
    ) -> Result<TermsApplied, StoreError> {
        let k = self.keys(coupon.id);
        let lock = self.lock_key(coupon.id);
        let args = [
            token.0.clone(),
            coupon.total_quantity.to_string(),
            coupon.window.starts_at().timestamp_millis().to_string(),
            coupon.window.ends_at().timestamp_millis().to_string(),
            super::expire_at(coupon, now).to_string(),
            now.timestamp_millis().to_string(),
        ];
        let applied: i64 = self
            .set_terms
            .call(
                &self.redis,
                &[&k.state, &k.holders, &k.free, &k.pending, &lock],
                &args.each_ref().map(String::as_str),
            )
            .await?;
        match applied {
            1 => Ok(TermsApplied::Applied),
            0 => Ok(TermsApplied::NotLoaded),
            2 => Ok(TermsApplied::NeedsRebuild),
            -1 => Ok(TermsApplied::LockLost),
            other => Err(StoreError::Inconsistent(format!(
                "coupon {}: the terms script replied {other}",
                coupon.id
            ))),
        }
    }
}
