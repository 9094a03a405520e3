//! The result of a run: per-RPC throughput, latency percentiles and outcome counts, then the
//! invariants. Rendered as a table for people or serialized as one JSON object for machines;
//! both carry the same data.

use std::{collections::BTreeMap, fmt::Write};

use serde::Serialize;

use super::{
    judge::Check,
    stats::{Latency, Recorder, Rpc},
    timeline::Timeline,
};

#[derive(Clone, Debug, Serialize)]
pub struct OutcomeCount {
    /// `CODE` or `CODE/REASON`.
    pub outcome: String,
    pub code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub count: u64,
    /// The latency of these calls alone.
    pub latency: Latency,
}

#[derive(Clone, Debug, Serialize)]
pub struct RpcReport {
    pub rpc: String,
    /// Measured calls (the warm-up's are left out).
    pub calls: u64,
    pub calls_per_sec: f64,
    pub latency: Latency,
    /// Adds up to `calls`.
    pub outcomes: Vec<OutcomeCount>,
    /// The measured run second by second (by the second each call finished in).
    pub per_second: Vec<SecondReport>,
}

/// One second of one RPC. Percentiles come from logarithmic buckets (within ±5%).
#[derive(Clone, Debug, Serialize)]
pub struct SecondReport {
    /// Seconds since the end of the warm-up.
    pub second: u64,
    /// How much of this second the run lasted: 1, except for a last, partial second.
    pub span_secs: f64,
    pub calls: u64,
    pub calls_per_sec: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Calls by `CODE` or `CODE/REASON`.
    pub outcomes: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    pub seed: u64,
    pub concurrency: usize,
    pub connections: usize,
    pub warmup_secs: f64,
    pub measured_secs: f64,
    /// The measured span on the wall clock (seconds since the Unix epoch), so that a tool
    /// sampling the CPU time of the server and its stores (scripts/bench) can charge the
    /// measured calls with exactly the work done meanwhile, not the set-up's or the checks'.
    pub measured_from_unix_secs: f64,
    pub measured_until_unix_secs: f64,
    /// Calls made during the warm-up: they count for the invariants, not for the figures.
    pub warmup_calls: u64,
    pub units_of_work: u64,
    /// Ids and sizes of what the run created or used.
    pub fixtures: BTreeMap<String, i64>,
    pub rpcs: Vec<RpcReport>,
    pub invariants: Vec<Check>,
    pub passed: bool,
}

/// The seconds of one RPC, gaps included (a second in which no call finished has 0 calls).
fn per_second(timeline: &Timeline, rpc: Rpc, measured_secs: f64) -> Vec<SecondReport> {
    timeline
        .of(rpc)
        .enumerate()
        .map(|(second, seen)| {
            let span_secs = (measured_secs - second as f64).clamp(0.0, 1.0);
            let calls = seen.map_or(0, |s| s.latency.len());
            SecondReport {
                second: second as u64,
                span_secs,
                calls,
                calls_per_sec: if span_secs > 0.0 {
                    calls as f64 / span_secs
                } else {
                    0.0
                },
                p50_ms: seen.and_then(|s| s.latency.quantile_ms(0.50)),
                p99_ms: seen.and_then(|s| s.latency.quantile_ms(0.99)),
                outcomes: seen
                    .map(|s| {
                        s.outcomes
                            .sorted()
                            .into_iter()
                            .map(|(outcome, n)| (outcome.label(), n))
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// The per-RPC part of a report, for the RPCs with measured calls.
pub fn rpc_reports(recorder: &Recorder, timeline: &Timeline, measured_secs: f64) -> Vec<RpcReport> {
    Rpc::ALL
        .iter()
        .filter_map(|&rpc| {
            let stats = recorder.measured(rpc)?;
            let calls = stats.calls();
            Some(RpcReport {
                rpc: rpc.name().to_string(),
                calls,
                calls_per_sec: if measured_secs > 0.0 {
                    calls as f64 / measured_secs
                } else {
                    0.0
                },
                latency: stats.latency(),
                outcomes: stats
                    .outcomes()
                    .sorted()
                    .into_iter()
                    .map(|(outcome, count)| OutcomeCount {
                        outcome: outcome.label(),
                        code: super::stats::code_name(outcome.code()).to_string(),
                        reason: (!outcome.reason.is_empty()).then(|| outcome.reason.clone()),
                        count,
                        latency: stats.outcome_latency(&outcome),
                    })
                    .collect(),
                per_second: per_second(timeline, rpc, measured_secs),
            })
        })
        .collect()
}

impl Report {
    pub fn rpc(&self, name: &str) -> Option<&RpcReport> {
        self.rpcs.iter().find(|r| r.rpc == name)
    }

    pub fn violations(&self) -> impl Iterator<Item = &Check> {
        self.invariants.iter().filter(|c| !c.passed)
    }

    /// The human-readable form.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_table(&mut out);
        out
    }

    fn write_table(&self, out: &mut String) -> std::fmt::Result {
        writeln!(
            out,
            "{} against {} (seed {}, {} workers over {} connections)",
            self.scenario, self.target, self.seed, self.concurrency, self.connections
        )?;
        let fixtures: Vec<String> = self
            .fixtures
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        writeln!(out, "fixtures: {}", fixtures.join(" "))?;
        writeln!(
            out,
            "measured {:.2} s after a {:.2} s warm-up ({} calls not measured); {} units of work",
            self.measured_secs, self.warmup_secs, self.warmup_calls, self.units_of_work
        )?;
        writeln!(out)?;

        let headers = ["calls", "calls/s", "p50 ms", "p90 ms", "p99 ms", "max ms"];
        let name_width = self
            .rpcs
            .iter()
            .flat_map(|r| {
                std::iter::once(r.rpc.len()).chain(r.outcomes.iter().map(|o| o.outcome.len() + 2))
            })
            .chain(std::iter::once("RPC".len()))
            .max()
            .unwrap_or(3);
        write!(out, "{:<name_width$}", "RPC")?;
        for h in headers {
            write!(out, " {h:>10}")?;
        }
        writeln!(out)?;
        for r in &self.rpcs {
            let l = &r.latency;
            writeln!(
                out,
                "{:<name_width$} {:>10} {:>10.1} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                r.rpc, r.calls, r.calls_per_sec, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
            )?;
            for o in &r.outcomes {
                let share = if r.calls > 0 {
                    100.0 * o.count as f64 / r.calls as f64
                } else {
                    0.0
                };
                let l = &o.latency;
                writeln!(
                    out,
                    "  {:<width$} {:>10} {:>9.1}% {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                    o.outcome,
                    o.count,
                    share,
                    l.p50_ms,
                    l.p90_ms,
                    l.p99_ms,
                    l.max_ms,
                    width = name_width - 2
                )?;
            }
        }
        if self.rpcs.is_empty() {
            writeln!(out, "(no measured calls)")?;
        }
        writeln!(out)?;
        writeln!(out, "Invariants")?;
        for c in &self.invariants {
            let mark = if c.passed { "ok  " } else { "FAIL" };
            writeln!(out, "  {mark} {}: {}", c.name, c.detail)?;
        }
        let violated = self.violations().count();
        if violated == 0 {
            writeln!(out, "All {} invariants hold.", self.invariants.len())?;
        } else {
            writeln!(
                out,
                "{violated} of {} invariants violated.",
                self.invariants.len()
            )?;
        }
        Ok(())
    }
}

/// A coupon-stampede report around these figures, for the tests of what renders reports.
#[cfg(test)]
impl Report {
    pub(crate) fn example(rpcs: Vec<RpcReport>, invariants: Vec<Check>) -> Report {
        Report {
            scenario: "coupon-stampede".into(),
            target: "http://127.0.0.1:1".into(),
            seed: 7,
            concurrency: 4,
            connections: 1,
            warmup_secs: 0.0,
            measured_secs: 2.0,
            measured_from_unix_secs: 1_700_000_000.0,
            measured_until_unix_secs: 1_700_000_002.0,
            warmup_calls: 0,
            units_of_work: rpcs.iter().map(|r| r.calls).sum(),
            fixtures: BTreeMap::from([("coupon_id".to_string(), 3)]),
            passed: invariants.iter().all(|c| c.passed),
            rpcs,
            invariants,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tonic::Code;

    use super::*;

    #[test]
    fn reports_list_measured_rpcs_with_outcomes_adding_up() {
        let start = Instant::now();
        let mut rec = Recorder::new(start);
        for i in 0..10 {
            let code = if i < 3 {
                Code::Ok
            } else {
                Code::ResourceExhausted
            };
            let reason = if i < 3 { "" } else { "COUPON_SOLD_OUT" };
            rec.record_outcome(
                Rpc::IssueCoupon,
                start,
                Duration::from_millis(2),
                code,
                reason,
            );
        }
        let rpcs = rpc_reports(&rec, &Timeline::default(), 2.0);
        assert_eq!(rpcs.len(), 1);
        let r = &rpcs[0];
        assert_eq!((r.rpc.as_str(), r.calls), ("IssueCoupon", 10));
        assert!((r.calls_per_sec - 5.0).abs() < 1e-9);
        assert_eq!(r.outcomes.iter().map(|o| o.count).sum::<u64>(), 10);
        assert_eq!(r.outcomes[0].outcome, "RESOURCE_EXHAUSTED/COUPON_SOLD_OUT");
        assert_eq!(r.outcomes[0].reason.as_deref(), Some("COUPON_SOLD_OUT"));
        assert_eq!(r.outcomes[1].outcome, "OK");
        assert_eq!(r.outcomes[1].reason, None);

        let report = Report::example(rpcs, vec![Check::equal("a", 1, 1), Check::equal("b", 1, 2)]);
        let table = report.to_table();
        assert!(table.contains("IssueCoupon"), "{table}");
        assert!(
            table.contains("  RESOURCE_EXHAUSTED/COUPON_SOLD_OUT"),
            "{table}"
        );
        assert!(
            table.contains("FAIL b: expected 1, got 2 (off by +1)"),
            "{table}"
        );
        assert!(table.contains("1 of 2 invariants violated."), "{table}");
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["rpcs"][0]["latency"]["p50_ms"].as_f64(), Some(2.0));
        assert_eq!(json["invariants"][1]["passed"], false);
    }
}
