//! Reading the server's Prometheus endpoint.

use super::TestApp;

/// The whole `/metrics` page of `app`.
pub async fn metrics_text(app: &TestApp) -> String {
    reqwest::get(format!("http://{}/metrics", app.metrics_addr))
        .await
        .expect("metrics endpoint answers")
        .text()
        .await
        .unwrap()
}

/// The value of the series that starts with `prefix` (name and labels), if present.
pub fn series_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
