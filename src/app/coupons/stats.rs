//! What this server did to its coupon gates, for operators (Prometheus) and for tests (this
//! server's own counts, where the Prometheus counters add up the whole process).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::metrics;

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
    const ALL: [RepairReason; 3] = [
        RepairReason::Missing,
        RepairReason::Disagrees,
        RepairReason::Orphan,
    ];

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

    pub(super) fn checked(&self, took: Duration) {
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

    /// Exports the repair counters before the first repair, so a dashboard shows 0, not nothing.
    pub(super) fn register_metrics() {
        metrics::coupon_repairs_registered(RepairReason::ALL.map(RepairReason::as_str));
    }

    pub(super) fn rebuilt(&self, reason: RepairReason) {
        self.slot(reason).fetch_add(1, Ordering::Relaxed);
        metrics::coupon_gate_rebuild(reason.as_str());
    }

    pub(super) fn orphan_released(&self) {
        self.orphans_released.fetch_add(1, Ordering::Relaxed);
        metrics::coupon_orphan_released();
    }
}
