//! The reconciliation job's half of the coupon flow: comparing each live gate with Postgres.
//!
//! Invariant: a gate that agrees with Postgres is never rebuilt, whatever is in flight; a gate
//! on old terms (an UpdateCoupon's gate step cut after its commit) gets the coupon's terms in
//! place, as UpdateCoupon sets them, so a raise keeps the wins in flight; a win that never
//! became a coupon gives its seat back; a missing gate of a live coupon is rebuilt.
//!
//! The job's run is not cancelled while it works (the server waits for a run in progress when
//! it stops); if its process dies while it holds a gate's lock for a rebuild or for the terms,
//! the lock's expiry frees it and the next run compares again.
//! Every step is bounded (constant-time counts, then pending wins a chunk at a time), so a
//! 1,000,000-seat coupon is compared without a large Redis command.

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::{Coupons, RepairReason};
use crate::{
    domain::{Coupon, CouponId, UserCouponId},
    error::AppError,
    store::{
        postgres::coupons,
        redis::coupon_gate::{GateSummary, InstallMode},
    },
};

/// Pending wins the job checks against Postgres per step.
const PENDING_CHUNK: usize = 1000;

/// What one reconciliation pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub checked: usize,
    pub repaired: Vec<CouponId>,
}

impl Coupons {
    /// Compares each live coupon's gate with Postgres, in constant time per coupon plus the
    /// wins still pending: rebuilds a missing gate or one whose counts contradict Postgres,
    /// and releases wins that never became coupons within `grace`. A gate that agrees with
    /// Postgres is never rebuilt, whatever is in flight.
    pub async fn reconcile(self: &Arc<Self>, grace: Duration) -> Result<ReconcileReport, AppError> {
        let now = Utc::now();
        let mut report = ReconcileReport::default();
        for coupon in coupons::issuable_around(&self.pg, now).await? {
            report.checked += 1;
            let started = Instant::now();
            // Postgres first: every row counted here was won at the gate before the gate is
            // read below, so its holder is in the summary; rows committed after the count are
            // pending there.
            let recorded = coupons::count_issued(&self.pg, coupon.id).await?;
            let Some(summary) = self.gate.summary(coupon.id).await? else {
                if coupon.window.contains(now)
                    && self
                        .rebuild_gate(
                            coupon.id,
                            InstallMode::IfAbsent,
                            Some(RepairReason::Missing),
                        )
                        .await?
                {
                    report.repaired.push(coupon.id);
                }
                continue;
            };
            if let Some(why) = gate_disagrees(&summary, recorded) {
                tracing::warn!(coupon = %coupon.id, why, ?summary, recorded,
                    "coupon gate disagrees with Postgres: rebuilding");
                if self
                    .rebuild_gate(
                        coupon.id,
                        InstallMode::Replace,
                        Some(RepairReason::Disagrees),
                    )
                    .await?
                {
                    report.repaired.push(coupon.id);
                }
                continue;
            }
            if stale_terms(&summary, &coupon).is_some() {
                // The coupon was listed before the gate was read: an UpdateCoupon committed and
                // applied to the gate in between looks like stale terms. The terms to compare
                // are Postgres's now.
                let now_in_pg = coupons::get(&self.pg, coupon.id).await?;
                if let Some(why) = stale_terms(&summary, now_in_pg.as_ref().unwrap_or(&coupon)) {
                    // Applied as UpdateCoupon applies them, under the gate's lock and read
                    // again there, never by replacing the gate: the UpdateCoupon's own gate step
                    // may take the lock first and let wins on the new seats through, and a
                    // rebuild from Postgres after it would drop those still in flight. A lower
                    // total still rebuilds, as it must.
                    tracing::warn!(coupon = %coupon.id, why, ?summary,
                        "coupon gate on old terms: applying the coupon's");
                    self.sync_gate(coupon.id).await?;
                    self.stats.rebuilt(RepairReason::Disagrees);
                    report.repaired.push(coupon.id);
                    continue;
                }
            }
            let won_by = now - chrono::Duration::from_std(grace).unwrap_or_default();
            let released = self
                .settle_pending_wins(coupon.id, won_by, summary.pending)
                .await?;
            self.stats.checked(started.elapsed());
            if released > 0 {
                self.stats.rebuilt(RepairReason::Orphan);
                report.repaired.push(coupon.id);
            }
        }
        Ok(report)
    }

    /// Checks the wins pending since `won_by` or earlier against Postgres, a chunk at a time:
    /// recorded ones are settled, the others are orphans and give their seat back. Returns
    /// how many orphans were released.
    async fn settle_pending_wins(
        &self,
        coupon: CouponId,
        won_by: DateTime<Utc>,
        pending: i64,
    ) -> Result<usize, AppError> {
        let gate = &self.gate;
        let mut released = 0;
        // Bounded even if wins keep changing under the job: each chunk settles or releases
        // what it saw, so every pending win is looked at once.
        let chunks = pending as usize / PENDING_CHUNK + 2;
        for _ in 0..chunks {
            let Some(chunk) = gate.pending_since(coupon, won_by, PENDING_CHUNK).await? else {
                break;
            };
            if chunk.wins.is_empty() {
                break;
            }
            let users: Vec<i64> = chunk.wins.iter().map(|w| w.user).collect();
            // The rows' ids go to the gate with the settling, so these holders' repeat calls
            // are answered without Postgres from now on.
            let recorded: HashMap<i64, UserCouponId> =
                coupons::holders_among(&self.pg, coupon, &users)
                    .await?
                    .into_iter()
                    .collect();
            gate.settle(coupon, &chunk, |user| recorded.get(&user).copied())
                .await?;
            for win in chunk
                .wins
                .iter()
                .filter(|w| !recorded.contains_key(&w.user))
            {
                if gate.release_orphan(coupon, win).await? {
                    released += 1;
                    tracing::warn!(%coupon, user = win.user, "released an orphaned coupon seat");
                }
            }
            if chunk.wins.len() < PENDING_CHUNK {
                break;
            }
        }
        if released > 0 {
            self.sold_out.forget(&[coupon]);
        }
        Ok(released)
    }
}

/// Why a gate's counts contradict `recorded`, the coupons Postgres had issued just before the
/// gate was read; `None` when they agree. In-flight wins never look like a disagreement: they
/// are holders that are pending.
fn gate_disagrees(gate: &GateSummary, recorded: i64) -> Option<&'static str> {
    if gate.holders + gate.remaining() != gate.total {
        return Some("holders and seats left do not add up to the total");
    }
    if gate.holders < recorded {
        return Some("Postgres holds coupons the gate does not know");
    }
    if gate.holders - recorded > gate.pending {
        return Some("holders without a coupon row are not pending");
    }
    None
}

/// Whether the gate decides by other terms than `coupon` says: an UpdateCoupon whose Redis
/// step failed (Postgres had committed). The rebuild reads the coupon again under the gate's
/// lock, so a coupon changed since it was read here is installed as it is now.
fn stale_terms(gate: &GateSummary, coupon: &Coupon) -> Option<&'static str> {
    if gate.total != coupon.total_quantity {
        return Some("the gate's total is not the coupon's");
    }
    if gate.ends_ms != coupon.window.ends_at().timestamp_millis() {
        return Some("the gate's issue window is not the coupon's");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(total: i64, next: i64, free: i64, holders: i64, pending: i64) -> GateSummary {
        GateSummary {
            total,
            next_seat: next,
            free_seats: free,
            holders,
            pending,
            ends_ms: 0,
        }
    }

    #[test]
    fn an_agreeing_gate_is_left_alone_even_with_wins_in_flight() {
        // 10 seats: 7 handed out (next = 8), one given back; 6 holders, 4 of them recorded
        // when Postgres was counted and 2 pending (in flight).
        assert_eq!(gate_disagrees(&summary(10, 8, 1, 6, 2), 4), None);
        // Rows committed after the count are pending at the gate: still no disagreement.
        assert_eq!(gate_disagrees(&summary(10, 8, 1, 6, 5), 1), None);
        // A fresh gate and a sold-out one.
        assert_eq!(gate_disagrees(&summary(10, 1, 0, 0, 0), 0), None);
        assert_eq!(gate_disagrees(&summary(10, 11, 0, 10, 0), 10), None);
    }

    #[test]
    fn lost_seats_unknown_rows_and_unpending_holders_are_disagreements() {
        // A seat taken without a holder.
        assert!(gate_disagrees(&summary(10, 8, 0, 6, 0), 6).is_some());
        // Postgres has a coupon the gate does not know.
        assert!(gate_disagrees(&summary(10, 7, 0, 6, 0), 7).is_some());
        // Two holders without rows, only one pending.
        assert!(gate_disagrees(&summary(10, 7, 0, 6, 1), 4).is_some());
    }

    #[test]
    fn a_gate_on_another_total_or_window_end_has_stale_terms() {
        use crate::domain::{CouponTerms, Discount, DisplayName, IssueWindow, ValidDays, Won};
        let starts = Utc::now();
        let ends = starts + chrono::Duration::hours(1);
        let coupon = Coupon {
            id: CouponId::parse(1, "coupon_id").unwrap(),
            terms: CouponTerms {
                name: DisplayName::parse("sale".into(), "name").unwrap(),
                discount: Discount::Fixed {
                    amount: Won::new(100),
                },
                min_order_amount: Won::ZERO,
                valid_days: ValidDays::parse(1).unwrap(),
            },
            total_quantity: 10,
            window: IssueWindow::parse(starts, ends).unwrap(),
            created_at: starts,
        };
        let agreeing = GateSummary {
            ends_ms: ends.timestamp_millis(),
            ..summary(10, 8, 1, 6, 2)
        };
        assert_eq!(stale_terms(&agreeing, &coupon), None);
        // A raise whose gate step failed: the gate still has the old total.
        let old_total = GateSummary {
            total: 8,
            ..agreeing.clone()
        };
        assert!(stale_terms(&old_total, &coupon).is_some());
        // The window ended in Postgres, not yet at the gate.
        let old_end = GateSummary {
            ends_ms: ends.timestamp_millis() + 60_000,
            ..agreeing
        };
        assert!(stale_terms(&old_end, &coupon).is_some());
    }
}
