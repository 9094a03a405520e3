//! Per-RPC measurements: a latency histogram (microsecond resolution) and a count per outcome
//! (gRPC code plus ErrorInfo reason).
//!
//! Every worker owns one [`Recorder`]; recorders are merged once the run is over, so a call costs
//! no lock and no shared write. A recorder keeps two views: what was measured (calls started
//! after the warm-up) for the report, and every call made, which the invariant checks need
//! because a coupon issued during the warm-up is still issued.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::timeline::{SharedTimeline, TimelineWriter};

/// Slower calls count as this many microseconds, so one stuck call cannot grow a histogram
/// without bound.
const HIGHEST_US: u64 = 300_000_000;
/// Three significant digits: under 0.1% error at every latency.
const SIGNIFICANT_DIGITS: u8 = 3;

/// What a call is recorded as. One RPC may appear under two names when the scenario calls it
/// with a different purpose (a deliberate repeat), so the two are not mixed in one histogram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rpc {
    IssueCoupon,
    /// IssueCoupon by a user who already holds the coupon: the answer must be ALREADY_EXISTS.
    IssueCouponHeld,
    PlaceOrder,
    Pay,
    /// Pay again for an order just paid: the answer must be ALREADY_EXISTS.
    PayAgain,
    GetPopularProducts,
    ChargeBalance,
    /// ChargeBalance repeating an earlier call's idempotency key: it must credit nothing.
    ChargeBalanceReplay,
    SetItem,
    Checkout,
    /// Checkout again with the key of a checkout just answered: it must return the same order.
    CheckoutAgain,
    /// `grpc.health.v1.Health/Check`.
    HealthCheck,
    ListOrders,
    CancelOrder,
    RefundOrder,
    /// RefundOrder again with the key of a refund just answered: it must return that refund.
    RefundOrderAgain,
}

impl Rpc {
    pub const ALL: [Rpc; 16] = [
        Rpc::IssueCoupon,
        Rpc::IssueCouponHeld,
        Rpc::PlaceOrder,
        Rpc::Pay,
        Rpc::PayAgain,
        Rpc::GetPopularProducts,
        Rpc::ChargeBalance,
        Rpc::ChargeBalanceReplay,
        Rpc::SetItem,
        Rpc::Checkout,
        Rpc::CheckoutAgain,
        Rpc::HealthCheck,
        Rpc::ListOrders,
        Rpc::CancelOrder,
        Rpc::RefundOrder,
        Rpc::RefundOrderAgain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rpc::IssueCoupon => "IssueCoupon",
            Rpc::IssueCouponHeld => "IssueCoupon (holder)",
            Rpc::PlaceOrder => "PlaceOrder",
            Rpc::Pay => "Pay",
            Rpc::PayAgain => "Pay (repeat)",
            Rpc::GetPopularProducts => "GetPopularProducts",
            Rpc::ChargeBalance => "ChargeBalance",
            Rpc::ChargeBalanceReplay => "ChargeBalance (same key)",
            Rpc::SetItem => "SetItem",
            Rpc::Checkout => "Checkout",
            Rpc::CheckoutAgain => "Checkout (same key)",
            Rpc::HealthCheck => "Health/Check",
            Rpc::ListOrders => "ListOrders",
            Rpc::CancelOrder => "CancelOrder",
            Rpc::RefundOrder => "RefundOrder",
            Rpc::RefundOrderAgain => "RefundOrder (same key)",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// How far a call's answer can be trusted about what happened on the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Ok,
    /// The server answered and refused: nothing changed.
    Refused,
    /// The call may or may not have taken effect (the connection failed, the deadline passed,
    /// the server failed). Invariant checks widen their bounds by these calls.
    Indeterminate,
}

impl Class {
    pub fn of(code: Code) -> Class {
        match code {
            Code::Ok => Class::Ok,
            Code::Cancelled
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss => Class::Indeterminate,
            _ => Class::Refused,
        }
    }
}

pub use ecommerce::code_name;

/// A gRPC code and the ErrorInfo reason that came with it (empty when none did).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Outcome {
    code: i32,
    pub reason: String,
}

impl Outcome {
    pub fn new(code: Code, reason: impl Into<String>) -> Self {
        Self {
            code: code as i32,
            reason: reason.into(),
        }
    }

    pub fn code(&self) -> Code {
        Code::from_i32(self.code)
    }

    pub fn class(&self) -> Class {
        Class::of(self.code())
    }

    /// `OK`, `UNAVAILABLE` or `RESOURCE_EXHAUSTED/COUPON_SOLD_OUT`.
    pub fn label(&self) -> String {
        if self.reason.is_empty() {
            code_name(self.code()).to_string()
        } else {
            format!("{}/{}", code_name(self.code()), self.reason)
        }
    }
}

/// A count per outcome. Few distinct outcomes occur per RPC, so a short vector searched in
/// order beats a hash map and allocates only when an outcome is first seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcomes(Vec<(Outcome, u64)>);

impl Outcomes {
    pub fn add(&mut self, code: Code, reason: &str, n: u64) {
        let code_value = code as i32;
        match self
            .0
            .iter_mut()
            .find(|(o, _)| o.code == code_value && o.reason == reason)
        {
            Some((_, count)) => *count += n,
            None => self.0.push((Outcome::new(code, reason), n)),
        }
    }

    pub fn merge(&mut self, other: &Outcomes) {
        for (outcome, n) in &other.0 {
            self.add(outcome.code(), &outcome.reason, *n);
        }
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }

    pub fn of_class(&self, class: Class) -> u64 {
        self.0
            .iter()
            .filter(|(o, _)| o.class() == class)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn ok(&self) -> u64 {
        self.of_class(Class::Ok)
    }

    /// Calls with this code and reason.
    pub fn count(&self, code: Code, reason: &str) -> u64 {
        self.0
            .iter()
            .filter(|(o, _)| o.code() == code && o.reason == reason)
            .map(|(_, n)| n)
            .sum()
    }

    /// The outcomes, most frequent first (ties by label, so the order is stable).
    pub fn sorted(&self) -> Vec<(Outcome, u64)> {
        let mut v = self.0.clone();
        v.sort_by(|(a, x), (b, y)| y.cmp(x).then_with(|| a.label().cmp(&b.label())));
        v
    }
}

/// The code and reason of a call's result. Decoding the details costs a little, so it is done
/// only for errors.
fn outcome_of<T>(result: &Result<T, Status>) -> (Code, Option<String>) {
    match result {
        Ok(_) => (Code::Ok, None),
        Err(status) => (
            status.code(),
            status.get_details_error_info().map(|info| info.reason),
        ),
    }
}

/// Latencies and outcomes of the measured calls of one RPC, kept per outcome: a coupon's
/// winners wait for a Postgres commit, its refusals do not, and one histogram of both hides
/// which of them makes the tail. The RPC's counts and percentiles are derived from these when
/// the report is made, so a call records one value.
#[derive(Clone, Debug)]
pub struct RpcStats {
    by_outcome: Vec<(Outcome, Histogram<u64>)>,
}

/// An empty histogram. Auto-resizing: it grows only as far as the latencies it sees (tens of
/// KB for calls of milliseconds instead of ~160 KB for the whole range), which matters with
/// one histogram per worker, RPC and outcome. The significant digits are valid, so a failure here
/// is a programming error.
fn histogram() -> Histogram<u64> {
    Histogram::new(SIGNIFICANT_DIGITS).expect("valid significant digits")
}

fn record(h: &mut Histogram<u64>, us: u64) {
    // `record` grows the histogram; `saturating_record` would clamp to its current size.
    if h.record(us).is_err() {
        h.saturating_record(us);
    }
}

fn add_histogram(into: &mut Histogram<u64>, other: &Histogram<u64>) {
    // The target resizes itself, so adding cannot fail; saturate if it ever did.
    if into.add(other).is_err() {
        for v in other.iter_recorded() {
            into.saturating_record_n(v.value_iterated_to(), v.count_at_value());
        }
    }
}

fn percentiles(h: &Histogram<u64>) -> Latency {
    let ms = |us: u64| us as f64 / 1000.0;
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
    }
}

impl RpcStats {
    pub fn new() -> Self {
        Self {
            by_outcome: Vec::new(),
        }
    }

    /// The histogram of one outcome's calls (few outcomes occur: searched in order, as
    /// [`Outcomes`] is).
    fn of_outcome(&mut self, code: Code, reason: &str) -> &mut Histogram<u64> {
        let code_value = code as i32;
        let at = match self
            .by_outcome
            .iter()
            .position(|(o, _)| o.code == code_value && o.reason == reason)
        {
            Some(at) => at,
            None => {
                self.by_outcome
                    .push((Outcome::new(code, reason), histogram()));
                self.by_outcome.len() - 1
            }
        };
        &mut self.by_outcome[at].1
    }

    /// Records one call; returns its latency in microseconds as recorded.
    pub fn add(&mut self, latency: Duration, code: Code, reason: &str) -> u64 {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, HIGHEST_US);
        record(self.of_outcome(code, reason), us);
        us
    }

    pub fn merge(&mut self, other: &RpcStats) {
        for (outcome, h) in &other.by_outcome {
            add_histogram(self.of_outcome(outcome.code(), &outcome.reason), h);
        }
    }

    /// The latency percentiles of the calls that ended in `outcome`.
    pub fn outcome_latency(&self, outcome: &Outcome) -> Latency {
        self.by_outcome
            .iter()
            .find(|(o, _)| o == outcome)
            .map(|(_, h)| percentiles(h))
            .unwrap_or_default()
    }

    pub fn calls(&self) -> u64 {
        self.by_outcome.iter().map(|(_, h)| h.len()).sum()
    }

    pub fn outcomes(&self) -> Outcomes {
        let mut outcomes = Outcomes::default();
        for (outcome, h) in &self.by_outcome {
            outcomes.add(outcome.code(), &outcome.reason, h.len());
        }
        outcomes
    }

    /// The percentiles of every call, whatever its outcome.
    pub fn latency(&self) -> Latency {
        let mut all = histogram();
        for (_, h) in &self.by_outcome {
            add_histogram(&mut all, h);
        }
        percentiles(&all)
    }
}

impl Default for RpcStats {
    fn default() -> Self {
        Self::new()
    }
}

/// Latency percentiles in milliseconds (from microsecond measurements).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One worker's measurements.
#[derive(Debug)]
pub struct Recorder {
    measure_from: Instant,
    measured: [Option<RpcStats>; Rpc::ALL.len()],
    all: [Outcomes; Rpc::ALL.len()],
    /// Where measured calls go second by second, for the report's plots.
    timeline: Option<TimelineWriter>,
}

impl Recorder {
    /// Calls started before `measure_from` are counted for the invariants but not measured.
    pub fn new(measure_from: Instant) -> Self {
        Self {
            measure_from,
            measured: Default::default(),
            all: Default::default(),
            timeline: None,
        }
    }

    /// Also writes the measured calls, second by second, into `timeline`.
    pub fn with_timeline(measure_from: Instant, timeline: SharedTimeline) -> Self {
        Self {
            timeline: Some(TimelineWriter::new(timeline)),
            ..Self::new(measure_from)
        }
    }

    /// Hands the last second over to the shared timeline; call when the worker is done.
    pub fn flush_timeline(&mut self) {
        if let Some(timeline) = &mut self.timeline {
            timeline.flush();
        }
    }

    /// Records a call that started at `started` and just finished with `result`.
    pub fn record<T>(&mut self, rpc: Rpc, started: Instant, result: &Result<T, Status>) -> Class {
        let latency = started.elapsed();
        let (code, reason) = outcome_of(result);
        self.record_outcome(rpc, started, latency, code, reason.as_deref().unwrap_or(""));
        Class::of(code)
    }

    pub fn record_outcome(
        &mut self,
        rpc: Rpc,
        started: Instant,
        latency: Duration,
        code: Code,
        reason: &str,
    ) {
        self.all[rpc.index()].add(code, reason, 1);
        if started >= self.measure_from {
            let stats = self.measured[rpc.index()].get_or_insert_with(RpcStats::new);
            let us = stats.add(latency, code, reason);
            if let Some(timeline) = &mut self.timeline {
                let second = (started + latency).saturating_duration_since(self.measure_from);
                timeline.add(rpc, second.as_secs() as usize, us, code, reason);
            }
        }
    }

    pub fn merge(&mut self, other: &Recorder) {
        for rpc in Rpc::ALL {
            let i = rpc.index();
            self.all[i].merge(&other.all[i]);
            if let Some(theirs) = &other.measured[i] {
                match &mut self.measured[i] {
                    Some(ours) => ours.merge(theirs),
                    None => self.measured[i] = Some(theirs.clone()),
                }
            }
        }
    }

    /// Every call of this RPC, warm-up included.
    pub fn all(&self, rpc: Rpc) -> &Outcomes {
        &self.all[rpc.index()]
    }

    pub fn measured(&self, rpc: Rpc) -> Option<&RpcStats> {
        self.measured[rpc.index()].as_ref()
    }

    /// Calls made but not measured (started during the warm-up).
    pub fn warmup_calls(&self) -> u64 {
        Rpc::ALL
            .iter()
            .map(|&rpc| self.all(rpc).total() - self.measured(rpc).map_or(0, RpcStats::calls))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_come_from_microsecond_latencies() {
        let mut stats = RpcStats::new();
        for i in 1..=100 {
            stats.add(ms(i), Code::Ok, "");
        }
        let l = stats.latency();
        // Three significant digits: within 0.1% of the exact value.
        assert!((l.p50_ms - 50.0).abs() <= 0.05, "{l:?}");
        assert!((l.p90_ms - 90.0).abs() <= 0.09, "{l:?}");
        assert!((l.p99_ms - 99.0).abs() <= 0.1, "{l:?}");
        assert!((l.max_ms - 100.0).abs() <= 0.1, "{l:?}");
        assert_eq!(stats.calls(), 100);

        let mut fast = RpcStats::new();
        fast.add(Duration::from_micros(250), Code::Ok, "");
        assert!((fast.latency().p50_ms - 0.25).abs() < 0.001);
        assert_eq!(RpcStats::new().latency(), Latency::default());
    }

    #[test]
    fn merging_adds_histograms_and_outcome_counts() {
        let mut a = RpcStats::new();
        let mut b = RpcStats::new();
        for _ in 0..90 {
            a.add(ms(1), Code::Ok, "");
        }
        for _ in 0..10 {
            b.add(ms(500), Code::ResourceExhausted, "COUPON_SOLD_OUT");
        }
        b.add(ms(2), Code::Ok, "");
        a.merge(&b);
        assert_eq!(a.calls(), 101);
        assert_eq!(a.outcomes().ok(), 91);
        assert_eq!(
            a.outcomes()
                .count(Code::ResourceExhausted, "COUPON_SOLD_OUT"),
            10
        );
        assert_eq!(a.outcomes().total(), a.calls());
        let l = a.latency();
        assert!(l.p50_ms < 2.1, "{l:?}");
        assert!((l.p99_ms - 500.0).abs() < 0.5, "{l:?}");

        // Each outcome keeps its own latencies through the merge.
        let sold_out = a.outcome_latency(&Outcome::new(Code::ResourceExhausted, "COUPON_SOLD_OUT"));
        assert!((sold_out.p50_ms - 500.0).abs() < 0.5, "{sold_out:?}");
        let ok = a.outcome_latency(&Outcome::new(Code::Ok, ""));
        assert!(ok.p99_ms < 2.1 && ok.max_ms > 1.9, "{ok:?}");
        assert_eq!(
            a.outcome_latency(&Outcome::new(Code::Unavailable, "")),
            Latency::default()
        );
    }

    #[test]
    fn latencies_beyond_the_range_saturate_instead_of_failing() {
        let mut stats = RpcStats::new();
        stats.add(Duration::from_secs(3600), Code::DeadlineExceeded, "");
        stats.add(Duration::ZERO, Code::Ok, "");
        assert_eq!(stats.calls(), 2);
        assert!(stats.latency().max_ms >= 299_000.0);
    }

    #[test]
    fn outcomes_are_labelled_by_code_and_reason_and_sorted_by_count() {
        let mut o = Outcomes::default();
        o.add(Code::Ok, "", 3);
        o.add(Code::ResourceExhausted, "COUPON_SOLD_OUT", 5);
        o.add(Code::Unavailable, "", 1);
        o.add(Code::ResourceExhausted, "COUPON_SOLD_OUT", 2);
        let labels: Vec<(String, u64)> = o.sorted().iter().map(|(x, n)| (x.label(), *n)).collect();
        assert_eq!(
            labels,
            vec![
                ("RESOURCE_EXHAUSTED/COUPON_SOLD_OUT".to_string(), 7),
                ("OK".to_string(), 3),
                ("UNAVAILABLE".to_string(), 1),
            ]
        );
        assert_eq!(o.of_class(Class::Refused), 7);
        assert_eq!(o.of_class(Class::Indeterminate), 1);
        assert_eq!(o.total(), 11);
    }

    #[test]
    fn transport_failures_are_indeterminate_and_answers_are_not() {
        assert_eq!(Class::of(Code::Unavailable), Class::Indeterminate);
        assert_eq!(Class::of(Code::DeadlineExceeded), Class::Indeterminate);
        assert_eq!(Class::of(Code::Internal), Class::Indeterminate);
        assert_eq!(Class::of(Code::ResourceExhausted), Class::Refused);
        assert_eq!(Class::of(Code::Unimplemented), Class::Refused);
        assert_eq!(Class::of(Code::Ok), Class::Ok);
    }

    #[test]
    fn warmup_calls_count_for_invariants_but_are_not_measured() {
        let start = Instant::now();
        let mut rec = Recorder::new(start + Duration::from_secs(1));
        rec.record_outcome(Rpc::IssueCoupon, start, ms(1), Code::Ok, "");
        rec.record_outcome(
            Rpc::IssueCoupon,
            start + Duration::from_secs(2),
            ms(1),
            Code::Ok,
            "",
        );
        assert_eq!(rec.all(Rpc::IssueCoupon).ok(), 2);
        assert_eq!(rec.measured(Rpc::IssueCoupon).map(RpcStats::calls), Some(1));
        assert_eq!(rec.warmup_calls(), 1);
        assert!(rec.measured(Rpc::Pay).is_none());

        let mut other = Recorder::new(start);
        other.record_outcome(
            Rpc::Pay,
            start,
            ms(3),
            Code::AlreadyExists,
            "ORDER_ALREADY_PAID",
        );
        rec.merge(&other);
        assert_eq!(rec.measured(Rpc::Pay).map(RpcStats::calls), Some(1));
        assert_eq!(rec.all(Rpc::IssueCoupon).total(), 2);
    }

    #[test]
    fn recording_a_status_reads_its_error_info_reason() {
        use tonic_types::{ErrorDetails, StatusExt};
        let mut rec = Recorder::new(Instant::now());
        let status = Status::with_error_details(
            Code::ResourceExhausted,
            "sold out",
            ErrorDetails::with_error_info(
                "COUPON_SOLD_OUT",
                "ecommerce",
                std::collections::HashMap::new(),
            ),
        );
        let class = rec.record::<()>(Rpc::IssueCoupon, Instant::now(), &Err(status));
        assert_eq!(class, Class::Refused);
        let plain = rec.record::<()>(
            Rpc::IssueCoupon,
            Instant::now(),
            &Err(Status::unavailable("down")),
        );
        assert_eq!(plain, Class::Indeterminate);
        let all = rec.all(Rpc::IssueCoupon);
        assert_eq!(all.count(Code::ResourceExhausted, "COUPON_SOLD_OUT"), 1);
        assert_eq!(all.count(Code::Unavailable, ""), 1);
    }
}
