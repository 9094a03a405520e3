//! First-come-first-served coupon issuance.
//!
//! Invariant: issued <= total and at most one coupon per user, even if Redis forgets
//! everything. Redis (one Lua script) decides who gets a seat at Redis speed, so losers never
//! touch Postgres; Postgres records each winner before the call succeeds, and its constraints
//! refuse anything the gate got wrong. A failed record gives the seat back.
//!
//! Answers are true when given and stay true on a retry: COUPON_ALREADY_ISSUED only once the
//! user's row exists in Postgres (its id goes with the answer). Once a holder's row is known to
//! be committed (the win's insert returned, a repeat call or the reconciliation job read it, a
//! rebuild loaded it) the gate carries its id, so a settled holder's repeat call is answered by
//! the gate's script alone; only a holder whose row the gate does not know yet is looked up in
//! Postgres. A replica that saw a holder's row committed answers the holder's next calls from
//! its own memory ([`holders`]), without Redis. A holder is answered as a holder before the
//! window and the seats are looked at, by the gate and by that memory alike, so every replica
//! gives a holder the same answer. A win whose row never appeared (an orphan) is released by
//! the user's next call once it is older than the orphan grace, and by the reconciliation job
//! otherwise.
//!
//! Cancel safety: a caller may go away at any await. [`App::issue_coupon`] therefore runs the
//! gate decision, the durable insert and any undo in a spawned task and only awaits its answer,
//! so dropping the call changes nothing about the outcome; the caller just does not hear it.
//! Gate rebuilds run in their own task too, shared by every caller of this process that needs
//! the same gate, and always unlock what they locked.

mod admin;
mod holders;
mod rebuild;
mod reconcile;
mod recorder;
mod stats;

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use sqlx::PgPool;
use tokio::time::Instant;
use tracing::Instrument as _;

pub use self::stats::{CouponGateStats, RepairReason};
use self::{holders::SettledHolders, recorder::CouponRecorder};
use super::{
    group_commit::WriteBatches,
    idempotency::{NextAction, next_action},
    rate_limit::{LimitedCall, UserRateLimit},
    sold_out::{LOCAL_SOLD_OUT, SoldOutCache},
};
use crate::{
    domain::{
        Coupon, CouponId, IdempotencyKey, KeyScope, NewCoupon, PageSize, PageToken, UserCoupon,
        UserCouponId, UserId,
    },
    error::{AppError, Resource},
    metrics,
    store::{
        Dependency, StoreError,
        postgres::{
            self as postgres,
            coupons::{self, IssueRefusal, SeatGrant},
            idempotency::{self, Operation},
        },
        redis::coupon_gate::{CouponGate, Decision, Grant, InstallMode},
    },
    telemetry,
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

/// A coupon and how many were issued and are left (as Postgres records them).
pub struct CouponStock {
    pub coupon: Coupon,
    pub issued: i64,
    pub remaining: i64,
}

impl CouponStock {
    fn counted(coupon: Coupon, issued: i64) -> Self {
        Self {
            // A lowered total never goes below the coupons issued; max() only guards the
            // arithmetic.
            remaining: (coupon.total_quantity - issued).max(0),
            issued,
            coupon,
        }
    }
}

/// The coupon flows: issuing, reading, and keeping the Redis gates true to Postgres.
pub struct Coupons {
    pg: PgPool,
    gate: CouponGate,
    recorder: CouponRecorder,
    /// Coupons this replica found sold out a moment ago.
    sold_out: SoldOutCache<CouponId>,
    /// Holders whose row this replica saw committed.
    holders: SettledHolders,
    rebuilds: rebuild::Rebuilds,
    stats: Arc<CouponGateStats>,
    /// A win with no row for this long is an orphan, not an insert in flight.
    orphan_grace: Duration,
    rate: Arc<UserRateLimit>,
}

/// What a call learns about a seat the gate says the user already holds.
enum Held {
    /// The coupon row exists: the user has it.
    Recorded(UserCouponId),
    /// Won a moment ago by another call of this user, whose insert is still running.
    InFlight,
    /// An orphan, now released: ask the gate again.
    Released,
}

impl Coupons {
    /// `batches`: how winners are gathered into statements ([`WriteBatches`]).
    pub fn new(
        pg: PgPool,
        gate: CouponGate,
        orphan_grace: Duration,
        batches: WriteBatches,
        rate: Arc<UserRateLimit>,
    ) -> Self {
        // A win's insert must start well within the orphan grace, or a retry could release a
        // seat whose row is about to commit.
        let recorder = CouponRecorder::start(pg.clone(), batches, orphan_grace / 2);
        CouponGateStats::register_metrics();
        Self {
            pg,
            gate,
            recorder,
            sold_out: SoldOutCache::default(),
            holders: SettledHolders::default(),
            rebuilds: rebuild::Rebuilds::default(),
            stats: Arc::default(),
            orphan_grace,
            rate,
        }
    }

    /// What this server did to its coupon gates.
    pub fn stats(&self) -> &Arc<CouponGateStats> {
        &self.stats
    }

    /// Creates a coupon (all its seats left) and loads its gate. With a key (admin scope), a
    /// retry returns the coupon the first call created, with its seats as they are now.
    pub async fn create(
        self: &Arc<Self>,
        new: NewCoupon,
        key: Option<&IdempotencyKey>,
    ) -> Result<CouponStock, AppError> {
        let coupon = match key {
            None => coupons::create(&self.pg, new).await?,
            Some(key) => match self.create_keyed(new, key).await? {
                Ok(coupon) => coupon,
                Err(saved) => return self.stock(saved).await,
            },
        };
        // Load the gate now, so the first wave of a stampede does not queue behind one
        // caller's rebuild, after dropping a "no such coupon" cached a moment ago. If Redis is
        // unreachable, the first request after it returns rebuilds the gate instead.
        let loaded = match self.gate.forget(coupon.id).await {
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
        Ok(CouponStock::counted(coupon, 0))
    }

    /// Claims the key and creates the coupon in one transaction: the coupon, or the id of the
    /// one a committed call with the same key created.
    async fn create_keyed(
        &self,
        new: NewCoupon,
        key: &IdempotencyKey,
    ) -> Result<Result<Coupon, CouponId>, AppError> {
        let operation = Operation::CreateCoupon;
        let fingerprint = || {
            format!(
                "{:?}",
                (
                    new.name.as_str(),
                    new.discount,
                    new.min_order_amount.get(),
                    new.total_quantity,
                    new.window.starts_at(),
                    new.window.ends_at(),
                    new.valid_days.get(),
                )
            )
        };
        let mut tx = self.pg.begin().await?;
        if let NextAction::ReturnSaved(id) =
            next_action(&mut tx, KeyScope::Admin, operation, Some(key), fingerprint).await?
        {
            let id = CouponId::parse(id, "coupon_id").map_err(|_| {
                AppError::internal(format!("an admin idempotency key names coupon {id}"))
            })?;
            return Ok(Err(id));
        }
        let coupon = coupons::create(&mut *tx, new).await?;
        idempotency::complete(&mut tx, KeyScope::Admin, operation, key, coupon.id.get()).await?;
        postgres::commit(tx).await?;
        Ok(Ok(coupon))
    }

    pub async fn stock(&self, id: CouponId) -> Result<CouponStock, AppError> {
        let (coupon, issued) =
            coupons::get_with_issued(&self.pg, id)
                .await?
                .ok_or(AppError::NotFound {
                    resource: Resource::Coupon,
                    id: id.get(),
                })?;
        Ok(CouponStock::counted(coupon, issued))
    }

    pub async fn user_coupons(
        &self,
        user_id: UserId,
        page_size: PageSize,
        after: Option<PageToken>,
    ) -> Result<(Vec<UserCoupon>, Option<PageToken>), AppError> {
        Ok(coupons::user_coupons_page(&self.pg, user_id, page_size, after).await?)
    }

    /// Issues one coupon to one user. Cancel-safe: see the module docs.
    pub async fn issue(
        self: &Arc<Self>,
        coupon_id: CouponId,
        user_id: UserId,
    ) -> Result<UserCoupon, AppError> {
        if let Err(refused) = self.rate.admit(user_id, LimitedCall::IssueCoupon).await {
            let refused = Err(refused);
            metrics::coupon_issue(metrics::outcome(&refused));
            return refused;
        }
        // A holder is answered as the gate answers one: before the window and the seats.
        if let Some(user_coupon_id) = self.holders.get(coupon_id, user_id) {
            let held = Err(AppError::CouponAlreadyIssued { user_coupon_id });
            metrics::coupon_issue(metrics::outcome(&held));
            return held;
        }
        if self
            .sold_out
            .first(&[coupon_id], std::time::Instant::now())
            .is_some()
        {
            let refused = Err(AppError::CouponSoldOut);
            metrics::coupon_issue(metrics::outcome(&refused));
            return refused;
        }
        let this = self.clone();
        tokio::spawn(
            async move {
                let result = this.try_issue(coupon_id, user_id).await;
                metrics::coupon_issue(metrics::outcome(&result));
                result
            }
            // The spawned task is not the call's task: the span carries the trace across.
            .instrument(telemetry::step("coupons.issue")),
        )
        .await
        .unwrap_or_else(|e| Err(AppError::internal(format!("coupon issue task failed: {e}"))))
    }

    async fn try_issue(
        self: &Arc<Self>,
        coupon_id: CouponId,
        user_id: UserId,
    ) -> Result<UserCoupon, AppError> {
        let patience = Instant::now() + REBUILD_PATIENCE;
        let mut collisions = 0;
        loop {
            let decision = self.gate.decide(coupon_id, user_id, Utc::now()).await?;
            let grant = match decision {
                Decision::Granted(grant) => grant,
                Decision::NoSuchCoupon => return Err(coupon_not_found(coupon_id)),
                Decision::OutsideWindow => return Err(AppError::CouponNotIssuable),
                Decision::SoldOut => {
                    self.sold_out.remember(coupon_id, LOCAL_SOLD_OUT);
                    return Err(AppError::CouponSoldOut);
                }
                Decision::NotLoaded => {
                    self.await_rebuild(coupon_id, patience).await?;
                    continue;
                }
                Decision::AlreadyHolder(Grant {
                    user_coupon_id: Some(user_coupon_id),
                    ..
                }) => {
                    // A settled holder: the gate knows the row is committed.
                    self.holders.settled(coupon_id, user_id, user_coupon_id);
                    return Err(AppError::CouponAlreadyIssued { user_coupon_id });
                }
                Decision::AlreadyHolder(held) => {
                    match self.already_held(coupon_id, user_id, &held).await? {
                        Held::Recorded(user_coupon_id) => {
                            self.holders.settled(coupon_id, user_id, user_coupon_id);
                            self.record_at_gate(coupon_id, user_id, &held, user_coupon_id)
                                .await;
                            return Err(AppError::CouponAlreadyIssued { user_coupon_id });
                        }
                        Held::InFlight => tokio::time::sleep(IN_FLIGHT_POLL).await,
                        Held::Released => {}
                    }
                    continue;
                }
            };
            let recorded = self
                .recorder
                .record(SeatGrant {
                    coupon_id,
                    user_id,
                    seat: grant.seat,
                })
                .await;
            match recorded {
                Ok(Ok(user_coupon)) => {
                    // The row is committed: the gate learns its id off the answer's path, so
                    // the winner's repeat calls need no Postgres.
                    let id = user_coupon.id;
                    self.holders.settled(coupon_id, user_id, id);
                    let this = self.clone();
                    tokio::spawn(async move {
                        this.record_at_gate(coupon_id, user_id, &grant, id).await;
                    });
                    return Ok(user_coupon);
                }
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
                    let user_coupon_id = coupons::user_coupon_id(&self.pg, coupon_id, user_id)
                        .await?
                        .ok_or_else(|| {
                            AppError::internal("an issued coupon vanished from Postgres")
                        })?;
                    self.holders.settled(coupon_id, user_id, user_coupon_id);
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
                Err(e @ StoreError::OutcomeUnknown(_)) => {
                    // The row may exist: the win stays pending, and the user's next call (or
                    // the reconciliation job) finds the row or releases the orphan.
                    return Err(e.into());
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
        if let Some(id) = coupons::user_coupon_id(&self.pg, coupon, user).await? {
            return Ok(Held::Recorded(id));
        }
        let age_ms = Utc::now().timestamp_millis() - held.won_at_ms;
        // Holders loaded from Postgres (won "at 0") always have their row.
        if held.won_at_ms > 0 && age_ms < self.orphan_grace.as_millis() as i64 {
            return Ok(Held::InFlight);
        }
        if self.gate.release(coupon, user, held, true).await? {
            self.sold_out.forget(&[coupon]);
            self.stats.orphan_released();
            tracing::info!(%coupon, %user, seat = held.seat, "released an orphaned coupon seat");
        }
        Ok(Held::Released)
    }

    /// Tells the gate that `held`'s row `id` is committed. If Redis cannot take it now, the
    /// reconciliation job settles the win later (or the next repeat call reads Postgres again).
    async fn record_at_gate(&self, coupon: CouponId, user: UserId, held: &Grant, id: UserCouponId) {
        if let Err(e) = self.gate.record(coupon, user, held, id).await {
            tracing::debug!(%coupon, %user, error = %e, "could not record a coupon row at the gate");
        }
    }

    /// Undoes a grant that did not become a coupon. If Redis cannot be reached now, the
    /// reconciliation job releases the orphan later; the caller's answer does not wait for it.
    async fn release_grant(&self, coupon: CouponId, user: UserId, grant: &Grant, give_back: bool) {
        if give_back {
            self.sold_out.forget(&[coupon]);
        }
        if let Err(e) = self.gate.release(coupon, user, grant, give_back).await {
            tracing::warn!(%coupon, %user, seat = grant.seat, error = %e,
                "could not release a coupon seat; the reconciliation job will");
        }
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
