//! What operators look at: the Grafana dashboard (`deploy/grafana/ecommerce.json`) and the alert
//! rules (`deploy/prometheus/alerts.yaml`) read only metrics the server exports, and the README
//! explains every alert.
//!
//! The metric names are taken from the PromQL expressions themselves (functions, keywords,
//! label matchers, label lists and ranges set aside), so a panel or a rule added later is
//! checked without being listed here.

use std::{collections::BTreeSet, time::Duration};

use ecommerce::proto::GetPopularProductsRequest;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::support::{coupons, eventually, metrics::metrics_text, shop, spawn_app};

const DASHBOARD: &str = include_str!("../../deploy/grafana/ecommerce.json");
const ALERTS: &str = include_str!("../../deploy/prometheus/alerts.yaml");
const README: &str = include_str!("../../README.md");

/// PromQL words that look like metric names but are not: operators, modifiers, and the
/// aggregations (which may be followed by `by (...)` instead of their parenthesis).
const KEYWORDS: &str = "and or unless bool offset by without on ignoring group_left group_right \
    inf nan sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk \
    limit_ratio";

/// The metric names an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Blank out what cannot hold a metric name: strings, label matchers, ranges, Grafana
    // variables, and the label lists of by / without / on / ignoring / group_*.
    let mut text = String::with_capacity(expr.len());
    let mut closing: Option<char> = None;
    for c in expr.chars() {
        match closing {
            Some(end) if c == end => {
                closing = None;
                text.push(' ');
            }
            Some(_) => {}
            None => match c {
                '{' => closing = Some('}'),
                '[' => closing = Some(']'),
                '"' => closing = Some('"'),
                _ => text.push(c),
            },
        }
    }
    let tokens = tokenize(&text);
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < tokens.len() {
        let token = &tokens[i];
        let next = tokens.get(i + 1).map(String::as_str);
        let is_word = token
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
        if [
            "by",
            "without",
            "on",
            "ignoring",
            "group_left",
            "group_right",
        ]
        .contains(&token.as_str())
            && next == Some("(")
        {
            // Skip the label list.
            while i < tokens.len() && tokens[i] != ")" {
                i += 1;
            }
        } else if is_word && next != Some("(") && !KEYWORDS.split_whitespace().any(|k| k == token) {
            names.insert(token.clone());
        }
        i += 1;
    }
    names
}

/// Words (with Grafana's `$variables` dropped) and single punctuation characters.
fn tokenize(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut word = String::new();
    let mut variable = false;
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '.' {
            word.push(c);
            continue;
        }
        if !word.is_empty() && !variable {
            tokens.push(std::mem::take(&mut word));
        }
        word.clear();
        variable = c == '$';
        if !c.is_whitespace() && c != '$' {
            tokens.push(c.to_string());
        }
    }
    if !word.is_empty() && !variable {
        tokens.push(word);
    }
    // Numbers (0.99) start with a digit; anything else with a dot is not PromQL.
    tokens.retain(|t| !t.starts_with(|c: char| c.is_ascii_digit()));
    tokens
}

/// Every query of the dashboard, with the title of its panel.
fn dashboard_queries() -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or_default().to_string();
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().expect("every target has an expr");
                out.push((title.clone(), expr.to_string()));
            }
            if let Some(inner) = panel["panels"].as_array() {
                walk(inner, out);
            }
        }
    }
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    walk(
        dashboard["panels"].as_array().expect("panels"),
        &mut queries,
    );
    queries
}

/// Every alert rule: (name, expression).
fn alert_rules() -> Vec<(String, String)> {
    let rules: serde_yaml::Value = serde_yaml::from_str(ALERTS).expect("the rules are YAML");
    assert_eq!(rules["kind"].as_str(), Some("PrometheusRule"));
    let mut out = Vec::new();
    for group in rules["spec"]["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            assert!(
                rule["labels"]["severity"].as_str().is_some(),
                "{name} has no severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name} has no summary"
            );
            let expr = rule["expr"].as_str().expect("every rule has an expr");
            out.push((name.to_string(), expr.to_string()));
        }
    }
    out
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = |expr: &str| metric_names(expr).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (grpc_method, le) (rate(grpc_server_handling_seconds_bucket{grpc_service=~"a.b"}[$__rate_interval])))"#
        ),
        ["grpc_server_handling_seconds_bucket"]
    );
    assert_eq!(
        names(
            r#"a_total{state="in_use"} / ignoring(state) b_max >= 0.9 and max(deriv(c[15m])) > 0"#
        ),
        ["a_total", "b_max", "c"]
    );
    assert_eq!(names("sum(rate(x[5m])) without (pod) > bool 1"), ["x"]);
}

#[test]
fn the_readme_explains_every_alert() {
    let operating = README
        .split("\n## Operating")
        .nth(1)
        .expect("the README has an Operating section");
    let operating = operating.split("\n## ").next().unwrap_or(operating);
    for (alert, _) in alert_rules() {
        assert!(
            operating.contains(&format!("`{alert}`")),
            "the README's Operating section does not explain {alert}"
        );
    }
}

#[sqlx::test(migrations = false)]
async fn the_dashboard_and_the_alerts_read_only_exported_metrics(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;

    // A short workload touching every flow, successes and refusals.
    let product = shop::create_product(&app, "dashboard", 1_000, 1).await;
    shop::charge(&app, 1, 100_000).await;
    shop::charge(&app, 2, 100_000).await;
    let order = shop::place(&app, 1, &[(product, 1)]).await.unwrap();
    shop::place(&app, 2, &[(product, 1)]).await.unwrap_err();
    shop::pay(&app, 1, order.id).await.unwrap();
    let coupon = coupons::create_coupon(&app, 1).await;
    coupons::issue(&app, coupon, 1).await.unwrap();
    coupons::issue(&app, coupon, 2).await.unwrap_err();
    shop::get_order(&app, 1, 999_999).await.unwrap_err();
    app.products()
        .get_popular_products(GetPopularProductsRequest { days: 1, limit: 5 })
        .await
        .unwrap();

    let mut wanted: Vec<(String, String)> = dashboard_queries()
        .into_iter()
        .map(|(title, expr)| (format!("panel \"{title}\""), expr))
        .chain(
            alert_rules()
                .into_iter()
                .map(|(alert, expr)| (format!("alert {alert}"), expr)),
        )
        .collect();
    assert!(wanted.len() > 20, "{wanted:?}");
    wanted.sort();

    let missing = |text: &str| -> Vec<String> {
        let exported: BTreeSet<&str> = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split(['{', ' ']).next())
            .collect();
        wanted
            .iter()
            .flat_map(|(source, expr)| {
                let names = metric_names(expr);
                assert!(!names.is_empty(), "{source} reads no metric: {expr}");
                names
                    .into_iter()
                    .filter(|name| !exported.contains(name.as_str()))
                    .map(move |name| format!("{name} ({source})"))
            })
            .collect()
    };
    // The outbox job and the health pings report on their own schedule.
    let all_there = eventually(Duration::from_secs(10), || async {
        missing(&metrics_text(&app).await).is_empty()
    })
    .await;
    let text = metrics_text(&app).await;
    assert!(
        all_there,
        "not exported by /metrics: {:#?}\n{text}",
        missing(&text)
    );
    app.stop().await;
}
