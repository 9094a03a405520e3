//! Rebuilding a coupon's gate from Postgres: under the coupon's Redis lock (one replica at a
//! time), in a task of its own that every caller of this process shares (one rebuild per
//! coupon per process), so a caller that goes away neither stops it nor leaves the lock behind.

use std::{collections::HashMap, sync::Arc, sync::Mutex};

use chrono::Utc;
use futures::{FutureExt, future::BoxFuture, future::Shared};
use tokio::time::Instant;

use super::{Coupons, REBUILD_POLL, RepairReason, gate_unavailable};
use crate::{
    domain::CouponId,
    error::AppError,
    store::{
        Dependency,
        postgres::coupons,
        redis::coupon_gate::{InstallMode, LockToken},
    },
};

/// A rebuild's result, shared by every caller waiting for it.
#[derive(Clone, Debug)]
pub(super) struct RebuildFailure {
    dependency: Option<Dependency>,
    message: String,
}

impl From<RebuildFailure> for AppError {
    fn from(failure: RebuildFailure) -> Self {
        match failure.dependency {
            Some(dependency) => AppError::Unavailable {
                dependency,
                source: failure.message.into(),
            },
            None => AppError::internal(failure.message),
        }
    }
}

pub(super) type RebuildResult = Result<bool, RebuildFailure>;

/// The rebuilds this process is running, one per coupon.
#[derive(Default)]
pub(super) struct Rebuilds {
    running: Mutex<HashMap<CouponId, Shared<BoxFuture<'static, RebuildResult>>>>,
}

impl Coupons {
    /// Waits (until `patience`) for the missing gate of `coupon` to be rebuilt, by this process
    /// or another replica.
    pub(super) async fn await_rebuild(
        self: &Arc<Self>,
        coupon: CouponId,
        patience: Instant,
    ) -> Result<(), AppError> {
        let rebuilt = self.rebuild_gate(coupon, InstallMode::IfAbsent, Some(RepairReason::Missing));
        match tokio::time::timeout_at(patience, rebuilt).await {
            Ok(Ok(true)) => Ok(()),
            // Another replica holds the lock (it is rebuilding), or loaded it first.
            Ok(Ok(false)) => {
                tokio::time::sleep(REBUILD_POLL).await;
                if Instant::now() >= patience {
                    return Err(gate_unavailable(
                        "the coupon gate could not be rebuilt in time",
                    ));
                }
                Ok(())
            }
            Ok(Err(failure)) => Err(failure.into()),
            Err(_) => Err(gate_unavailable(
                "the coupon gate could not be rebuilt in time",
            )),
        }
    }

    /// Rebuilds a coupon's gate from Postgres under the coupon's Redis lock, in a task of its
    /// own that every caller of this process shares: a caller that goes away neither stops it
    /// nor leaves the lock behind. Resolves to whether a gate was installed (false: another
    /// replica holds the lock, the gate was loaded meanwhile, or the coupon does not exist).
    pub(super) fn rebuild_gate(
        self: &Arc<Self>,
        coupon: CouponId,
        mode: InstallMode,
        reason: Option<RepairReason>,
    ) -> Shared<BoxFuture<'static, RebuildResult>> {
        let rebuilds = &self.rebuilds.running;
        let mut running = rebuilds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rebuild) = running.get(&coupon) {
            return rebuild.clone();
        }
        let this = self.clone();
        let task = tokio::spawn(async move {
            let result = this.rebuild_now(coupon, mode, reason).await;
            this.rebuilds
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&coupon);
            result.map_err(|e| RebuildFailure {
                dependency: match &e {
                    AppError::Unavailable { dependency, .. } => Some(*dependency),
                    _ => None,
                },
                message: e.to_string(),
            })
        });
        let shared = async move {
            task.await.unwrap_or_else(|e| {
                Err(RebuildFailure {
                    dependency: None,
                    message: format!("coupon gate rebuild failed: {e}"),
                })
            })
        }
        .boxed()
        .shared();
        running.insert(coupon, shared.clone());
        shared
    }

    async fn rebuild_now(
        &self,
        coupon_id: CouponId,
        mode: InstallMode,
        reason: Option<RepairReason>,
    ) -> Result<bool, AppError> {
        let Some(token) = self.gate.try_lock(coupon_id).await? else {
            return Ok(false);
        };
        let rebuilt = self.install_locked(&token, coupon_id, mode, reason).await;
        self.unlock_gate(coupon_id, token).await;
        rebuilt
    }

    /// Installs the gate as Postgres has the coupon now, under the lock `token` proves.
    /// Returns whether it was installed (false: the lock was lost, the gate was loaded meanwhile
    /// in [`InstallMode::IfAbsent`], or the coupon does not exist).
    pub(super) async fn install_locked(
        &self,
        token: &LockToken,
        coupon_id: CouponId,
        mode: InstallMode,
        reason: Option<RepairReason>,
    ) -> Result<bool, AppError> {
        let gate = &self.gate;
        let Some(coupon) = coupons::get(&self.pg, coupon_id).await? else {
            gate.mark_missing(coupon_id).await?;
            return Ok(false);
        };
        let held = coupons::held_seats(&self.pg, coupon_id).await?;
        let installed = gate
            .install(token, &coupon, &held, mode, Utc::now())
            .await?;
        if installed {
            self.sold_out.forget(&[coupon_id]);
            if let Some(reason) = reason {
                self.stats.rebuilt(reason);
                tracing::info!(coupon = %coupon_id, issued = held.len(), reason = reason.as_str(),
                    "coupon gate rebuilt from Postgres");
            }
        }
        Ok(installed)
    }

    pub(super) async fn unlock_gate(&self, coupon_id: CouponId, token: LockToken) {
        if let Err(e) = self.gate.unlock(coupon_id, token).await {
            tracing::debug!(coupon = %coupon_id, error = %e, "unlock failed; the lock will expire");
        }
    }
}
