//! `DATA_PLATFORM_SINK=nats`: events published to NATS JetStream as CloudEvents in binary
//! content mode, one subject per type, against the machine's nats-server (127.0.0.1:4222, a
//! stream and subjects of the test's own) and, for outages, a private nats-server the test
//! kills and restarts.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use async_nats::jetstream::stream;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::support::{
    TestApp, eventually, nats_url,
    platform::{CloudEvent, StreamMessage, TestStream, field_i64},
    private::PrivateNats,
    shop::pay_orders,
    spawn_app_with,
};

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

/// Each message is a CloudEvent on its type's subject whose id is its event's id, and the
/// stream holds every event exactly once: an OrderPlaced and a PaymentCompleted per payment.
fn assert_one_message_per_event(
    stream: &TestStream,
    messages: &[StreamMessage],
    events: &HashMap<String, String>,
    payments: &HashSet<i64>,
) {
    let mut paid = HashSet::new();
    let mut placed = HashSet::new();
    for message in messages {
        let event = CloudEvent::from_nats(&message.headers, &message.body);
        match event.event_type.as_str() {
            "PaymentCompleted" => {
                assert_eq!(message.subject, stream.subject_of("payment_completed"));
                assert_eq!(event.data["event_id"], event.id.as_str());
                paid.insert(field_i64(&event.message, "payment_id"));
            }
            "OrderPlaced" => {
                assert_eq!(message.subject, stream.subject_of("order_placed"));
                placed.insert(event.order_id);
            }
            other => panic!("no {other} in this workload"),
        }
    }
    let ids: HashSet<String> = messages
        .iter()
        .map(|m| m.headers.get("Nats-Msg-Id").unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), messages.len(), "a message id appears twice");
    assert_eq!(ids, events.keys().cloned().collect::<HashSet<_>>());
    assert_eq!(&paid, payments);
    assert_eq!(placed.len(), payments.len());
}

#[sqlx::test(migrations = false)]
async fn two_hundred_payments_are_four_hundred_jetstream_messages(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let stream = TestStream::on(nats_url());
    let app = spawn_app_with(db, |s| stream.settings(s)).await;
    let started = Instant::now();
    let payments = pay_orders(&app, 1..=200).await;
    assert!(all_delivered(&app, 400, Duration::from_secs(30)).await);
    println!(
        "200 orders placed, paid and published in {:?}",
        started.elapsed()
    );
    let messages = stream.messages().await;
    assert_eq!(messages.len(), 400);
    assert_one_message_per_event(&stream, &messages, &event_ids(&app).await, &payments);
    app.stop().await;
    stream.delete().await;
}

#[sqlx::test(migrations = false)]
async fn a_stream_made_for_payments_alone_is_widened_to_every_type(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let stream = TestStream::on(nats_url());
    // What the previous version created: the stream of the payment subject alone.
    let old_subject = stream.subject_of("payment_completed");
    stream
        .jetstream()
        .await
        .create_stream(stream::Config {
            name: stream.name.clone(),
            subjects: vec![old_subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let app = spawn_app_with(db, |s| stream.settings(s)).await;
    let payments = pay_orders(&app, 1..=10).await;
    assert!(all_delivered(&app, 20, Duration::from_secs(30)).await);
    let messages = stream.messages().await;
    assert_one_message_per_event(&stream, &messages, &event_ids(&app).await, &payments);
    let mut info = stream
        .jetstream()
        .await
        .get_stream(&stream.name)
        .await
        .unwrap();
    let subjects = info.info().await.unwrap().config.subjects.clone();
    assert_eq!(
        subjects,
        vec![stream.subject_of("*")],
        "{old_subject} replaced"
    );
    app.stop().await;
    stream.delete().await;
}

#[sqlx::test(migrations = false)]
async fn a_nats_server_killed_mid_run_loses_no_event(_: PgPoolOptions, db: PgConnectOptions) {
    let mut nats = PrivateNats::start().await;
    let stream = TestStream::on(nats.url());
    let app = spawn_app_with(db, |s| stream.settings(s)).await;

    let mut payments = pay_orders(&app, 1..=30).await;
    assert!(all_delivered(&app, 60, Duration::from_secs(20)).await);

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
    assert!(all_delivered(&app, 180, Duration::from_secs(30)).await);
    println!(
        "every event delivered {:?} after the restart",
        restarted.elapsed()
    );

    let events = event_ids(&app).await;
    let parked = events.values().filter(|s| *s == "PARKED").count();
    assert_eq!(parked, 0);
    let messages = stream.messages().await;
    assert_one_message_per_event(&stream, &messages, &events, &payments);
    app.stop().await;
}
