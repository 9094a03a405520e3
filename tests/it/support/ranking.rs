//! The ranking as tests watch it: how many rebuilds the job swapped in while a test ran.

use std::{collections::HashSet, time::Duration};

use fred::interfaces::KeysInterface;
use tokio_util::sync::CancellationToken;

use crate::support::TestApp;

/// Watches today's bucket snapshot (written by every rebuild) until `stop`; returns how many
/// different snapshots it saw, i.e. rebuilds swapped in while it watched.
pub fn count_rebuilds(app: &TestApp, stop: CancellationToken) -> tokio::task::JoinHandle<usize> {
    let redis = app.redis.clone();
    let today = chrono::Utc::now()
        .with_timezone(&chrono_tz::Asia::Seoul)
        .format("%Y%m%d");
    let key = format!("{}rank:{{products}}:{today}:snapshot", app.redis_prefix);
    tokio::spawn(async move {
        let mut seen = HashSet::new();
        while !stop.is_cancelled() {
            let snapshot: Option<String> = redis.get(&key).await.unwrap_or(None);
            seen.extend(snapshot);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen.len()
    })
}
