//! The operator's coupon controls: listing coupons with their seats, and changing a live
//! coupon's name, window end and total.
//!
//! Invariant: never more coupons issued than the current total, whatever is issued meanwhile,
//! on every replica, and after any rebuild of the gate. Postgres is changed first (the coupon
//! row locked against the issued count, see [`coupon_admin`]); then the gate, under its
//! rebuild lock, is set to the terms Postgres has now: a raise adds exactly the new seats in
//! one script, a lowered total rebuilds the gate from Postgres, and a moved window end is read
//! by the next request on every replica (the issue script reads it from Redis on every call).
//! Holding the lock orders the step with rebuilds: one that read the old terms installs before
//! it, and one that starts after it reads the new terms.
//!
//! Cancel safety: the change runs in a task of its own, so a caller that goes away after the
//! commit does not leave the gate on the old terms. If the gate step fails (Redis unreachable,
//! the lock held too long), the call answers UNAVAILABLE; the same request again applies
//! nothing new to Postgres and retries the gate step, and the reconciliation job rebuilds a
//! gate whose total or window end is not the coupon's.

use std::{sync::Arc, time::Duration};

use chrono::Utc;

use super::{CouponStock, Coupons, coupon_not_found, gate_unavailable};
use crate::{
    app::idempotency::{NextAction, next_action},
    domain::{CouponChanges, CouponId, DisplayName, IdempotencyKey, KeyScope, PageSize, PageToken},
    error::AppError,
    store::{
        postgres::{
            self as postgres, coupon_admin, coupons,
            idempotency::{self, Operation},
        },
        redis::coupon_gate::{InstallMode, TermsApplied},
    },
};

const OPERATION: Operation = Operation::UpdateCoupon;

/// How long a change waits for a rebuild of the gate that holds its lock.
const GATE_LOCK_PATIENCE: Duration = Duration::from_secs(5);

impl Coupons {
    /// Coupons by id, each with its seats issued and left.
    pub async fn page(
        &self,
        size: PageSize,
        after: Option<PageToken>,
    ) -> Result<(Vec<CouponStock>, Option<PageToken>), AppError> {
        let (coupons, next) = coupon_admin::page(&self.pg, size, after).await?;
        let stocks = coupons
            .into_iter()
            .map(|(coupon, issued)| CouponStock::counted(coupon, issued))
            .collect();
        Ok((stocks, next))
    }

    /// Changes a coupon: see the module docs. With a key (admin scope), a retry applies
    /// nothing more to Postgres, finishes the gate step, and returns the coupon as it is now.
    /// Cancel-safe.
    pub async fn update(
        self: &Arc<Self>,
        id: CouponId,
        changes: CouponChanges,
        key: Option<IdempotencyKey>,
    ) -> Result<CouponStock, AppError> {
        let this = self.clone();
        tokio::spawn(async move { this.update_now(id, changes, key).await })
            .await
            .unwrap_or_else(|e| {
                Err(AppError::internal(format!(
                    "coupon update task failed: {e}"
                )))
            })
    }

    async fn update_now(
        self: &Arc<Self>,
        id: CouponId,
        changes: CouponChanges,
        key: Option<IdempotencyKey>,
    ) -> Result<CouponStock, AppError> {
        // Seats won at the gate whose rows are still being written count as issued: a lower
        // total must not turn a winner about to hear "yes" into a "sold out". Read before the
        // lock: a seat won after this is refused by Postgres if it is beyond the new total.
        let won_at_gate = match changes.total_quantity {
            Some(_) => self.gate.summary(id).await?.map_or(0, |s| s.holders),
            None => 0,
        };
        let mut tx = self.pg.begin().await?;
        let fingerprint = || {
            let name = changes.name.as_ref().map(DisplayName::as_str);
            format!(
                "{:?}",
                (id, name, changes.issue_ends_at, changes.total_quantity)
            )
        };
        if let NextAction::ReturnSaved(_) = next_action(
            &mut tx,
            KeyScope::Admin,
            OPERATION,
            key.as_ref(),
            fingerprint,
        )
        .await?
        {
            drop(tx);
            // The first call committed; an UNAVAILABLE may have cut its gate step.
            self.sync_gate(id).await?;
            return self.stock(id).await;
        }
        let (current, issued) = coupon_admin::lock(&mut tx, id)
            .await?
            .ok_or_else(|| coupon_not_found(id))?;
        let window = changes.window(current.window)?;
        let total = changes.total_quantity.unwrap_or(current.total_quantity);
        let taken = issued.max(won_at_gate);
        if total < current.total_quantity && total < taken {
            return Err(AppError::CouponQuantityBelowIssued { issued: taken });
        }
        let name = changes.name.as_ref().unwrap_or(&current.terms.name);
        let updated = coupon_admin::update(&mut tx, id, name, window.ends_at(), total).await?;
        if total < current.total_quantity {
            let moved = coupon_admin::compact_seats(&mut tx, id, total).await?;
            tracing::info!(coupon = %id, moved, total, "coupon total lowered: seats compacted");
        }
        if let Some(key) = &key {
            idempotency::complete(&mut tx, KeyScope::Admin, OPERATION, key, id.get()).await?;
        }
        postgres::commit(tx).await?;
        // Also when Postgres already had these values: the same request sent again after an
        // UNAVAILABLE finishes the gate step that call could not.
        if changes.total_quantity.is_some() || changes.issue_ends_at.is_some() {
            self.sync_gate(id).await?;
        }
        Ok(CouponStock::counted(updated, issued))
    }

    /// Makes the gate decide by the terms Postgres has now, under the gate's rebuild lock: a
    /// raise or a new window end in place (the wins in flight stay), a lower total by a
    /// rebuild. Also the reconciliation job's repair of a gate left on old terms.
    pub(super) async fn sync_gate(self: &Arc<Self>, id: CouponId) -> Result<(), AppError> {
        let Some(token) = self.gate.lock_within(id, GATE_LOCK_PATIENCE).await? else {
            return Err(gate_unavailable(
                "the coupon gate is being rebuilt: send the same change again",
            ));
        };
        let synced = async {
            // Read again under the lock: a change committed since ours is the one to apply.
            let coupon = coupons::get(&self.pg, id)
                .await?
                .ok_or_else(|| coupon_not_found(id))?;
            match self.gate.apply_terms(&token, &coupon, Utc::now()).await? {
                TermsApplied::Applied | TermsApplied::NotLoaded => Ok(()),
                TermsApplied::NeedsRebuild => {
                    if self
                        .install_locked(&token, id, InstallMode::Replace, None)
                        .await?
                    {
                        Ok(())
                    } else {
                        Err(gate_unavailable("the coupon gate's lock expired"))
                    }
                }
                TermsApplied::LockLost => Err(gate_unavailable("the coupon gate's lock expired")),
            }
        }
        .await;
        self.unlock_gate(id, token).await;
        // More seats: the "sold out" this replica remembers no longer holds (other replicas
        // remember theirs for LOCAL_SOLD_OUT only).
        self.sold_out.forget(&[id]);
        synced
    }
}
