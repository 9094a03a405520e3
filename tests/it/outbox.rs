//! The outbox over HTTP: deliveries that fail, an outage, parking and re-drive, purging. Each
//! order writes two events here (OrderPlaced, then PaymentCompleted), every one a CloudEvent
//! in a batch (see `support::platform`).

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use ecommerce::proto::{ListParkedEventsRequest, ParkedEvent, RedriveEventsRequest};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::TcpListener;
use tonic::Code;

use crate::support::{
    TestApp, eventually,
    platform::{
        CloudEvent, Shared, events_of, http_sink, start_receiver, start_receiver_at, unique_ids,
    },
    shop::{charge, create_product, pay_orders, pay_with_key, place},
    spawn_app_with,
};

/// The payments the receiver got, by payment id, each event checked as a consumer would.
fn paid(state: &Shared) -> HashSet<i64> {
    events_of(state, "PaymentCompleted")
        .iter()
        .map(|e| {
            CloudEvent::from_json(e);
            assert_eq!(e["data"]["amount"], 10_000);
            assert_eq!(e["data"]["items"][0]["quantity"], 1);
            assert_eq!(e["data"]["event_id"], e["id"]);
            e["data"]["payment_id"].as_i64().unwrap()
        })
        .collect()
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
    let app = spawn_app_with(db, |s| http_sink(s, addr)).await;

    let payments = pay_orders(&app, 1..=5).await;
    let all_arrived = eventually(Duration::from_secs(15), || async {
        unique_ids(&state).len() == 10
    })
    .await;
    assert!(all_arrived, "received {:?}", unique_ids(&state));
    assert!(all_delivered(&app, Duration::from_secs(5)).await);
    let statuses = outbox_statuses(&app).await;
    assert!(
        statuses.iter().any(|(_, attempts)| *attempts > 1),
        "failures were recorded: {statuses:?}"
    );
    assert!(state.lock().unwrap().calls >= 3);
    assert_eq!(paid(&state), payments);
    let placed = events_of(&state, "OrderPlaced");
    let orders: HashSet<i64> = placed
        .iter()
        .map(|e| CloudEvent::from_json(e).order_id)
        .collect();
    assert_eq!(orders.len(), 5, "one OrderPlaced per order");
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
    let app = spawn_app_with(db, |s| http_sink(s, addr)).await;
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
    assert_eq!(unique_ids(&state).len(), 6);
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
        http_sink(s, addr);
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
                    page_size: 3,
                    page_token,
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    // Two orders placed and paid: four events, of both types, parked alike.
    let first = page(String::new()).await;
    assert_eq!(first.events.len(), 3);
    let second = page(first.next_page_token).await;
    assert_eq!(second.events.len(), 1);
    assert_eq!(second.next_page_token, "");
    let parked: Vec<ParkedEvent> = first.events.into_iter().chain(second.events).collect();
    let ids: HashSet<&String> = parked.iter().map(|e| &e.event_id).collect();
    assert_eq!(ids.len(), 4);
    let orders: HashSet<i64> = parked.iter().map(|e| e.order_id).collect();
    assert_eq!(
        orders.len(),
        2,
        "each parked event names its order: {parked:?}"
    );
    for event in &parked {
        match event.event_type.as_str() {
            "OrderPlaced" => assert_eq!(event.payment_id, 0),
            "PaymentCompleted" => assert!(event.payment_id > 0),
            other => panic!("unexpected {other}"),
        }
    }

    state.lock().unwrap().fail_first = 0;
    assert_eq!(redrive(&app, vec![], true).await.unwrap(), 4);
    assert!(all_delivered(&app, Duration::from_secs(15)).await);
    assert_eq!(unique_ids(&state).len(), 4);
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
    let app = spawn_app_with(db, |s| {
        http_sink(s, addr);
        // A failed event is due again 50 ms after its attempt however often it failed (orders'
        // events are older than their payments'), well before the next tick of the job.
        s.set("OUTBOX_RETRY_MAX_MS", 50);
    })
    .await;
    let payments = pay_orders(&app, 1..=USERS).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            outbox_statuses(&app).await.iter().all(|(_, a)| *a >= 1)
        })
        .await
    );
    // The payments' nudges ran deliveries back to back, each trying the events due at its
    // start: on a loaded machine the events can end up tried at moments under 50 ms apart, and
    // a run just after the receiver is back would then carry only those due. Every event due
    // now makes the next run carry all of them (this statement waits for a run holding some,
    // then makes those due too), and from then on they are tried and fail together.
    sqlx::query("UPDATE outbox_events SET next_attempt_at = now() WHERE status = 'PENDING'")
        .execute(&app.pg)
        .await
        .unwrap();

    let opened = Instant::now();
    state.lock().unwrap().down = false;
    // Each user's order is placed and paid: two events per user, the refused user's two
    // refused (the receiver refuses any batch holding one of them).
    let events = 2 * USERS as usize;
    let others_arrived = eventually(Duration::from_secs(15), || async {
        unique_ids(&state).len() == events - 2
    })
    .await;
    let took = opened.elapsed();
    assert!(others_arrived, "received {:?}", unique_ids(&state));
    println!(
        "the {} other events delivered {took:?} after the receiver came back",
        events - 2
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(
        state.lock().unwrap().refused_batches.first(),
        Some(&events),
        "the refused events shared their batch with all the others"
    );

    assert!(
        eventually(Duration::from_secs(5), || async {
            parked_events(&app).await.len() == 2
        })
        .await
    );
    let (refused_order, refused_payment): (i64, i64) = sqlx::query_as(
        "SELECT o.id, p.id FROM payments p JOIN orders o ON o.id = p.order_id
         WHERE o.user_id = $1",
    )
    .bind(REFUSED_USER)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    let mut both = parked_events(&app).await;
    both.sort_by(|a, b| a.event_type.cmp(&b.event_type));
    let types: Vec<&str> = both.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["OrderPlaced", "PaymentCompleted"]);
    for parked in &both {
        assert_eq!(parked.reason, "HTTP 400");
        assert_eq!(parked.order_id, refused_order);
        assert!(parked.attempts >= 2, "{parked:?}");
        assert!(parked.created_at.is_some() && parked.parked_at.is_some());
        assert!(!unique_ids(&state).contains(&parked.event_id));
    }
    assert_eq!(both[0].payment_id, 0, "an order event names no payment");
    let parked = both.remove(1);
    assert_eq!(parked.payment_id, refused_payment);
    assert!(payments.contains(&parked.payment_id));

    for (event_ids, all) in [
        (vec![], false),
        (vec![parked.event_id.clone()], true),
        (vec!["not-a-uuid".to_string()], false),
    ] {
        let refused = redrive(&app, event_ids, all).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    }

    state.lock().unwrap().refuse_user = None;
    let redriven = redrive(
        &app,
        vec![parked.event_id.clone(), both[0].event_id.clone()],
        false,
    );
    assert_eq!(redriven.await.unwrap(), 2);
    assert!(
        eventually(Duration::from_secs(10), || async {
            let received = unique_ids(&state);
            received.contains(&parked.event_id) && received.contains(&both[0].event_id)
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
        http_sink(s, addr);
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
    assert_eq!(paid(&state), payments);
    assert_eq!(unique_ids(&state).len(), 10);
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
    assert_eq!(
        count("outbox_events").await,
        6,
        "each order placed and paid"
    );
    // A parked event is kept, however old (this one as written before events named their
    // order).
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
