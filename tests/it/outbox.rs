use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::support::{
    TestApp, eventually,
    shop::{charge, create_product, pay, place},
    spawn_app_with,
};

/// A real HTTP receiver standing in for the data platform: it fails the first `fail_first`
/// deliveries with 500 and records the event ids of the others.
#[derive(Default)]
struct Received {
    calls: usize,
    fail_first: usize,
    event_ids: Vec<String>,
    events: Vec<serde_json::Value>,
}

type Shared = Arc<Mutex<Received>>;

async fn receive(State(state): State<Shared>, Json(batch): Json<serde_json::Value>) -> StatusCode {
    let mut received = state.lock().unwrap();
    received.calls += 1;
    if received.calls <= received.fail_first {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    for event in batch["events"].as_array().cloned().unwrap_or_default() {
        assert_eq!(event["event_id"], event["idempotency_key"]);
        received
            .event_ids
            .push(event["event_id"].as_str().unwrap().to_string());
        received.events.push(event);
    }
    StatusCode::OK
}

async fn start_receiver(listener: TcpListener, state: Shared) -> JoinHandle<()> {
    let app = Router::new()
        .route("/events", post(receive))
        .with_state(state);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

fn sink_settings(s: &mut crate::support::TestSettings, addr: SocketAddr) {
    s.set("DATA_PLATFORM_SINK", "http")
        .set("DATA_PLATFORM_URL", format!("http://{addr}/events"))
        .set("DATA_PLATFORM_TIMEOUT_MS", 500)
        .set("OUTBOX_RETRY_BASE_MS", 50)
        .set("OUTBOX_RETRY_MAX_MS", 200)
        .set("OUTBOX_INTERVAL_SECS", 1);
}

async fn pay_orders(app: &TestApp, n: i64) -> HashSet<i64> {
    let product = create_product(app, "gift card", 10_000, 1_000).await;
    let mut payments = HashSet::new();
    for user in 1..=n {
        charge(app, user, 10_000).await;
        let order = place(app, user, &[(product, 1)]).await.unwrap();
        payments.insert(
            pay(app, user, order.id)
                .await
                .expect("payments never wait on the sink")
                .id,
        );
    }
    payments
}

async fn outbox_statuses(app: &TestApp) -> Vec<(String, i32)> {
    sqlx::query_as("SELECT status, attempts FROM outbox_events ORDER BY id")
        .fetch_all(&app.pg)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn every_event_arrives_despite_failed_deliveries(_: PgPoolOptions, db: PgConnectOptions) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Shared::default();
    state.lock().unwrap().fail_first = 2;
    let receiver = start_receiver(listener, state.clone()).await;
    let app = spawn_app_with(db, |s| sink_settings(s, addr)).await;

    let payments = pay_orders(&app, 5).await;
    let all_arrived = eventually(Duration::from_secs(15), || async {
        let unique: HashSet<String> = state.lock().unwrap().event_ids.iter().cloned().collect();
        unique.len() == 5
    })
    .await;
    assert!(
        all_arrived,
        "received {:?}",
        state.lock().unwrap().event_ids
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            outbox_statuses(&app)
                .await
                .iter()
                .all(|(s, _)| s == "DELIVERED")
        })
        .await
    );
    let statuses = outbox_statuses(&app).await;
    assert!(
        statuses.iter().any(|(_, attempts)| *attempts > 1),
        "failures were recorded: {statuses:?}"
    );
    {
        let received = state.lock().unwrap();
        assert!(received.calls >= 3);
        let paid: HashSet<i64> = received
            .events
            .iter()
            .map(|e| {
                assert_eq!(e["event_type"], "PaymentCompleted");
                assert_eq!(e["payload"]["amount"], 10_000);
                assert_eq!(e["payload"]["items"][0]["quantity"], 1);
                e["payload"]["payment_id"].as_i64().unwrap()
            })
            .collect();
        assert_eq!(paid, payments);
    }
    app.stop().await;
    receiver.abort();
}

#[sqlx::test(migrations = false)]
async fn payments_succeed_while_the_platform_is_down(_: PgPoolOptions, db: PgConnectOptions) {
    // Reserve a port, then free it: nothing answers there until the receiver starts.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let app = spawn_app_with(db, |s| sink_settings(s, addr)).await;
    pay_orders(&app, 3).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            outbox_statuses(&app)
                .await
                .iter()
                .all(|(s, attempts)| s == "PENDING" && *attempts >= 1)
        })
        .await,
        "deliveries were attempted and failed: {:?}",
        outbox_statuses(&app).await
    );

    let state = Shared::default();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    let receiver = start_receiver(socket.listen(64).unwrap(), state.clone()).await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            outbox_statuses(&app)
                .await
                .iter()
                .all(|(s, _)| s == "DELIVERED")
        })
        .await
    );
    let unique: HashSet<String> = state.lock().unwrap().event_ids.iter().cloned().collect();
    assert_eq!(unique.len(), 3);
    app.stop().await;
    receiver.abort();
}

#[sqlx::test(migrations = false)]
async fn events_that_keep_failing_are_parked(_: PgPoolOptions, db: PgConnectOptions) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Shared::default();
    state.lock().unwrap().fail_first = usize::MAX;
    let receiver = start_receiver(listener, state.clone()).await;
    let app = spawn_app_with(db, |s| {
        sink_settings(s, addr);
        s.set("OUTBOX_MAX_ATTEMPTS", 3);
    })
    .await;
    pay_orders(&app, 2).await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            outbox_statuses(&app).await == vec![("PARKED".to_string(), 3); 2]
        })
        .await,
        "{:?}",
        outbox_statuses(&app).await
    );
    let error: Option<String> = sqlx::query_scalar("SELECT last_error FROM outbox_events LIMIT 1")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert!(error.unwrap().contains("500"));
    app.stop().await;
    receiver.abort();
}
