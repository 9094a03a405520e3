//! First-come-first-served coupon issuance.
//!
//! Invariant: issued <= total and at most one coupon per user, even if Redis forgets
//! everything. Redis (one Lua script) decides who gets a seat at Redis speed, so losers never
//! touch Postgres; Postgres records each winner before the call succeeds, and its constraints
//! refuse anything the gate got wrong. A failed record gives the seat back.
//!
//! Answers are true when given and stay true on a retry: COUPON_ALREADY_ISSUED only once the
//! user's row exists in Postgres (its id goes with the answer); a win whose row never appeared
//! (an orphan) is released by the user's next call once it is older than the orphan grace, and
//! by the reconciliation job otherwise.
//!
//! Cancel safety: a caller may go away at any await. [`App::issue_coupon`] therefore runs the
//! gate decision, the durable insert and any undo in a spawned task and only awaits its answer,
//! so dropping the call changes nothing about the outcome; the caller just does not hear it.
//! Gate rebuilds run in their own task too, shared by every caller of this process that needs
//! the same gate, and always unlock what they locked.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures::{FutureExt, future::BoxFuture, future::Shared};
use tokio::time::Instant;

use super::{App, sold_out::LOCAL_SOLD_OUT};
use crate::{
    domain::{Coupon, CouponId, PageSize, PageToken, UserCoupon, UserId},
    error::{AppError, Resource},
    metrics,
    store::{
        Dependency, StoreError,
        postgres::coupons::{self, IssueRefusal, NewCoupon, SeatGrant},
        redis::coupon_gate::{Decision, GateSummary, Grant, InstallMode},
    },
};

/// How long a request waits for a rebuild of the gate before giving up.
const REBUILD_PATIENCE: Duration = Duration::from_secs(3);
/// Pause between looks at a gate another replica is rebuilding (a rebuild takes milliseconds).
const REBUILD_POLL: Duration = Duration::from_millis(5);
/// Pause between looks at a win of the same user whose insert is still running.
const IN_FLIGHT_POLL: Duration = Duration::from_millis(10);
/// Seat collisions (the gate granted a seat Postgres already gave away, possible only right
/// after a rebuild raced with inserts in flight) before the gate is rebuilt.
const MAX_SEAT_COLLISIONS: u32 = 5;
/// Pending wins the job checks against Postgres per step.
const PENDING_CHUNK: usize = 1000;

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

/// Why a gate was rebuilt or repaired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepairReason {
    /// The gate was absent when a call or the job needed it.
    Missing,
    /// The gate's counts contradict Postgres.
    Disagrees,
    /// The job released wins that never became coupons.
    Orphan,
}

impl RepairReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RepairReason::Missing => "missing",
            RepairReason::Disagrees => "disagrees",
            RepairReason::Orphan => "orphan",
        }
    }
}

/// What this server did to its coupon gates: repairs by reason, and the reconciliation job's
/// checks. (The Prometheus counters are process-wide; these count this server alone.)
#[derive(Debug, Default)]
pub struct CouponGateStats {
    missing: AtomicU64,
    disagrees: AtomicU64,
    orphan: AtomicU64,
    orphans_released: AtomicU64,
    checks: AtomicU64,
    longest_check_us: AtomicU64,
}

impl CouponGateStats {
    /// Gates the reconciliation job compared with Postgres.
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }

    /// The longest comparison of one gate with Postgres (counts, then pending wins).
    pub fn longest_check(&self) -> Duration {
        Duration::from_micros(self.longest_check_us.load(Ordering::Relaxed))
    }

    fn checked(&self, took: Duration) {
        self.checks.fetch_add(1, Ordering::Relaxed);
        self.longest_check_us
            .fetch_max(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn rebuilds(&self, reason: RepairReason) -> u64 {
        self.slot(reason).load(Ordering::Relaxed)
    }

    /// Orphans released by the callers who met them.
    pub fn orphans_released(&self) -> u64 {
        self.orphans_released.load(Ordering::Relaxed)
    }

    fn slot(&self, reason: RepairReason) -> &AtomicU64 {
        match reason {
            RepairReason::Missing => &self.missing,
            RepairReason::Disagrees => &self.disagrees,
            RepairReason::Orphan => &self.orphan,
        }
    }

    fn rebuilt(&self, reason: RepairReason) {
        self.slot(reason).fetch_add(1, Ordering::Relaxed);
        metrics::coupon_gate_rebuild(reason.as_str());
    }

    fn orphan_released(&self) {
        self.orphans_released.fetch_add(1, Ordering::Relaxed);
        metrics::coupon_orphan_released();
    }
}

/// A rebuild's result, shared by every caller waiting for it.
#[derive(Clone, Debug)]
struct RebuildFailure {
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

type RebuildResult = Result<bool, RebuildFailure>;

/// The rebuilds this process is running, one per coupon.
#[derive(Default)]
pub(super) struct Rebuilds {
    running: Mutex<HashMap<CouponId, Shared<BoxFuture<'static, RebuildResult>>>>,
}

/// What a call learns about a seat the gate says the user already holds.
enum Held {
    /// The coupon row exists: the user has it.
    Recorded(i64),
    /// Won a moment ago by another call of this user, whose insert is still running.
    InFlight,
    /// An orphan, now released: ask the gate again.
    Released,
}

impl App {
    pub async fn create_coupon(&self, new: NewCoupon) -> Result<Coupon, AppError> {
        let coupon = coupons::create(self.pg(), new).await?;
        // Load the gate now, so the first wave of a stampede does not queue behind one
        // caller's rebuild, after dropping a "no such coupon" cached a moment ago. If Redis is
        // unreachable, the first request after it returns rebuilds the gate instead.
        let loaded = match self.coupon_gate().forget(coupon.id).await {
            Ok(()) => self
                .rebuild_gate(coupon.id, InstallMode::Replace, None)
                .await
                .map(drop)
                .map_err(AppError::from),
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

    /// Issues one coupon to one user. Cancel-safe: see the module docs.
    pub async fn issue_coupon(
        &self,
        coupon_id: CouponId,
        user_id: UserId,
    ) -> Result<UserCoupon, AppError> {
        if self
            .coupons_sold_out()
            .first(&[coupon_id], std::time::Instant::now())
            .is_some()
        {
            let refused = Err(AppError::CouponSoldOut);
            metrics::coupon_issue(metrics::outcome(&refused));
            return refused;
        }
        let app = self.clone();
        tokio::spawn(async move {
            let result = app.try_issue_coupon(coupon_id, user_id).await;
            metrics::coupon_issue(metrics::outcome(&result));
            result
        })
        .await
        .unwrap_or_else(|e| Err(AppError::internal(format!("coupon issue task failed: {e}"))))
    }

    async fn try_issue_coupon(
        &self,
        coupon_id: CouponId,
        user_id: UserId,
    ) -> Result<UserCoupon, AppError> {
        let patience = Instant::now() + REBUILD_PATIENCE;
        let mut collisions = 0;
        loop {
            let decision = self
                .coupon_gate()
                .decide(coupon_id, user_id, Utc::now())
                .await?;
            let grant = match decision {
                Decision::Granted(grant) => grant,
                Decision::NoSuchCoupon => return Err(coupon_not_found(coupon_id)),
                Decision::OutsideWindow => return Err(AppError::CouponNotIssuable),
                Decision::SoldOut => {
                    self.coupons_sold_out().remember(coupon_id, LOCAL_SOLD_OUT);
                    return Err(AppError::CouponSoldOut);
                }
                Decision::NotLoaded => {
                    self.await_rebuild(coupon_id, patience).await?;
                    continue;
                }
                Decision::AlreadyHolder(held) => {
                    match self.already_held(coupon_id, user_id, &held).await? {
                        Held::Recorded(user_coupon_id) => {
                            return Err(AppError::CouponAlreadyIssued { user_coupon_id });
                        }
                        Held::InFlight => tokio::time::sleep(IN_FLIGHT_POLL).await,
                        Held::Released => {}
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
                Ok(Err(IssueRefusal::SeatTaken)) => {
                    // The seat is someone else's in Postgres: keep it out of the gate's pool.
                    self.release_grant(coupon_id, user_id, &grant, false).await;
                    collisions += 1;
                    if collisions >= MAX_SEAT_COLLISIONS {
                        tracing::warn!(coupon = %coupon_id, "coupon gate keeps granting taken seats: rebuilding");
                        self.rebuild_gate(
                            coupon_id,
                            InstallMode::Replace,
                            Some(RepairReason::Disagrees),
                        )
                        .await?;
                        collisions = 0;
                    }
                    if Instant::now() >= patience {
                        return Err(gate_unavailable("the coupon gate disagrees with Postgres"));
                    }
                }
                Ok(Err(IssueRefusal::AlreadyIssued)) => {
                    // Postgres has this user's coupon although the gate had lost them: this
                    // grant's seat goes back, and the answer names the coupon they hold.
                    self.release_grant(coupon_id, user_id, &grant, true).await;
                    let user_coupon_id = coupons::user_coupon_id(self.pg(), coupon_id, user_id)
                        .await?
                        .ok_or_else(|| {
                            AppError::internal("an issued coupon vanished from Postgres")
                        })?;
                    return Err(AppError::CouponAlreadyIssued { user_coupon_id });
                }
                Ok(Err(IssueRefusal::NoCoupon)) => {
                    self.release_grant(coupon_id, user_id, &grant, true).await;
                    return Err(coupon_not_found(coupon_id));
                }
                Ok(Err(IssueRefusal::SeatBeyondTotal)) => {
                    self.release_grant(coupon_id, user_id, &grant, false).await;
                    return Err(AppError::CouponSoldOut);
                }
                Err(e) => {
                    // Nothing was recorded: the seat goes back to the pool.
                    self.release_grant(coupon_id, user_id, &grant, true).await;
                    return Err(e.into());
                }
            }
        }
    }

    /// Decides what a seat the gate says `user` holds means: their coupon, a win of theirs
    /// still being recorded, or an orphan (released here, once older than the grace).
    async fn already_held(
        &self,
        coupon: CouponId,
        user: UserId,
        held: &Grant,
    ) -> Result<Held, AppError> {
        if let Some(id) = coupons::user_coupon_id(self.pg(), coupon, user).await? {
            return Ok(Held::Recorded(id));
        }
        let age_ms = Utc::now().timestamp_millis() - held.won_at_ms;
        // Holders loaded from Postgres (won "at 0") always have their row.
        if held.won_at_ms > 0 && age_ms < self.settings().coupon_orphan_grace.as_millis() as i64 {
            return Ok(Held::InFlight);
        }
        if self.coupon_gate().release(coupon, user, held, true).await? {
            self.coupons_sold_out().forget(&[coupon]);
            self.coupon_gate_stats().orphan_released();
            tracing::info!(%coupon, %user, seat = held.seat, "released an orphaned coupon seat");
        }
        Ok(Held::Released)
    }

    /// Undoes a grant that did not become a coupon. If Redis cannot be reached now, the
    /// reconciliation job releases the orphan later; the caller's answer does not wait for it.
    async fn release_grant(&self, coupon: CouponId, user: UserId, grant: &Grant, give_back: bool) {
        if give_back {
            self.coupons_sold_out().forget(&[coupon]);
        }
        if let Err(e) = self
            .coupon_gate()
            .release(coupon, user, grant, give_back)
            .await
        {
            tracing::warn!(%coupon, %user, seat = grant.seat, error = %e,
                "could not release a coupon seat; the reconciliation job will");
        }
    }

    /// Waits (until `patience`) for the missing gate of `coupon` to be rebuilt, by this process
    /// or another replica.
    async fn await_rebuild(&self, coupon: CouponId, patience: Instant) -> Result<(), AppError> {
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
    fn rebuild_gate(
        &self,
        coupon: CouponId,
        mode: InstallMode,
        reason: Option<RepairReason>,
    ) -> Shared<BoxFuture<'static, RebuildResult>> {
        let rebuilds = &self.inner_rebuilds().running;
        let mut running = rebuilds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rebuild) = running.get(&coupon) {
            return rebuild.clone();
        }
        let app = self.clone();
        let task = tokio::spawn(async move {
            let result = app.rebuild_now(coupon, mode, reason).await;
            app.inner_rebuilds()
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
        let gate = self.coupon_gate();
        let Some(token) = gate.try_lock(coupon_id).await? else {
            return Ok(false);
        };
        let rebuilt = async {
            let Some(coupon) = coupons::get(self.pg(), coupon_id).await? else {
                gate.mark_missing(coupon_id).await?;
                return Ok(false);
            };
            let held = coupons::held_seats(self.pg(), coupon_id).await?;
            let installed = gate
                .install(&token, &coupon, &held, mode, Utc::now())
                .await?;
            if installed {
                self.coupons_sold_out().forget(&[coupon_id]);
                if let Some(reason) = reason {
                    self.coupon_gate_stats().rebuilt(reason);
                    tracing::info!(coupon = %coupon_id, issued = held.len(), reason = reason.as_str(),
                        "coupon gate rebuilt from Postgres");
                }
            }
            Ok::<_, AppError>(installed)
        }
        .await;
        if let Err(e) = gate.unlock(coupon_id, token).await {
            tracing::debug!(coupon = %coupon_id, error = %e, "unlock failed; the lock will expire");
        }
        rebuilt
    }

    /// Compares each live coupon's gate with Postgres, in constant time per coupon plus the
    /// wins still pending: rebuilds a missing gate or one whose counts contradict Postgres,
    /// and releases wins that never became coupons within `grace`. A gate that agrees with
    /// Postgres is never rebuilt, whatever is in flight.
    pub async fn reconcile_coupon_gates(
        &self,
        grace: Duration,
    ) -> Result<ReconcileReport, AppError> {
        let now = Utc::now();
        let mut report = ReconcileReport::default();
        for coupon in coupons::issuable_around(self.pg(), now).await? {
            report.checked += 1;
            let started = Instant::now();
            // Postgres first: every row counted here was won at the gate before the gate is
            // read below, so its holder is in the summary; rows committed after the count are
            // pending there.
            let recorded = coupons::count_issued(self.pg(), coupon.id).await?;
            let Some(summary) = self.coupon_gate().summary(coupon.id).await? else {
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
            let won_by = now - chrono::Duration::from_std(grace).unwrap_or_default();
            let released = self
                .settle_pending_wins(coupon.id, won_by, summary.pending)
                .await?;
            self.coupon_gate_stats().checked(started.elapsed());
            if released > 0 {
                self.coupon_gate_stats().rebuilt(RepairReason::Orphan);
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
        let gate = self.coupon_gate();
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
            let recorded: HashSet<i64> = coupons::holders_among(self.pg(), coupon, &users)
                .await?
                .into_iter()
                .collect();
            gate.settle(coupon, &chunk, |user| recorded.contains(&user))
                .await?;
            for win in chunk.wins.iter().filter(|w| !recorded.contains(&w.user)) {
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
            self.coupons_sold_out().forget(&[coupon]);
        }
        Ok(released)
    }
}

fn coupon_not_found(id: CouponId) -> AppError {
    AppError::NotFound {
        resource: Resource::Coupon,
        id: id.get(),
    }
}

fn gate_unavailable(why: &'static str) -> AppError {
    AppError::from(StoreError::Unavailable {
        dependency: Dependency::Redis,
        source: why.into(),
    })
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
}
