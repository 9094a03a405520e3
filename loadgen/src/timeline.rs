//! The run second by second, for the plots of the HTML report: per RPC and per second of the
//! measured run, the calls that finished in it, their latency distribution and their outcomes.
//!
//! Memory stays bounded by the run's length, not by its concurrency: a worker keeps only the
//! second it is in and merges it into the shared timeline when its calls move on to the next
//! one (one lock per worker per second; a worker's calls finish in order, so each second is
//! handed over once). The latency of a second is kept in logarithmic buckets eight to a doubling,
//! so its percentiles are within ±5% (the run's overall percentiles stay exact, from the
//! per-RPC histograms).

use std::sync::{Arc, Mutex, PoisonError};

use tonic::Code;

use super::stats::{Outcomes, Rpc};

/// Buckets per doubling of the latency.
const PER_DOUBLING: f64 = 8.0;

/// Latency counts in logarithmic buckets of microseconds (bucket `i` holds latencies of about
/// `2^(i / 8)` µs). Grows only as far as the slowest call seen.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogHistogram {
    counts: Vec<u64>,
    total: u64,
}

impl LogHistogram {
    pub fn record(&mut self, latency_us: u64) {
        let i = ((latency_us.max(1) as f64).log2() * PER_DOUBLING).round() as usize;
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
        self.total += 1;
    }

    pub fn merge(&mut self, other: &LogHistogram) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
    }

    pub fn len(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The latency at quantile `q` (0..=1), in milliseconds; `None` when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        let bucket = self.counts.iter().position(|&n| {
            seen += n;
            seen >= rank
        })?;
        Some(2f64.powf(bucket as f64 / PER_DOUBLING) / 1000.0)
    }
}

/// What finished in one second for one RPC.
#[derive(Clone, Debug, Default)]
pub struct Second {
    pub latency: LogHistogram,
    pub outcomes: Outcomes,
}

impl Second {
    fn merge(&mut self, other: &Second) {
        self.latency.merge(&other.latency);
        self.outcomes.merge(&other.outcomes);
    }
}

type Slots = [Option<Second>; Rpc::ALL.len()];

/// Every second of the measured run (second 0 starts when the warm-up ends).
#[derive(Debug, Default)]
pub struct Timeline {
    seconds: Vec<Slots>,
}

impl Timeline {
    fn merge_second(&mut self, second: usize, slots: &mut Slots) {
        if self.seconds.len() <= second {
            self.seconds.resize_with(second + 1, Default::default);
        }
        for (mine, theirs) in self.seconds[second].iter_mut().zip(slots.iter_mut()) {
            if let Some(theirs) = theirs.take() {
                mine.get_or_insert_with(Second::default).merge(&theirs);
            }
        }
    }

    /// Seconds recorded (the last may be partial).
    pub fn len(&self) -> usize {
        self.seconds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seconds.is_empty()
    }

    /// The seconds of one RPC, in order; `None` for a second in which none finished.
    pub fn of(&self, rpc: Rpc) -> impl Iterator<Item = Option<&Second>> {
        self.seconds
            .iter()
            .map(move |slots| slots[rpc.index()].as_ref())
    }
}

/// The timeline the workers of a run write into.
#[derive(Clone, Debug, Default)]
pub struct SharedTimeline(Arc<Mutex<Timeline>>);

impl SharedTimeline {
    /// The timeline, once every writer has flushed.
    pub fn take(&self) -> Timeline {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// One worker's view: the second it is in.
#[derive(Debug)]
pub struct TimelineWriter {
    shared: SharedTimeline,
    second: usize,
    current: Slots,
}

impl TimelineWriter {
    pub fn new(shared: SharedTimeline) -> Self {
        Self {
            shared,
            second: 0,
            current: Default::default(),
        }
    }

    /// A call of `rpc` that finished in `second` of the measured run.
    pub fn add(&mut self, rpc: Rpc, second: usize, latency_us: u64, code: Code, reason: &str) {
        if second != self.second {
            self.flush();
            self.second = second;
        }
        let slot = self.current[rpc.index()].get_or_insert_with(Second::default);
        slot.latency.record(latency_us);
        slot.outcomes.add(code, reason, 1);
    }

    /// Hands the current second over to the shared timeline.
    pub fn flush(&mut self) {
        if self.current.iter().all(Option::is_none) {
            return;
        }
        let mut timeline = self.shared.0.lock().unwrap_or_else(PoisonError::into_inner);
        timeline.merge_second(self.second, &mut self.current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_buckets_keep_quantiles_within_five_percent() {
        let mut h = LogHistogram::default();
        for ms in 1..=100u64 {
            h.record(ms * 1000);
        }
        for (q, exact) in [(0.5, 50.0), (0.99, 99.0), (1.0, 100.0)] {
            let got = h.quantile_ms(q).unwrap();
            assert!((got / exact - 1.0).abs() < 0.05, "q{q}: {got} vs {exact}");
        }
        assert_eq!(LogHistogram::default().quantile_ms(0.5), None);
        let mut other = LogHistogram::default();
        other.record(1);
        other.merge(&h);
        assert_eq!(other.len(), 101);
    }

    #[test]
    fn writers_merge_their_seconds_into_one_timeline() {
        let shared = SharedTimeline::default();
        let mut a = TimelineWriter::new(shared.clone());
        let mut b = TimelineWriter::new(shared.clone());
        a.add(Rpc::IssueCoupon, 0, 1_000, Code::Ok, "");
        b.add(
            Rpc::IssueCoupon,
            0,
            2_000,
            Code::ResourceExhausted,
            "COUPON_SOLD_OUT",
        );
        a.add(Rpc::IssueCoupon, 2, 1_000, Code::Ok, "");
        b.add(Rpc::Pay, 1, 5_000, Code::Ok, "");
        a.flush();
        b.flush();
        let timeline = shared.take();
        assert_eq!(timeline.len(), 3);
        let coupon: Vec<u64> = timeline
            .of(Rpc::IssueCoupon)
            .map(|s| s.map_or(0, |s| s.latency.len()))
            .collect();
        assert_eq!(coupon, [2, 0, 1]);
        let first = timeline.of(Rpc::IssueCoupon).next().flatten().unwrap();
        assert_eq!(
            first
                .outcomes
                .count(Code::ResourceExhausted, "COUPON_SOLD_OUT"),
            1
        );
        assert_eq!(timeline.of(Rpc::Pay).filter(Option::is_some).count(), 1);
    }
}
