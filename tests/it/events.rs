//! Lifecycle events end to end. One workload of hundreds of concurrent calls (orders placed in
//! group-commit batches and by checkouts, paid, cancelled or left to expire, paid orders refused
//! in part and in full, keyed calls sent twice, orders refused) against the real server,
//! delivered to a real HTTP receiver and, in a second run, to a real JetStream stream. What
//! arrives must be exactly one event per transition (the ids of the outbox, no more, no fewer),
//! each a valid CloudEvent whose payload parses as its events.proto message, and each order's
//! events numbered 1, 2, 3... in the order of its transitions, whatever order they arrived in.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::TcpListener;

use crate::support::{
    TestApp, TestSettings, eventually, nats_url,
    platform::{CloudEvent, Shared, TestStream, field_i64, http_sink, start_receiver},
    refunds::refund,
    shop::{charge, checkout, create_product, pay, pay_with_key, place, place_with, set_item},
    spawn_app_with,
};

const USERS: i64 = 240;

/// Orders left alone expire within seconds; calls queue for the (test-sized) pool rather than
/// fail: this workload is about events, not overload.
fn settings(s: &mut TestSettings) {
    s.set("ORDER_TTL_SECS", 10)
        .set("ORDER_EXPIRY_INTERVAL_SECS", 1)
        .set("DATABASE_ACQUIRE_TIMEOUT_MS", 30_000);
}

/// Every user at once: a quarter place (keyed, sent twice) and pay (keyed, sent twice), and of
/// those every other one is refunded a pen, then the rest (two refunds, the second sent twice),
/// a quarter place and cancel, a quarter place and walk away (the order expires), a quarter
/// check a cart out and pay; one in ten also tries to buy a product that does not exist.
async fn workload(app: &TestApp) {
    let pen = create_product(app, "pen", 1_000, 1_000_000).await;
    let ink = create_product(app, "ink", 2_500, 1_000_000).await;
    stream::iter(1..=USERS)
        .for_each(|user| async move { charge(app, user, 100_000).await })
        .await;
    let started = Instant::now();
    stream::iter(1..=USERS)
        .map(|user| async move {
            if user % 10 == 0 {
                assert!(place(app, user, &[(999_999, 1)]).await.is_err());
            }
            match user % 4 {
                0 => {
                    let request = ecommerce::proto::PlaceOrderRequest {
                        user_id: user,
                        items: crate::support::shop::lines(&[(pen, 2), (ink, 1)]),
                        user_coupon_id: 0,
                        idempotency_key: format!("order-{user}"),
                    };
                    let order = place_with(app, request.clone()).await.unwrap();
                    let again = place_with(app, request).await.unwrap();
                    assert_eq!(order.id, again.id, "a replay places nothing");
                    let key = format!("pay-{user}");
                    let paid = pay_with_key(app, user, order.id, &key).await;
                    if let Ok(paid) = paid {
                        let again = pay_with_key(app, user, order.id, &key).await.unwrap();
                        assert_eq!(paid.id, again.id, "a replay pays nothing");
                        if user % 8 == 0 {
                            let one = format!("refund-pen-{user}");
                            refund(app, order.id, &[(pen, 1)], true, &one)
                                .await
                                .unwrap();
                            let rest = format!("refund-rest-{user}");
                            let (_, first) =
                                refund(app, order.id, &[], false, &rest).await.unwrap();
                            let (_, again) =
                                refund(app, order.id, &[], false, &rest).await.unwrap();
                            assert_eq!(first.id, again.id, "a replay refunds nothing");
                        }
                    }
                }
                1 => {
                    let order = place(app, user, &[(pen, 1)]).await.unwrap();
                    let _ = app
                        .orders()
                        .cancel_order(ecommerce::proto::CancelOrderRequest {
                            order_id: order.id,
                            user_id: user,
                        })
                        .await;
                }
                2 => {
                    place(app, user, &[(ink, 3)]).await.unwrap();
                }
                _ => {
                    set_item(app, user, pen, 1).await.unwrap();
                    set_item(app, user, ink, 2).await.unwrap();
                    let order = checkout(app, user, &format!("checkout-{user}"))
                        .await
                        .unwrap();
                    let _ = pay(app, user, order.id).await;
                }
            }
        })
        .buffer_unordered(USERS as usize)
        .collect::<Vec<()>>()
        .await;
    println!("workload of {USERS} users done in {:?}", started.elapsed());
}

/// Waits until every order is closed (the expiry job has run) and every event delivered.
async fn settled(app: &TestApp) {
    let done = eventually(Duration::from_secs(60), || async {
        let (open, undelivered): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM orders WHERE status = 'PENDING_PAYMENT'),
                    (SELECT count(*) FROM outbox_events WHERE status <> 'DELIVERED')",
        )
        .fetch_one(&app.pg)
        .await
        .unwrap();
        open == 0 && undelivered == 0
    })
    .await;
    assert!(done, "orders still open or events undelivered after 60 s");
}

/// What Postgres says happened to one order.
struct Recorded {
    status: String,
    final_amount: i64,
    event_sequence: i32,
    payment_id: Option<i64>,
    /// The refunds' ids and amounts, in the order they committed.
    refunds: Vec<(i64, i64)>,
}

/// Judges what a consumer received against the record: `received` is every event as it
/// arrived (a re-sent event may appear twice, identical).
async fn assert_one_event_per_transition(app: &TestApp, received: Vec<CloudEvent>) {
    let mut orders: HashMap<i64, Recorded> =
        sqlx::query_as::<_, (i64, String, i64, i32, Option<i64>)>(
            "SELECT o.id, o.status, o.final_amount, o.event_sequence, p.id
             FROM orders o LEFT JOIN payments p ON p.order_id = o.id",
        )
        .fetch_all(&app.pg)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, status, final_amount, event_sequence, payment_id)| {
            let recorded = Recorded {
                status,
                final_amount,
                event_sequence,
                payment_id,
                refunds: Vec::new(),
            };
            (id, recorded)
        })
        .collect();
    let refunds: Vec<(i64, i64, i64)> =
        sqlx::query_as("SELECT order_id, id, amount FROM refunds ORDER BY id")
            .fetch_all(&app.pg)
            .await
            .unwrap();
    for (order_id, id, amount) in refunds {
        orders
            .get_mut(&order_id)
            .expect("a refund of a known order")
            .refunds
            .push((id, amount));
    }
    assert!(orders.len() as i64 >= USERS, "every user placed an order");

    let mut by_id: HashMap<String, CloudEvent> = HashMap::new();
    for event in received {
        if let Some(seen) = by_id.get(&event.id) {
            assert_eq!(seen.data, event.data, "a re-sent event is the same event");
        } else {
            by_id.insert(event.id.clone(), event);
        }
    }
    let outbox: HashSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT event_id FROM outbox_events")
            .fetch_all(&app.pg)
            .await
            .unwrap()
            .into_iter()
            .map(|id| id.to_string())
            .collect();
    let arrived: HashSet<String> = by_id.keys().cloned().collect();
    assert_eq!(
        arrived, outbox,
        "every event written arrived, and nothing else"
    );

    let mut per_order: BTreeMap<i64, BTreeMap<i64, &CloudEvent>> = BTreeMap::new();
    for event in by_id.values() {
        let numbered = per_order.entry(event.order_id).or_default();
        let sequence = event.sequence();
        assert!(
            numbered.insert(sequence, event).is_none(),
            "order {} has two events numbered {sequence}",
            event.order_id
        );
    }
    assert_eq!(
        per_order.keys().collect::<HashSet<_>>(),
        orders.keys().collect::<HashSet<_>>(),
        "every order has events, and every event an order"
    );
    let mut by_type: BTreeMap<&str, usize> = BTreeMap::new();
    for (order_id, events) in &per_order {
        let recorded = &orders[order_id];
        let closing = match recorded.status.as_str() {
            "PAID" | "PARTIALLY_REFUNDED" | "REFUNDED" => "PaymentCompleted",
            "CANCELLED" => "OrderCancelled",
            "EXPIRED" => "OrderExpired",
            other => panic!("order {order_id} is still {other}"),
        };
        let types: Vec<(i64, &str)> = events
            .iter()
            .map(|(sequence, e)| (*sequence, e.event_type.as_str()))
            .collect();
        let mut expected = vec![(1, "OrderPlaced"), (2, closing)];
        expected.extend((3..).zip(recorded.refunds.iter().map(|_| "OrderRefunded")));
        assert_eq!(
            types, expected,
            "order {order_id}: one event per transition, numbered in order"
        );
        assert_eq!(recorded.event_sequence as usize, expected.len());
        let placed = events[&1];
        assert_eq!(
            field_i64(&placed.message, "final_amount"),
            recorded.final_amount
        );
        assert_eq!(time_of(placed, "placed_at"), placed.time);
        let closed = events[&2];
        match closing {
            "PaymentCompleted" => {
                assert_eq!(
                    Some(field_i64(&closed.message, "payment_id")),
                    recorded.payment_id
                );
                assert_eq!(field_i64(&closed.message, "amount"), recorded.final_amount);
                assert_eq!(time_of(closed, "paid_at"), closed.time);
            }
            "OrderCancelled" => assert_eq!(time_of(closed, "cancelled_at"), closed.time),
            _ => assert_eq!(time_of(closed, "expired_at"), closed.time),
        }
        // Each refund's event, in the order the refunds committed, says what it gave back.
        let mut refunded = 0;
        for (n, &(refund_id, amount)) in (3..).zip(&recorded.refunds) {
            let event = events[&n];
            assert_eq!(field_i64(&event.message, "refund_id"), refund_id);
            assert_eq!(field_i64(&event.message, "amount"), amount);
            refunded += amount;
            assert_eq!(field_i64(&event.message, "refunded_amount"), refunded);
            assert_eq!(time_of(event, "refunded_at"), event.time);
        }
        for event in events.values() {
            *by_type.entry(event.event_type.as_str()).or_default() += 1;
        }
    }
    println!("{} orders, events by type: {by_type:?}", per_order.len());
    for kind in [
        "OrderPlaced",
        "PaymentCompleted",
        "OrderCancelled",
        "OrderExpired",
        "OrderRefunded",
    ] {
        assert!(
            by_type.get(kind).is_some_and(|n| *n > 0),
            "no {kind} in {by_type:?}"
        );
    }
}

/// A timestamp of the payload, which the CloudEvents `time` must equal (both are the time of
/// the transition's commit).
fn time_of(event: &CloudEvent, field: &str) -> chrono::DateTime<chrono::FixedOffset> {
    let text = event.data[field].as_str().expect("a timestamp");
    chrono::DateTime::parse_from_rfc3339(text).expect("RFC 3339")
}

#[sqlx::test(migrations = false)]
async fn a_workload_arrives_at_an_http_receiver_as_one_cloudevent_per_transition(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Shared::default();
    // A few failed deliveries: events are sent again, and must still count once.
    state.lock().unwrap().fail_first = 3;
    let receiver = start_receiver(listener, state.clone()).await;
    let app = spawn_app_with(db, |s| {
        http_sink(s, addr);
        settings(s);
    })
    .await;
    workload(&app).await;
    settled(&app).await;
    let received: Vec<CloudEvent> = state
        .lock()
        .unwrap()
        .events
        .iter()
        .map(CloudEvent::from_json)
        .collect();
    assert_one_event_per_transition(&app, received).await;
    app.stop().await;
    receiver.abort();
}

#[sqlx::test(migrations = false)]
async fn a_workload_arrives_on_nats_as_one_cloudevent_per_transition_on_its_type_subject(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let stream = TestStream::on(nats_url());
    let app = spawn_app_with(db, |s| {
        stream.settings(s);
        settings(s);
    })
    .await;
    workload(&app).await;
    settled(&app).await;
    let messages = stream.messages().await;
    let received: Vec<CloudEvent> = messages
        .iter()
        .map(|m| {
            let event = CloudEvent::from_nats(&m.headers, &m.body);
            let token = match event.event_type.as_str() {
                "OrderPlaced" => "order_placed",
                "OrderCancelled" => "order_cancelled",
                "OrderExpired" => "order_expired",
                "PaymentCompleted" => "payment_completed",
                "OrderRefunded" => "order_refunded",
                other => panic!("no {other} in this workload"),
            };
            assert_eq!(m.subject, stream.subject_of(token), "one subject per type");
            event
        })
        .collect();
    assert_one_event_per_transition(&app, received).await;
    app.stop().await;
    stream.delete().await;
}
