use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use ecommerce::proto::{ListParkedEventsRequest, ParkedEvent, RedriveEventsRequest};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::Code;

use crate::support::{
    TestApp, eventually,
    shop::{charge, create_product, pay_orders, pay_with_key, place},
    spawn_app_with,
};

/// A real HTTP receiver standing in for the data platform: it answers 503 while `down`, 500 to
/// the first `fail_first` deliveries, 400 to any batch holding an event of `refuse_user`, and
/// records the events of the batches it accepts.
#[derive(Default)]
struct Received {
    calls: usize,
    fail_first: usize,
    down: bool,
    refuse_user: Option<i64>,
    /// Sizes of the batches answered 400.
    refused_batches: Vec<usize>,
    event_ids: Vec<String>,
    events: Vec<serde_json::Value>,
}

type Shared = Arc<Mutex<Received>>;

async fn receive(State(state): State<Shared>, Json(batch): Json<serde_json::Value>) -> StatusCode {
    let mut received = state.lock().unwrap();
    received.calls += 1;
    if received.down {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if received.calls <= received.fail_first {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let events = batch["events"].as_array().cloned().unwrap_or_default();
    if let Some(user) = received.refuse_user
        && events.iter().any(|e| e["payload"]["user_id"] == user)
    {
        received.refused_batches.push(events.len());
        return StatusCode::BAD_REQUEST;
    }
    for event in events {
        assert_eq!(event["event_id"], event["idempotency_key"]);
        received
            .event_ids
            .push(event["event_id"].as_str().unwrap().to_string());
        received.events.push(event);
    }
    StatusCode::OK
}

fn unique_ids(state: &Shared) -> HashSet<String> {
    state.lock().unwrap().event_ids.iter().cloned().collect()
}

async fn start_receiver(listener: TcpListener, state: Shared) -> JoinHandle<()> {
    let app = Router::new()
        .route("/events", post(receive))
        .with_state(state);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

/// Starts the receiver on an address reserved earlier, where nothing answered until now.
async fn start_receiver_at(addr: SocketAddr, state: Shared) -> JoinHandle<()> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    start_receiver(socket.listen(64).unwrap(), state).await
}

async fn all_delivered(app: &TestApp, within: Duration) -> bool {
    eventually(within, || async {
        outbox_statuses(app)
            .await
            .iter()
            .all(|(s, _)| s == "DELIVERED")
    })
    .await
}

async fn redrive(app: &TestApp, event_ids: Vec<String>, all: bool) -> Result<i64, tonic::Status> {
    app.admin()
        .redrive_events(RedriveEventsRequest { event_ids, all })
        .await
        .map(|r| r.into_inner().redriven)
}

fn sink_settings(s: &mut crate::support::TestSettings, addr: SocketAddr) {
    s.set("DATA_PLATFORM_SINK", "http")
        .set("DATA_PLATFORM_URL", format!("http://{addr}/events"))
        .set("DATA_PLATFORM_TIMEOUT_MS", 500)
        .set("OUTBOX_RETRY_BASE_MS", 50)
        .set("OUTBOX_RETRY_MAX_MS", 200)
        .set("OUTBOX_INTERVAL_SECS", 1);
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

    let payments = pay_orders(&app, 1..=5).await;
    let all_arrived = eventually(Duration::from_secs(15), || async {
        unique_ids(&state).len() == 5
    })
    .await;
    assert!(
        all_arrived,
        "received {:?}",
        state.lock().unwrap().event_ids
    );
    assert!(all_delivered(&app, Duration::from_secs(5)).await);
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
    pay_orders(&app, 1..=3).await;
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
    let receiver = start_receiver_at(addr, state.clone()).await;
    assert!(all_delivered(&app, Duration::from_secs(15)).await);
    assert_eq!(unique_ids(&state).len(), 3);
    app.stop().await;
    receiver.abort();
}

#[sqlx::test(migrations = false)]
async fn events_failing_past_the_horizon_are_parked_and_redriven(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Shared::default();
    state.lock().unwrap().fail_first = usize::MAX;
    let receiver = start_receiver(listener, state.clone()).await;
    let app = spawn_app_with(db, |s| {
        sink_settings(s, addr);
        // 1.8 s.
        s.set("OUTBOX_PARK_AFTER_HOURS", 0.0005);
    })
    .await;
    pay_orders(&app, 1..=2).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            outbox_statuses(&app)
                .await
                .iter()
                .all(|(s, _)| s == "PARKED")
        })
        .await,
        "{:?}",
        outbox_statuses(&app).await
    );
    let rows: Vec<(Option<String>, f64)> = sqlx::query_as(
        "SELECT last_error, extract(epoch FROM parked_at - failing_since)::float8
         FROM outbox_events",
    )
    .fetch_all(&app.pg)
    .await
    .unwrap();
    for (reason, failing_for) in rows {
        assert_eq!(reason.as_deref(), Some("HTTP 500"));
        assert!(
            failing_for >= 1.8,
            "parked after failing for {failing_for} s"
        );
    }

    let page = |page_token: String| {
        let mut admin = app.admin();
        async move {
            admin
                .list_parked_events(ListParkedEventsRequest {
                    page_size: 1,
                    page_token,
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let first = page(String::new()).await;
    assert_eq!(first.events.len(), 1);
    let second = page(first.next_page_token).await;
    assert_eq!(second.events.len(), 1);
    assert_ne!(first.events[0].event_id, second.events[0].event_id);
    assert_eq!(second.next_page_token, "");

    state.lock().unwrap().fail_first = 0;
    assert_eq!(redrive(&app, vec![], true).await.unwrap(), 2);
    assert!(all_delivered(&app, Duration::from_secs(15)).await);
    assert_eq!(unique_ids(&state).len(), 2);
    app.stop().await;
    receiver.abort();
}

async fn parked_events(app: &TestApp) -> Vec<ParkedEvent> {
    app.admin()
        .list_parked_events(ListParkedEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events
}

#[sqlx::test(migrations = false)]
async fn one_refused_event_never_holds_back_the_others(_: PgPoolOptions, db: PgConnectOptions) {
    const USERS: i64 = 20;
    const REFUSED_USER: i64 = 7;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Shared::default();
    // Down while the shop pays, so that every event goes out in the same batch when it is back.
    state.lock().unwrap().down = true;
    state.lock().unwrap().refuse_user = Some(REFUSED_USER);
    let receiver = start_receiver(listener, state.clone()).await;
    let app = spawn_app_with(db, |s| sink_settings(s, addr)).await;
    let payments = pay_orders(&app, 1..=USERS).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            outbox_statuses(&app).await.iter().all(|(_, a)| *a >= 1)
        })
        .await
    );

    let opened = Instant::now();
    state.lock().unwrap().down = false;
    let others_arrived = eventually(Duration::from_secs(15), || async {
        unique_ids(&state).len() == USERS as usize - 1
    })
    .await;
    let took = opened.elapsed();
    assert!(others_arrived, "received {:?}", unique_ids(&state));
    println!(
        "the {} other events delivered {took:?} after the receiver came back",
        USERS - 1
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(
        state.lock().unwrap().refused_batches.first(),
        Some(&(USERS as usize)),
        "the refused event shared its batch with all the others"
    );

    assert!(
        eventually(Duration::from_secs(5), || async {
            parked_events(&app).await.len() == 1
        })
        .await
    );
    let parked = parked_events(&app).await.remove(0);
    let refused_payment: i64 = sqlx::query_scalar(
        "SELECT p.id FROM payments p JOIN orders o ON o.id = p.order_id WHERE o.user_id = $1",
    )
    .bind(REFUSED_USER)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(parked.reason, "HTTP 400");
    assert_eq!(parked.payment_id, refused_payment);
    assert!(payments.contains(&parked.payment_id));
    assert_eq!(parked.event_type, "PaymentCompleted");
    assert!(parked.attempts >= 2, "{parked:?}");
    assert!(parked.created_at.is_some() && parked.parked_at.is_some());
    assert!(!unique_ids(&state).contains(&parked.event_id));

    for (event_ids, all) in [
        (vec![], false),
        (vec![parked.event_id.clone()], true),
        (vec!["not-a-uuid".to_string()], false),
    ] {
        let refused = redrive(&app, event_ids, all).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    }

    state.lock().unwrap().refuse_user = None;
    let redriven = redrive(&app, vec![parked.event_id.clone()], false).await;
    assert_eq!(redriven.unwrap(), 1);
    assert!(
        eventually(Duration::from_secs(10), || async {
            unique_ids(&state).contains(&parked.event_id)
        })
        .await
    );
    assert!(parked_events(&app).await.is_empty());
    assert!(all_delivered(&app, Duration::from_secs(5)).await);
    app.stop().await;
    receiver.abort();
}

#[sqlx::test(migrations = false)]
async fn an_outage_longer_than_the_old_horizon_parks_nothing(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    // The old limit: parked after 20 failed attempts (about 55 minutes with the default backoff).
    const OLD_MAX_ATTEMPTS: i32 = 20;
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let app = spawn_app_with(db, |s| {
        sink_settings(s, addr);
        // Time compressed: every run of the job (each second) retries every event.
        s.set("OUTBOX_RETRY_BASE_MS", 10)
            .set("OUTBOX_RETRY_MAX_MS", 50);
    })
    .await;
    let outage = Instant::now();
    let payments = pay_orders(&app, 1..=5).await;
    assert!(
        eventually(Duration::from_secs(90), || async {
            let statuses = outbox_statuses(&app).await;
            assert!(
                statuses.iter().all(|(s, _)| s == "PENDING"),
                "nothing is parked during an outage: {statuses:?}"
            );
            statuses.iter().all(|(_, a)| *a > OLD_MAX_ATTEMPTS)
        })
        .await,
        "{:?}",
        outbox_statuses(&app).await
    );
    let error: Option<String> = sqlx::query_scalar("SELECT last_error FROM outbox_events LIMIT 1")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert!(error.unwrap().starts_with("cannot connect"));

    let state = Shared::default();
    let receiver = start_receiver_at(addr, state.clone()).await;
    let down_for = outage.elapsed();
    assert!(all_delivered(&app, Duration::from_secs(15)).await);
    let back_after = outage.elapsed() - down_for;
    let attempts: Vec<i32> = outbox_statuses(&app)
        .await
        .iter()
        .map(|(_, a)| *a)
        .collect();
    println!(
        "down {down_for:?}, attempts per event {attempts:?}, all delivered {back_after:?} after it returned"
    );
    let paid: HashSet<i64> = state
        .lock()
        .unwrap()
        .events
        .iter()
        .map(|e| e["payload"]["payment_id"].as_i64().unwrap())
        .collect();
    assert_eq!(paid, payments);
    assert_eq!(unique_ids(&state).len(), 5);
    app.stop().await;
    receiver.abort();
}

#[sqlx::test(migrations = false)]
async fn delivered_events_and_old_idempotency_keys_are_purged(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app_with(db, |s| {
        // 10.8 s: long enough for the payments below to be counted before any purge.
        s.set("OUTBOX_RETENTION_HOURS", 0.003)
            .set("IDEMPOTENCY_RETENTION_HOURS", 0.003)
            .set("PURGE_INTERVAL_SECS", 1);
    })
    .await;
    let product = create_product(&app, "gift card", 10_000, 1_000).await;
    for user in 1..=3 {
        charge(&app, user, 10_000).await;
        let order = place(&app, user, &[(product, 1)]).await.unwrap();
        pay_with_key(&app, user, order.id, &format!("pay-{user}"))
            .await
            .unwrap();
    }
    let count = |table: &'static str| {
        let pg = app.pg.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM {table}"
            )))
            .fetch_one(&pg)
            .await
            .unwrap()
        }
    };
    assert_eq!(count("idempotency_keys").await, 3);
    assert_eq!(count("outbox_events").await, 3);
    // A parked event is kept, however old.
    sqlx::query(
        "INSERT INTO outbox_events (event_id, event_type, aggregate_id, payload, status,
                                    parked_at, last_error, created_at)
         VALUES (gen_random_uuid(), 'PaymentCompleted', 1, '{}', 'PARKED', now(), 'HTTP 400',
                 now() - interval '30 days')",
    )
    .execute(&app.pg)
    .await
    .unwrap();
    let purged_at = Instant::now();
    assert!(
        eventually(Duration::from_secs(30), || async {
            count("idempotency_keys").await == 0 && count("outbox_events").await == 1
        })
        .await
    );
    println!("purged {:?} after the payments", purged_at.elapsed());
    assert_eq!(parked_events(&app).await.len(), 1);
    app.stop().await;
}
