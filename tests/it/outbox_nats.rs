//! `DATA_PLATFORM_SINK=nats`: events published to NATS JetStream, against the machine's
//! nats-server (127.0.0.1:4222, a stream and subject of the test's own) and, for outages, a
//! private nats-server the test kills and restarts.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use async_nats::jetstream;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::support::{
    TestApp, TestSettings, eventually, nats_url, private::PrivateNats, shop::pay_orders,
    spawn_app_with,
};

/// A stream and subject no other test uses, on a server every test shares.
struct TestStream {
    url: String,
    name: String,
    subject: String,
}

impl TestStream {
    fn on(url: String) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            url,
            name: format!("TEST_{id}"),
            subject: format!("test.{id}.payment_completed"),
        }
    }

    fn settings(&self, s: &mut TestSettings) {
        s.set("DATA_PLATFORM_SINK", "nats")
            .set("NATS_URL", &self.url)
            .set("DATA_PLATFORM_STREAM", &self.name)
            .set("DATA_PLATFORM_SUBJECT", &self.subject)
            .set("DATA_PLATFORM_TIMEOUT_MS", 1000)
            .set("OUTBOX_RETRY_BASE_MS", 50)
            .set("OUTBOX_RETRY_MAX_MS", 500);
    }

    async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(async_nats::connect(&self.url).await.expect("NATS answers"))
    }

    /// Every message in the stream: its `Nats-Msg-Id` and its body.
    async fn messages(&self) -> Vec<(String, serde_json::Value)> {
        let mut stream = self
            .jetstream()
            .await
            .get_stream(&self.name)
            .await
            .expect("the sink created the stream");
        let state = stream.info().await.unwrap().state.clone();
        let mut messages = Vec::new();
        for sequence in state.first_sequence..=state.last_sequence {
            let message = stream.get_raw_message(sequence).await.unwrap();
            let id = message
                .headers
                .get("Nats-Msg-Id")
                .expect("every message carries its id")
                .to_string();
            messages.push((id, serde_json::from_slice(&message.payload).unwrap()));
        }
        messages
    }

    async fn delete(&self) {
        let _ = self.jetstream().await.delete_stream(&self.name).await;
    }
}

async fn event_ids(app: &TestApp) -> HashMap<String, String> {
    sqlx::query_as::<_, (uuid::Uuid, String)>("SELECT event_id, status FROM outbox_events")
        .fetch_all(&app.pg)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, status)| (id.to_string(), status))
        .collect()
}

async fn all_delivered(app: &TestApp, count: usize, within: Duration) -> bool {
    eventually(within, || async {
        let events = event_ids(app).await;
        events.len() == count && events.values().all(|s| s == "DELIVERED")
    })
    .await
}

/// Each message's id is its event's id, and the stream holds every event exactly once.
fn assert_one_message_per_event(
    messages: &[(String, serde_json::Value)],
    events: &HashMap<String, String>,
    payments: &HashSet<i64>,
) {
    for (id, body) in messages {
        assert_eq!(body["event_id"], id.as_str());
        assert_eq!(body["idempotency_key"], id.as_str());
        assert_eq!(body["event_type"], "PaymentCompleted");
    }
    let ids: HashSet<&String> = messages.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), messages.len(), "a message id appears twice");
    assert_eq!(ids, events.keys().collect::<HashSet<_>>());
    let paid: HashSet<i64> = messages
        .iter()
        .map(|(_, body)| body["payload"]["payment_id"].as_i64().unwrap())
        .collect();
    assert_eq!(&paid, payments);
}

#[sqlx::test(migrations = false)]
async fn two_hundred_payments_are_two_hundred_jetstream_messages(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let stream = TestStream::on(nats_url());
    let app = spawn_app_with(db, |s| stream.settings(s)).await;
    let started = Instant::now();
    let payments = pay_orders(&app, 1..=200).await;
    assert!(all_delivered(&app, 200, Duration::from_secs(30)).await);
    println!("200 payments paid and published in {:?}", started.elapsed());
    let messages = stream.messages().await;
    assert_eq!(messages.len(), 200);
    assert_one_message_per_event(&messages, &event_ids(&app).await, &payments);
    app.stop().await;
    stream.delete().await;
}

#[sqlx::test(migrations = false)]
async fn a_nats_server_killed_mid_run_loses_no_event(_: PgPoolOptions, db: PgConnectOptions) {
    let mut nats = PrivateNats::start().await;
    let stream = TestStream::on(nats.url());
    let app = spawn_app_with(db, |s| stream.settings(s)).await;

    let mut payments = pay_orders(&app, 1..=30).await;
    assert!(all_delivered(&app, 30, Duration::from_secs(20)).await);

    nats.kill().await;
    // Paid during the outage: published into a dead connection or refused, retried.
    payments.extend(pay_orders(&app, 31..=60).await);
    assert!(
        eventually(Duration::from_secs(10), || async {
            let failing: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM outbox_events WHERE status = 'PENDING' AND attempts > 0",
            )
            .fetch_one(&app.pg)
            .await
            .unwrap();
            failing > 0
        })
        .await,
        "deliveries failed during the outage"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart().await;
    let restarted = Instant::now();
    payments.extend(pay_orders(&app, 61..=90).await);
    assert!(all_delivered(&app, 90, Duration::from_secs(30)).await);
    println!(
        "every event delivered {:?} after the restart",
        restarted.elapsed()
    );

    let events = event_ids(&app).await;
    let parked = events.values().filter(|s| *s == "PARKED").count();
    assert_eq!(parked, 0);
    let messages = stream.messages().await;
    assert_one_message_per_event(&messages, &events, &payments);
    app.stop().await;
}
