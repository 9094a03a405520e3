//! First-come-first-served coupon issuance.
//!
//! Invariant: issued <= total and at most one coupon per user, even if Redis forgets
//! everything. Redis (one Lua script) decides who gets a seat at Redis speed, so losers never
//! touch Postgres; Postgres records each winner before the call succeeds, and its constraints
//! refuse anything the gate got wrong. A failed record gives the seat back; a crash between the
//! two steps is repaired by [`App::reconcile_coupon_gates`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::App;
use crate::{
    domain::{Coupon, CouponId, PageSize, PageToken, UserCoupon, UserId},
    error::{AppError, Resource},
    metrics,
    store::{
        postgres::coupons::{self, HeldSeat, IssueRefusal, NewCoupon, SeatGrant},
        redis::coupon_gate::{Decision, GateView, Grant, InstallMode},
    },
};

/// How long this process answers COUPON_SOLD_OUT without asking the gate again. Short: a seat
/// given back (a failed insert, a repaired crash) is offered again within this long.
const LOCAL_SOLD_OUT: Duration = Duration::from_millis(250);
/// How long a request waits for another caller's rebuild of the gate before giving up.
const REBUILD_PATIENCE: Duration = Duration::from_secs(3);
/// Pause between looks at a gate another caller is rebuilding (a rebuild takes milliseconds).
const REBUILD_POLL: Duration = Duration::from_millis(5);
/// Retries after the gate granted a seat Postgres already gave away (possible only right after
/// a rebuild raced with inserts in flight).
const MAX_SEAT_COLLISIONS: u32 = 5;

/// A coupon and how many are left.
pub struct CouponStock {
    pub coupon: Coupon,
    pub remaining: i64,
}

/// What one reconciliation pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub checked: usize,
    pub repaired: Vec<CouponId>,
}

impl App {
    pub async fn create_coupon(&self, new: NewCoupon) -> Result<Coupon, AppError> {
        let coupon = coupons::create(self.pg(), new).await?;
        // Load the gate now, so the first wave of a stampede does not queue behind one
        // caller's rebuild, after dropping a "no such coupon" cached a moment ago. If Redis is
        // unreachable, the first request after it returns rebuilds the gate instead.
        let gate = self.coupon_gate();
        let loaded = match gate.forget(self.redis(), coupon.id).await {
            Ok(()) => self
                .rebuild_coupon_gate(coupon.id, InstallMode::Replace)
                .await
                .map(drop),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = loaded {
            tracing::warn!(coupon = %coupon.id, error = %e, "coupon gate not loaded yet");
        }
        Ok(coupon)
    }

    pub async fn coupon_stock(&self, id: CouponId) -> Result<CouponStock, AppError> {
        let (coupon, issued) =
            coupons::get_with_issued(self.pg(), id)
                .await?
                .ok_or(AppError::NotFound {
                    resource: Resource::Coupon,
                    id: id.get(),
                })?;
        Ok(CouponStock {
            remaining: coupon.total_quantity - issued,
            coupon,
        })
    }

    pub async fn user_coupons(
        &self,
        user_id: UserId,
        page_size: PageSize,
        after: Option<PageToken>,
    ) -> Result<(Vec<UserCoupon>, Option<PageToken>), AppError> {
        Ok(coupons::user_coupons_page(self.pg(), user_id, page_size, after).await?)
    }

    /// Issues one coupon to one user.
    pub async fn issue_coupon(
        &self,
        coupon_id: CouponId,
        user_id: UserId,
    ) -> Result<UserCoupon, AppError> {
        let result = self.try_issue_coupon(coupon_id, user_id).await;
        metrics::coupon_issue(metrics::outcome(&result));
        result
    }

    async fn try_issue_coupon(
        &self,
        coupon_id: CouponId,
        user_id: UserId,
    ) -> Result<UserCoupon, AppError> {
        if self
            .coupons_sold_out()
            .first(&[coupon_id], std::time::Instant::now())
            .is_some()
        {
            return Err(AppError::CouponSoldOut);
        }
        let patience = Instant::now() + REBUILD_PATIENCE;
        let mut collisions = 0;
        loop {
            let decision = self
                .coupon_gate()
                .decide(self.redis(), coupon_id, user_id, Utc::now())
                .await?;
            let grant = match decision {
                Decision::Granted(grant) => grant,
                Decision::NoSuchCoupon => {
                    return Err(AppError::NotFound {
                        resource: Resource::Coupon,
                        id: coupon_id.get(),
                    });
                }
                Decision::OutsideWindow => return Err(AppError::CouponNotIssuable),
                Decision::AlreadyHolder => return Err(AppError::CouponAlreadyIssued),
                Decision::SoldOut => {
                    self.coupons_sold_out().remember(coupon_id, LOCAL_SOLD_OUT);
                    return Err(AppError::CouponSoldOut);
                }
                Decision::NotLoaded => {
                    if Instant::now() >= patience {
                        return Err(AppError::Unavailable {
                            dependency: crate::store::Dependency::Redis,
                            source: "the coupon gate could not be rebuilt in time".into(),
                        });
                    }
                    if !self
                        .rebuild_coupon_gate(coupon_id, InstallMode::IfAbsent)
                        .await?
                    {
                        tokio::time::sleep(REBUILD_POLL).await;
                    }
                    continue;
                }
            };
            let recorded = self
                .coupon_recorder()
                .record(SeatGrant {
                    coupon_id,
                    user_id,
                    seat: grant.seat,
                })
                .await;
            match recorded {
                Ok(Ok(user_coupon)) => return Ok(user_coupon),
                Ok(Err(IssueRefusal::SeatTaken)) if collisions < MAX_SEAT_COLLISIONS => {
                    collisions += 1;
                    self.release_grant(coupon_id, user_id, &grant, false).await;
                }
                Ok(Err(refusal)) => {
                    let give_back = refusal == IssueRefusal::AlreadyIssued;
                    self.release_grant(coupon_id, user_id, &grant, give_back)
                        .await;
                    return Err(match refusal {
                        IssueRefusal::AlreadyIssued => AppError::CouponAlreadyIssued,
                        IssueRefusal::NoCoupon => AppError::NotFound {
                            resource: Resource::Coupon,
                            id: coupon_id.get(),
                        },
                        IssueRefusal::SeatBeyondTotal | IssueRefusal::SeatTaken => {
                            AppError::CouponSoldOut
                        }
                    });
                }
                Err(e) => {
                    // Nothing was recorded: the seat goes back to the pool.
                    self.release_grant(coupon_id, user_id, &grant, true).await;
                    return Err(e.into());
                }
            }
        }
    }

    /// Undoes a grant that did not become a coupon. If Redis cannot be reached now, the
    /// reconciliation job repairs the gate later; the caller's answer does not wait for it.
    async fn release_grant(&self, coupon: CouponId, user: UserId, grant: &Grant, give_back: bool) {
        if give_back {
            self.coupons_sold_out().forget(&[coupon]);
        }
        if let Err(e) = self
            .coupon_gate()
            .release(self.redis(), coupon, user, grant, give_back)
            .await
        {
            tracing::warn!(%coupon, %user, seat = grant.seat, error = %e,
                "could not release a coupon seat; the reconciliation job will");
        }
    }

    /// Rebuilds a coupon's gate from Postgres under the coupon's lock. Returns false when
    /// another caller holds the lock (they are rebuilding it).
    async fn rebuild_coupon_gate(
        &self,
        coupon_id: CouponId,
        mode: InstallMode,
    ) -> Result<bool, AppError> {
        let gate = self.coupon_gate();
        let Some(token) = gate.try_lock(self.redis(), coupon_id).await? else {
            return Ok(false);
        };
        let rebuilt = async {
            match coupons::get(self.pg(), coupon_id).await? {
                None => gate.mark_missing(self.redis(), coupon_id).await?,
                Some(coupon) => {
                    let held: Vec<_> = coupons::held_seats(self.pg(), coupon_id)
                        .await?
                        .into_iter()
                        .map(|h| (h.user_id, h.seat))
                        .collect();
                    gate.install(self.redis(), &token, &coupon, &held, mode, Utc::now())
                        .await?;
                    tracing::info!(coupon = %coupon_id, issued = held.len(), ?mode,
                        "coupon gate rebuilt from Postgres");
                }
            }
            Ok::<_, AppError>(())
        }
        .await;
        if let Err(e) = gate.unlock(self.redis(), coupon_id, token).await {
            tracing::debug!(coupon = %coupon_id, error = %e, "unlock failed; the lock will expire");
        }
        rebuilt.map(|()| true)
    }

    /// Compares each live coupon's gate with Postgres and rebuilds the gates that disagree
    /// beyond what requests in flight explain: a holder with no coupon row for longer than
    /// `grace` (a crash between the gate and the insert), a coupon row the gate does not know,
    /// or a seat count that does not add up.
    pub async fn reconcile_coupon_gates(
        &self,
        grace: Duration,
    ) -> Result<ReconcileReport, AppError> {
        let now = Utc::now();
        let mut report = ReconcileReport::default();
        for coupon in coupons::issuable_around(self.pg(), now).await? {
            report.checked += 1;
            // Read the gate before Postgres: a win that lands in between is then in both, or
            // only in Postgres if it is older than the view, which `grace` covers.
            let Some(view) = self.coupon_gate().view(self.redis(), coupon.id).await? else {
                continue; // Not loaded: the next request rebuilds it.
            };
            let held = coupons::held_seats(self.pg(), coupon.id).await?;
            if gate_disagrees(&view, &held, now, grace) {
                tracing::warn!(coupon = %coupon.id, "coupon gate disagrees with Postgres: rebuilding");
                if self
                    .rebuild_coupon_gate(coupon.id, InstallMode::Replace)
                    .await?
                {
                    report.repaired.push(coupon.id);
                }
            }
        }
        Ok(report)
    }
}

/// Whether a gate and the Postgres record disagree in a way requests in flight cannot explain.
fn gate_disagrees(view: &GateView, held: &[HeldSeat], now: DateTime<Utc>, grace: Duration) -> bool {
    let settled_before = now.timestamp_millis() - grace.as_millis() as i64;
    let mut in_flight = 0;
    for (user, holder) in &view.holders {
        match held.iter().find(|h| h.user_id.get() == *user) {
            Some(h) if h.seat != holder.seat => return true,
            Some(_) => {}
            // Won at the gate, not recorded: in flight, or orphaned by a crash.
            None if holder.won_at_ms < settled_before => return true,
            None => in_flight += 1,
        }
    }
    for h in held {
        if !view.holders.contains_key(&h.user_id.get())
            && h.issued_at.timestamp_millis() < settled_before
        {
            return true;
        }
    }
    view.remaining() != view.total - held.len() as i64 - in_flight
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::store::redis::coupon_gate::GateHolder;

    fn held(user: i64, seat: i64, at: DateTime<Utc>) -> HeldSeat {
        HeldSeat {
            user_id: UserId::parse(user, "user").unwrap(),
            seat,
            issued_at: at,
        }
    }

    fn view(total: i64, next: i64, free: i64, holders: &[(i64, i64, i64)]) -> GateView {
        GateView {
            total,
            next_seat: next,
            free_seats: free,
            holders: holders
                .iter()
                .map(|(u, seat, won)| {
                    (
                        *u,
                        GateHolder {
                            seat: *seat,
                            won_at_ms: *won,
                        },
                    )
                })
                .collect::<HashMap<_, _>>(),
        }
    }

    #[test]
    fn an_agreeing_gate_is_left_alone_even_with_requests_in_flight() {
        let now = DateTime::from_timestamp(10_000, 0).unwrap();
        let grace = Duration::from_secs(5);
        let old = now - chrono::Duration::seconds(60);
        let recent_ms = now.timestamp_millis() - 100;
        let held_rows = [held(1, 1, old), held(2, 2, old)];
        // Users 1 and 2 recorded; user 3 won a moment ago and is being recorded.
        let v = view(10, 4, 0, &[(1, 1, 0), (2, 2, 0), (3, 3, recent_ms)]);
        assert!(!gate_disagrees(&v, &held_rows, now, grace));
    }

    #[test]
    fn orphans_unknown_holders_and_bad_counts_are_disagreements() {
        let now = DateTime::from_timestamp(10_000, 0).unwrap();
        let grace = Duration::from_secs(5);
        let old = now - chrono::Duration::seconds(60);
        let old_ms = old.timestamp_millis();
        // A crash left user 3's win without a coupon row for a minute.
        let orphan = view(10, 4, 0, &[(1, 1, 0), (2, 2, 0), (3, 3, old_ms)]);
        let rows = [held(1, 1, old), held(2, 2, old)];
        assert!(gate_disagrees(&orphan, &rows, now, grace));
        // Postgres has user 2, the gate does not know them.
        let forgot = view(10, 3, 0, &[(1, 1, 0)]);
        assert!(gate_disagrees(&forgot, &rows, now, grace));
        // A seat that was never given back.
        let lost_seat = view(10, 4, 0, &[(1, 1, 0), (2, 2, 0)]);
        assert!(gate_disagrees(&lost_seat, &rows, now, grace));
        // Holder seats that differ.
        let moved = view(10, 3, 0, &[(1, 2, 0), (2, 1, 0)]);
        assert!(gate_disagrees(&moved, &rows, now, grace));
    }
}
