//! The report as one self-contained HTML page (`--report FILE.html`): the figures and the
//! invariants as tables, and for each RPC three plots over the seconds of the run (calls per
//! second; p50 and p99 latency; the mix of status codes). Plots are inline SVG drawn here: no
//! script, no style sheet or font from the network, so the file opens anywhere and can be mailed.
//! The same plots can be written as SVG files (`--plots DIR`), for documents.

use std::fmt::Write;

use super::report::{Report, RpcReport};

const WIDTH: f64 = 820.0;
const HEIGHT: f64 = 240.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 300.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 36.0;
/// A partial last second shorter than this would plot a rate from a handful of calls.
const MIN_SPAN_FOR_RATE: f64 = 0.5;

const OK_COLOR: &str = "#2ca02c";
const FAILURE_COLORS: &[&str] = &["#d62728", "#ff9896", "#8c1a1a"];
const REFUSAL_COLORS: &[&str] = &[
    "#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
];
/// Codes after which the caller cannot tell what happened (the load generator's `Indeterminate`).
const FAILURE_CODES: &[&str] = &[
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "INTERNAL",
    "UNKNOWN",
    "CANCELLED",
    "ABORTED",
    "DATA_LOSS",
];

/// One plot: a file-name stem and a standalone SVG document.
pub struct Plot {
    pub name: String,
    pub svg: String,
}

/// Every plot of the report, three per RPC.
pub fn plots(report: &Report) -> Vec<Plot> {
    report
        .rpcs
        .iter()
        .flat_map(|rpc| {
            let slug = slug(&rpc.rpc);
            [
                (format!("{slug}-throughput"), throughput(rpc)),
                (format!("{slug}-latency"), latency(rpc)),
                (format!("{slug}-outcomes"), outcomes(rpc)),
            ]
        })
        .map(|(name, svg)| Plot {
            name: format!("{}-{name}", slug(&report.scenario)),
            svg,
        })
        .collect()
}

/// The whole page.
pub fn page(report: &Report) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_page(report, &mut out);
    out
}

fn write_page(r: &Report, out: &mut String) -> std::fmt::Result {
    let title = format!("{} against {}", r.scenario, r.target);
    writeln!(out, "<!DOCTYPE html>")?;
    writeln!(
        out,
        "<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>",
        esc(&title)
    )?;
    writeln!(
        out,
        "<style>body{{font-family:sans-serif;margin:2em;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}\
         td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}\
         td:first-child,th:first-child{{text-align:left}}\
         .ok{{color:#2ca02c}}.fail{{color:#d62728;font-weight:bold}}\
         svg{{display:block;margin:0.5em 0}}</style></head><body>"
    )?;
    writeln!(out, "<h1>{}</h1>", esc(&title))?;
    let fixtures: Vec<String> = r.fixtures.iter().map(|(k, v)| format!("{k}={v}")).collect();
    writeln!(
        out,
        "<p>Seed {}, {} workers over {} connections; measured {:.2} s after a {:.2} s warm-up \
         ({} calls not measured); {} units of work. Fixtures: {}.</p>",
        r.seed,
        r.concurrency,
        r.connections,
        r.measured_secs,
        r.warmup_secs,
        r.warmup_calls,
        r.units_of_work,
        esc(&fixtures.join(" "))
    )?;
    let verdict = if r.passed {
        format!(
            "<p class=\"ok\">All {} invariants hold.</p>",
            r.invariants.len()
        )
    } else {
        format!(
            "<p class=\"fail\">{} of {} invariants violated.</p>",
            r.violations().count(),
            r.invariants.len()
        )
    };
    writeln!(out, "{verdict}")?;

    writeln!(out, "<h2>Calls</h2><table>")?;
    writeln!(
        out,
        "<tr><th>RPC</th><th>calls</th><th>calls/s</th><th>p50 ms</th><th>p90 ms</th>\
         <th>p99 ms</th><th>max ms</th></tr>"
    )?;
    for rpc in &r.rpcs {
        let l = &rpc.latency;
        writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.2}</td><td>{:.2}</td>\
             <td>{:.2}</td><td>{:.2}</td></tr>",
            esc(&rpc.rpc),
            rpc.calls,
            rpc.calls_per_sec,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.max_ms
        )?;
    }
    writeln!(out, "</table>")?;

    writeln!(out, "<h2>Status codes</h2><table>")?;
    writeln!(
        out,
        "<tr><th>RPC</th><th>outcome</th><th>calls</th><th>share</th></tr>"
    )?;
    for rpc in &r.rpcs {
        for o in &rpc.outcomes {
            let share = 100.0 * o.count as f64 / rpc.calls.max(1) as f64;
            writeln!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{share:.1}%</td></tr>",
                esc(&rpc.rpc),
                esc(&o.outcome),
                o.count
            )?;
        }
    }
    writeln!(out, "</table>")?;

    writeln!(out, "<h2>Invariants</h2><table>")?;
    writeln!(
        out,
        "<tr><th>invariant</th><th>verdict</th><th>detail</th></tr>"
    )?;
    for c in &r.invariants {
        let (class, mark) = if c.passed {
            ("ok", "holds")
        } else {
            ("fail", "VIOLATED")
        };
        writeln!(
            out,
            "<tr><td>{}</td><td class=\"{class}\">{mark}</td><td style=\"text-align:left\">{}</td></tr>",
            esc(&c.name),
            esc(&c.detail)
        )?;
    }
    writeln!(out, "</table>")?;

    writeln!(
        out,
        "<h2>Second by second</h2><p>Each call counts in the second it finished in, from the \
         end of the warm-up. Per-second percentiles are within ±5% (logarithmic buckets); the \
         tables above are exact.</p>"
    )?;
    for rpc in &r.rpcs {
        writeln!(out, "<h3>{}</h3>", esc(&rpc.rpc))?;
        for svg in [throughput(rpc), latency(rpc), outcomes(rpc)] {
            writeln!(out, "{svg}")?;
        }
    }
    writeln!(out, "</body></html>")
}

fn throughput(rpc: &RpcReport) -> String {
    let points = rpc
        .per_second
        .iter()
        .filter(|s| s.span_secs >= MIN_SPAN_FOR_RATE)
        .map(|s| (s.second as f64 + s.span_secs / 2.0, s.calls_per_sec))
        .collect();
    line_chart(
        &format!("{}: calls per second", rpc.rpc),
        "calls/s",
        x_end(rpc),
        &[Series {
            name: "calls/s".into(),
            color: "#1f77b4",
            points,
        }],
    )
}

fn latency(rpc: &RpcReport) -> String {
    let series = |name: &str,
                  color: &'static str,
                  pick: fn(&super::report::SecondReport) -> Option<f64>| Series {
        name: name.into(),
        color,
        points: rpc
            .per_second
            .iter()
            .filter_map(|s| pick(s).map(|v| (s.second as f64 + s.span_secs / 2.0, v)))
            .collect(),
    };
    line_chart(
        &format!("{}: latency", rpc.rpc),
        "ms",
        x_end(rpc),
        &[
            series("p50", "#1f77b4", |s| s.p50_ms),
            series("p99", "#d62728", |s| s.p99_ms),
        ],
    )
}

fn outcomes(rpc: &RpcReport) -> String {
    // The RPC's outcomes, most frequent first, each with its colour.
    let mut refusals = REFUSAL_COLORS.iter().cycle();
    let mut failures = FAILURE_COLORS.iter().cycle();
    let categories: Vec<(&str, &str)> = rpc
        .outcomes
        .iter()
        .map(|o| {
            let color = if o.outcome == "OK" {
                OK_COLOR
            } else if FAILURE_CODES.contains(&o.code.as_str()) {
                failures.next().copied().unwrap_or("#d62728")
            } else {
                refusals.next().copied().unwrap_or("#7f7f7f")
            };
            (o.outcome.as_str(), color)
        })
        .collect();
    let (w, h) = plot_area();
    let mut svg = svg_open(&format!(
        "{}: status codes, share of each second's calls",
        rpc.rpc
    ));
    let x_max = x_end(rpc);
    let x = |v: f64| LEFT + v / x_max * w;
    let y = |share: f64| TOP + h - share * h;
    axes(&mut svg, x_max, 1.0, "share", |v| {
        format!("{:.0}%", v * 100.0)
    });
    for s in &rpc.per_second {
        if s.calls == 0 {
            continue;
        }
        let mut below = 0.0;
        for (label, color) in &categories {
            let n = s.outcomes.get(*label).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            let share = n as f64 / s.calls as f64;
            let _ = write!(
                svg,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"><title>{}: {n} calls</title></rect>",
                x(s.second as f64) + 1.0,
                y(below + share),
                (x(s.second as f64 + s.span_secs) - x(s.second as f64) - 2.0).max(1.0),
                share * h,
                esc(label)
            );
            below += share;
        }
    }
    legend(
        &mut svg,
        categories.iter().map(|(label, color)| (*label, *color)),
    );
    svg.push_str("</svg>");
    svg
}

struct Series {
    name: String,
    color: &'static str,
    /// (seconds since the warm-up, value)
    points: Vec<(f64, f64)>,
}

fn line_chart(title: &str, unit: &str, x_max: f64, series: &[Series]) -> String {
    let (w, h) = plot_area();
    let y_top = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let y_max = nice_ceiling(y_top);
    let mut svg = svg_open(title);
    axes(&mut svg, x_max, y_max, unit, number);
    let x = |v: f64| LEFT + v / x_max * w;
    let y = |v: f64| TOP + h - v / y_max * h;
    for s in series {
        let path: Vec<String> = s
            .points
            .iter()
            .map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py)))
            .collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>",
            s.color,
            path.join(" ")
        );
        for &(px, py) in &s.points {
            let _ = write!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\" fill=\"{}\"><title>{} s: {} {}</title></circle>",
                x(px),
                y(py),
                s.color,
                px.floor(),
                number(py),
                esc(unit)
            );
        }
    }
    legend(&mut svg, series.iter().map(|s| (s.name.as_str(), s.color)));
    svg.push_str("</svg>");
    svg
}

fn plot_area() -> (f64, f64) {
    (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM)
}

/// The x axis ends with the run (whole seconds, at least one).
fn x_end(rpc: &RpcReport) -> f64 {
    rpc.per_second
        .last()
        .map_or(1.0, |s| s.second as f64 + s.span_secs)
        .max(1.0)
}

fn svg_open(title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"11\">\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"{LEFT}\" y=\"16\" font-size=\"13\" font-weight=\"bold\">{}</text>",
        esc(title)
    )
}

/// Axes with grid lines: seconds along x, `y_max` split in five along y.
fn axes(svg: &mut String, x_max: f64, y_max: f64, unit: &str, label: impl Fn(f64) -> String) {
    let (w, h) = plot_area();
    for i in 0..=5 {
        let v = y_max * f64::from(i) / 5.0;
        let py = TOP + h - h * f64::from(i) / 5.0;
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#e5e5e5\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + w,
            LEFT - 6.0,
            py + 4.0,
            esc(&label(v))
        );
    }
    let step = nice_ceiling(x_max / 10.0).max(1.0);
    let mut t = 0.0;
    while t <= x_max + 1e-9 {
        let px = LEFT + t / x_max * w;
        let _ = write!(
            svg,
            "<line x1=\"{px:.1}\" y1=\"{:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#999\"/>\
             <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            TOP + h,
            TOP + h + 4.0,
            TOP + h + 16.0,
            number(t)
        );
        t += step;
    }
    let _ = write!(
        svg,
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{:.1}\" stroke=\"#999\"/>\
         <line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#999\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">seconds since the warm-up</text>\
         <text x=\"12\" y=\"{:.1}\" transform=\"rotate(-90 12 {:.1})\" text-anchor=\"middle\">{}</text>",
        TOP + h,
        TOP + h,
        LEFT + w,
        TOP + h,
        LEFT + w / 2.0,
        HEIGHT - 4.0,
        TOP + h / 2.0,
        TOP + h / 2.0,
        esc(unit)
    );
}

fn legend<'a>(svg: &mut String, entries: impl Iterator<Item = (&'a str, &'a str)>) {
    let x = WIDTH - RIGHT + 12.0;
    for (i, (label, color)) in entries.enumerate() {
        let y = TOP + 4.0 + 16.0 * i as f64;
        let _ = write!(
            svg,
            "<rect x=\"{x}\" y=\"{y:.1}\" width=\"10\" height=\"10\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            x + 14.0,
            y + 9.0,
            esc(label)
        );
    }
}

/// The smallest of 1, 2, 2.5, 5 × 10^k at or above `v` (1 for nothing to show).
fn nice_ceiling(v: f64) -> f64 {
    if !v.is_finite() || v <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&c| c >= v * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude)
}

/// A tick or tooltip number: no more digits than it needs.
fn number(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn slug(name: &str) -> String {
    let mut slug = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.ends_with('-') {
            slug.push('-');
        }
    }
    slug.trim_matches('-').to_string()
}

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        judge::Check,
        report::{OutcomeCount, SecondReport},
        stats::Latency,
    };

    fn second(second: u64, ok: u64, sold_out: u64, p99: f64) -> SecondReport {
        SecondReport {
            second,
            span_secs: 1.0,
            calls: ok + sold_out,
            calls_per_sec: (ok + sold_out) as f64,
            p50_ms: Some(p99 / 4.0),
            p99_ms: Some(p99),
            outcomes: BTreeMap::from([
                ("OK".to_string(), ok),
                ("RESOURCE_EXHAUSTED/COUPON_SOLD_OUT".to_string(), sold_out),
            ]),
        }
    }

    fn report() -> Report {
        Report::example(
            vec![RpcReport {
                rpc: "IssueCoupon".into(),
                calls: 300,
                calls_per_sec: 150.0,
                latency: Latency::default(),
                outcomes: vec![
                    OutcomeCount {
                        outcome: "RESOURCE_EXHAUSTED/COUPON_SOLD_OUT".into(),
                        code: "RESOURCE_EXHAUSTED".into(),
                        reason: Some("COUPON_SOLD_OUT".into()),
                        count: 200,
                        latency: Latency::default(),
                    },
                    OutcomeCount {
                        outcome: "OK".into(),
                        code: "OK".into(),
                        reason: None,
                        count: 100,
                        latency: Latency::default(),
                    },
                ],
                per_second: vec![second(0, 100, 50, 12.0), second(1, 0, 150, 3.0)],
            }],
            vec![
                Check::equal("issued <= stock", 1, 1),
                Check::equal("<b>", 1, 2),
            ],
        )
    }

    #[test]
    fn the_page_is_self_contained_and_shows_every_part() {
        let page = page(&report());
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert_eq!(page.matches("<svg").count(), 3, "three plots per RPC");
        for absent in [
            "<script",
            "http://www.w3.org/1999",
            "src=",
            "href=",
            "@import",
        ] {
            assert!(!page.contains(absent), "{absent} in the page");
        }
        assert!(page.contains("1 of 2 invariants violated."));
        assert!(page.contains("&lt;b&gt;"), "text is escaped");
        assert!(page.contains("RESOURCE_EXHAUSTED/COUPON_SOLD_OUT"));
        // Second 0 is two-thirds OK, so its OK bar is 2/3 of the plot's height.
        let (_, h) = plot_area();
        let ok_height = format!("height=\"{:.1}\" fill=\"{OK_COLOR}\"", h * 2.0 / 3.0);
        assert!(page.contains(&ok_height), "{ok_height} missing");
    }

    #[test]
    fn plots_are_named_by_scenario_rpc_and_kind() {
        let names: Vec<String> = plots(&report()).into_iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "coupon-stampede-issuecoupon-throughput",
                "coupon-stampede-issuecoupon-latency",
                "coupon-stampede-issuecoupon-outcomes"
            ]
        );
        assert_eq!(slug("ChargeBalance (same key)"), "chargebalance-same-key");
    }

    #[test]
    fn axes_end_on_round_numbers() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(7.3), 10.0);
        assert_eq!(nice_ceiling(41_000.0), 50_000.0);
        assert_eq!(nice_ceiling(0.21), 0.25);
        assert_eq!(nice_ceiling(2.0), 2.0);
    }
}
