//! Order lists: OrderService/ListOrders and AdminService GetOrder/ListOrders/ListProducts.
//!
//! The paging promise (src/app/orders/read.rs) is judged page by page against 32 concurrent
//! writers: no order twice in a walk, keys strictly newest first, and every order acknowledged
//! before a page was asked for is on that page when its key is in the page's range.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ecommerce::proto::{
    AdminServiceGetOrderRequest, AdminServiceListOrdersRequest, AdminServiceListProductsRequest,
    CancelOrderRequest, ListOrdersRequest, ListProductsRequest, Order, OrderStatus, ProductStatus,
};
use futures::{StreamExt, future::join_all, stream};
use prost_types::Timestamp;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::support::{
    TestApp, assert_error, assert_no_violations, invalid_field,
    lists::{Key, admin_order, admin_orders, admin_products, key, list_orders, walk},
    shop::{charge, create_product, create_product_with_status, pay, place},
    spawn_app, spawn_app_with,
};

const WRITERS: usize = 32;
const BUYER: i64 = 7;
const OTHER: i64 = 8;
/// Small pages, so that a walk takes many statements while the writers run.
const PAGE: i32 = 7;
const WALKS: usize = 6;

/// What a writer was told: the order and when the answer arrived.
struct Acked {
    order: Order,
    at: Instant,
}

#[sqlx::test(migrations = false)]
async fn pages_never_skip_or_repeat_an_order_while_32_writers_place_orders(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app_with(db, |s| {
        s.set("DATABASE_MAX_CONNECTIONS", 24)
            .set("DATABASE_ACQUIRE_TIMEOUT_MS", 30_000);
    })
    .await;
    let mut products = Vec::new();
    for name in ["pen", "ink", "paper"] {
        products.push(create_product(&app, name, 100, 1_000_000).await);
    }
    charge(&app, BUYER, 1_000_000_000).await;
    charge(&app, OTHER, 1_000_000_000).await;
    let acked = Mutex::new(Vec::new());
    let record = |order: Order| {
        acked.lock().unwrap().push(Acked {
            order,
            at: Instant::now(),
        })
    };
    // A history to page through before the writers start.
    let app_ref = &app;
    let history: Vec<Order> = stream::iter(0..150)
        .map(|i| {
            let product = products[i % products.len()];
            async move { place(app_ref, BUYER, &[(product, 1)]).await.unwrap() }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    history.into_iter().for_each(record);

    let done = AtomicBool::new(false);
    let violations = Mutex::new(Vec::new());
    let writer = |w: usize| {
        let (app, products, done, record, violations) =
            (&app, &products, &done, &record, &violations);
        async move {
            let mut n = 0;
            while !done.load(Ordering::Relaxed) {
                n += 1;
                let user = if (w + n).is_multiple_of(4) {
                    OTHER
                } else {
                    BUYER
                };
                let first = products[(w + n) % products.len()];
                let second = products[(w + n + 1) % products.len()];
                let items: &[(i64, i32)] = if n.is_multiple_of(3) {
                    &[(first, 1), (second, 2)]
                } else {
                    &[(first, 1)]
                };
                match place(app, user, items).await {
                    Ok(order) => {
                        // Some orders change status while they are listed.
                        if n.is_multiple_of(5) {
                            let cancelled = app
                                .orders()
                                .cancel_order(CancelOrderRequest {
                                    order_id: order.id,
                                    user_id: user,
                                })
                                .await;
                            if let Err(e) = cancelled {
                                violations.lock().unwrap().push(format!("cancel: {e:?}"));
                            }
                        }
                        record(order);
                    }
                    Err(e) => violations.lock().unwrap().push(format!("place: {e:?}")),
                }
            }
        }
    };
    let reader = async {
        let mut walks = Vec::new();
        for _ in 0..WALKS {
            walks.push(walk(&app, BUYER, &[], PAGE).await.expect("walk"));
        }
        done.store(true, Ordering::Relaxed);
        walks
    };
    let (walks, _) = tokio::join!(reader, join_all((0..WRITERS).map(writer)));

    let acked = acked.into_inner().unwrap();
    let by_id: HashMap<i64, &Acked> = acked.iter().map(|a| (a.order.id, a)).collect();
    let mut violations = violations.into_inner().unwrap();
    let (mut judged, mut during) = (0usize, 0usize);
    let first_sent = walks[0][0].sent;
    for (w, pages) in walks.iter().enumerate() {
        let mut previous: Option<Key> = None;
        // The key range of page i is [key of its last order, key of the previous page's last).
        let mut upper: Option<Key> = None;
        for (p, page) in pages.iter().enumerate() {
            let lower = match page.orders.last() {
                Some(last) if !page.next_page_token.is_empty() => Some(key(last)),
                _ => None,
            };
            for order in &page.orders {
                let k = key(order);
                if previous.is_some_and(|prev| k >= prev) {
                    violations.push(format!("walk {w} page {p}: {k:?} after {previous:?}"));
                }
                previous = Some(k);
                match by_id.get(&order.id) {
                    Some(a) if a.order.user_id == BUYER && a.order.items == order.items => {}
                    other => violations.push(format!(
                        "walk {w} page {p}: listed {order:?}, placed {:?}",
                        other.map(|a| &a.order)
                    )),
                }
            }
            for a in acked.iter().filter(|a| a.order.user_id == BUYER) {
                let k = key(&a.order);
                let in_range = lower.is_none_or(|l| k >= l) && upper.is_none_or(|u| k < u);
                if a.at >= page.sent || !in_range {
                    continue;
                }
                judged += 1;
                if a.at > first_sent {
                    during += 1;
                }
                if !page.orders.iter().any(|o| o.id == a.order.id) {
                    violations.push(format!(
                        "walk {w} page {p}: order {} acknowledged before the page was asked \
                         for, key {k:?} in its range [{lower:?}, {upper:?}), is missing",
                        a.order.id
                    ));
                }
            }
            upper = lower;
        }
    }
    let placed_during = acked.iter().filter(|a| a.at > first_sent).count();
    let pages: usize = walks.iter().map(Vec::len).sum();
    eprintln!(
        "{WALKS} walks, {pages} pages of {PAGE}; {} orders placed, {placed_during} while walking; \
         {judged} (order, page) pairs judged, {during} of them placed while walking",
        acked.len()
    );
    assert!(
        placed_during >= WRITERS,
        "the writers barely ran ({placed_during} orders)"
    );
    assert_no_violations(&violations);
    app.stop().await;
}

/// A shop at rest: two buyers, three products, orders in every status, placed in two rounds so
/// that a creation instant separates them.
struct Placed {
    orders: Vec<Order>,
    products: [i64; 3],
    /// Every order of the first round was created before it, every one of the second after.
    between: Timestamp,
    between_micros: i64,
}

async fn placed_in_two_rounds(app: &TestApp) -> Placed {
    let a = create_product(app, "apple", 1_000, 1_000).await;
    let b = create_product(app, "bread", 2_000, 1_000).await;
    let c = create_product(app, "cheese", 3_000, 1_000).await;
    for user in [1, 2] {
        charge(app, user, 1_000_000).await;
    }
    let mut orders = Vec::new();
    let first: [(i64, &[(i64, i32)]); 5] = [
        (1, &[(a, 1)]),
        (1, &[(b, 2)]),
        (1, &[(a, 1), (b, 1)]),
        (2, &[(a, 3)]),
        (2, &[(c, 1)]),
    ];
    for (user, items) in first {
        orders.push(place(app, user, items).await.unwrap());
    }
    let between_micros = orders.iter().map(key).max().unwrap().0 + 1;
    let between = Timestamp {
        seconds: between_micros.div_euclid(1_000_000),
        nanos: (between_micros.rem_euclid(1_000_000) * 1_000) as i32,
    };
    // created_at is the placing transaction's start: make sure the second round starts later.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let second: [(i64, &[(i64, i32)]); 3] =
        [(1, &[(c, 1)]), (1, &[(a, 2), (c, 1)]), (2, &[(b, 1)])];
    for (user, items) in second {
        orders.push(place(app, user, items).await.unwrap());
    }
    // Paid: user 1's second and seventh, user 2's fourth; cancelled: user 1's first.
    for i in [1, 6] {
        pay(app, 1, orders[i].id).await.unwrap();
    }
    pay(app, 2, orders[3].id).await.unwrap();
    app.orders()
        .cancel_order(CancelOrderRequest {
            order_id: orders[0].id,
            user_id: 1,
        })
        .await
        .unwrap();
    // The orders as they are now, from the single-order read the lists must agree with.
    let mut now = Vec::new();
    for order in &orders {
        now.push(admin_order(app, order.id).await.unwrap());
    }
    Placed {
        orders: now,
        products: [a, b, c],
        between,
        between_micros,
    }
}

/// The ids `keep` selects, newest first.
fn expected(placed: &Placed, keep: impl Fn(&Order) -> bool) -> Vec<i64> {
    let mut kept: Vec<&Order> = placed.orders.iter().filter(|o| keep(o)).collect();
    kept.sort_by_key(|o| std::cmp::Reverse(key(o)));
    kept.into_iter().map(|o| o.id).collect()
}

fn has(order: &Order, product: i64) -> bool {
    order.items.iter().any(|i| i.product_id == product)
}

#[sqlx::test(migrations = false)]
async fn filters_keep_exactly_their_orders_newest_first(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let placed = placed_in_two_rounds(&app).await;
    let [a, _, c] = placed.products;
    let between = placed.between;
    let (paid, pending, cancelled, expired) = (
        OrderStatus::Paid as i32,
        OrderStatus::PendingPayment as i32,
        OrderStatus::Cancelled as i32,
        OrderStatus::Expired as i32,
    );
    let after = |o: &Order| key(o).0 >= placed.between_micros;
    let status = |o: &Order, s: &[i32]| s.contains(&o.status);

    // The buyer's list, with and without statuses, in pages of 2.
    for (user, statuses) in [
        (1, vec![]),
        (1, vec![paid]),
        (1, vec![paid, cancelled, paid]),
        (1, vec![expired]),
        (2, vec![pending]),
        (3, vec![]),
    ] {
        let pages = walk(&app, user, &statuses, 2).await.unwrap();
        let listed: Vec<&Order> = pages.iter().flat_map(|p| &p.orders).collect();
        let ids: Vec<i64> = listed.iter().map(|o| o.id).collect();
        let want = expected(&placed, |o| {
            o.user_id == user && (statuses.is_empty() || status(o, &statuses))
        });
        assert_eq!(ids, want, "ListOrders user {user} statuses {statuses:?}");
        for order in listed {
            let read = placed.orders.iter().find(|o| o.id == order.id).unwrap();
            assert_eq!(order, read, "a listed order is the order GetOrder reads");
        }
    }

    // The admin's list: every filter alone and combined.
    let cases: Vec<(AdminServiceListOrdersRequest, Vec<i64>)> = vec![
        (Default::default(), expected(&placed, |_| true)),
        (
            AdminServiceListOrdersRequest {
                user_id: 2,
                ..Default::default()
            },
            expected(&placed, |o| o.user_id == 2),
        ),
        (
            AdminServiceListOrdersRequest {
                statuses: vec![pending],
                ..Default::default()
            },
            expected(&placed, |o| status(o, &[pending])),
        ),
        (
            AdminServiceListOrdersRequest {
                product_id: a,
                ..Default::default()
            },
            expected(&placed, |o| has(o, a)),
        ),
        (
            AdminServiceListOrdersRequest {
                product_id: a,
                user_id: 1,
                statuses: vec![pending, paid],
                ..Default::default()
            },
            expected(&placed, |o| {
                has(o, a) && o.user_id == 1 && status(o, &[pending, paid])
            }),
        ),
        (
            AdminServiceListOrdersRequest {
                created_after: Some(between),
                ..Default::default()
            },
            expected(&placed, after),
        ),
        (
            AdminServiceListOrdersRequest {
                created_before: Some(between),
                user_id: 1,
                statuses: vec![paid, cancelled],
                ..Default::default()
            },
            expected(&placed, |o| {
                !after(o) && o.user_id == 1 && status(o, &[paid, cancelled])
            }),
        ),
        (
            AdminServiceListOrdersRequest {
                created_after: Some(between),
                product_id: c,
                ..Default::default()
            },
            expected(&placed, |o| after(o) && has(o, c)),
        ),
        (
            AdminServiceListOrdersRequest {
                created_after: Some(between),
                user_id: 1,
                ..Default::default()
            },
            expected(&placed, |o| after(o) && o.user_id == 1),
        ),
    ];
    for (request, want) in cases {
        for page_size in [2, 0] {
            let listed = admin_orders(
                &app,
                AdminServiceListOrdersRequest {
                    page_size,
                    ..request.clone()
                },
            )
            .await
            .unwrap();
            let ids: Vec<i64> = listed.iter().map(|o| o.id).collect();
            assert_eq!(ids, want, "AdminService/ListOrders {request:?}");
        }
    }
    let missing = admin_order(&app, 10_000).await;
    assert_error(missing, Code::NotFound, "ORDER_NOT_FOUND");
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn admin_reads_need_the_admin_token(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "lamp", 100, 10).await;
    charge(&app, 1, 10_000).await;
    let order = place(&app, 1, &[(product, 1)]).await.unwrap();
    for token in [None, Some("wrong-token")] {
        let mut admin = app.admin_with_token(token);
        let get = admin
            .get_order(AdminServiceGetOrderRequest { order_id: order.id })
            .await;
        assert_error(get, Code::Unauthenticated, "UNAUTHENTICATED");
        let list = admin
            .list_orders(AdminServiceListOrdersRequest::default())
            .await;
        assert_error(list, Code::Unauthenticated, "UNAUTHENTICATED");
        let products = admin
            .list_products(AdminServiceListProductsRequest::default())
            .await;
        assert_error(products, Code::Unauthenticated, "UNAUTHENTICATED");
    }
    let read = admin_order(&app, order.id).await.unwrap();
    assert_eq!(read, order, "the admin reads any buyer's order");
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn pages_default_to_twenty_and_bad_requests_name_their_field(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;
    let product = create_product(&app, "stamp", 0, 1_000).await;
    create_product(&app, "envelope", 0, 1_000).await;
    for _ in 0..25 {
        place(&app, 1, &[(product, 1)]).await.unwrap();
    }
    let request = |page_size, page_token: &str| ListOrdersRequest {
        user_id: 1,
        statuses: vec![],
        page_size,
        page_token: page_token.into(),
    };
    let first = list_orders(&app, request(0, "")).await.unwrap();
    assert_eq!(first.orders.len(), 20, "page_size 0 means 20");
    let rest = list_orders(&app, request(100, &first.next_page_token))
        .await
        .unwrap();
    assert_eq!((rest.orders.len(), rest.next_page_token.as_str()), (5, ""));

    let products_token = app
        .products()
        .list_products(ListProductsRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    let bad_orders = [
        (request(101, ""), "page_size"),
        (request(-1, ""), "page_size"),
        (request(1, "garbage!"), "page_token"),
        (request(1, &products_token), "page_token"),
        (
            ListOrdersRequest {
                user_id: 0,
                ..request(1, "")
            },
            "user_id",
        ),
        (
            ListOrdersRequest {
                statuses: vec![2, 0],
                ..request(1, "")
            },
            "statuses[1]",
        ),
        (
            ListOrdersRequest {
                statuses: vec![42],
                ..request(1, "")
            },
            "statuses[0]",
        ),
    ];
    assert!(!products_token.is_empty());
    for (bad, field) in bad_orders {
        let status = list_orders(&app, bad.clone())
            .await
            .err()
            .unwrap_or_else(|| panic!("{bad:?} was not refused"));
        assert_eq!(invalid_field(&status), field);
    }
    let ts = |seconds| Some(Timestamp { seconds, nanos: 0 });
    let bad_admin = [
        (
            AdminServiceListOrdersRequest {
                user_id: -1,
                ..Default::default()
            },
            "user_id",
        ),
        (
            AdminServiceListOrdersRequest {
                product_id: -5,
                ..Default::default()
            },
            "product_id",
        ),
        (
            AdminServiceListOrdersRequest {
                created_after: ts(1_700_000_000),
                created_before: ts(1_700_000_000),
                ..Default::default()
            },
            "created_before",
        ),
        (
            AdminServiceListOrdersRequest {
                created_after: ts(i64::MAX),
                ..Default::default()
            },
            "created_after",
        ),
        (
            AdminServiceListOrdersRequest {
                page_token: "AgAAAAAAAAAB".into(),
                ..Default::default()
            },
            "page_token",
        ),
    ];
    for (bad, field) in bad_admin {
        let status = app.admin().list_orders(bad).await.unwrap_err();
        assert_eq!(invalid_field(&status), field);
    }
    let bad_products = app
        .admin()
        .list_products(AdminServiceListProductsRequest {
            statuses: vec![0],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&bad_products), "statuses[0]");
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn the_admin_lists_products_of_every_status(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let statuses = [
        ProductStatus::Selling,
        ProductStatus::Stopped,
        ProductStatus::SoldOut,
    ];
    let mut created = Vec::new();
    for i in 0..12 {
        let status = statuses[i % 3];
        let id = create_product_with_status(&app, &format!("item {i}"), 100, 5, status).await;
        created.push((id, status as i32));
    }
    let ids = |keep: &dyn Fn(i32) -> bool| -> Vec<i64> {
        created
            .iter()
            .filter(|(_, s)| keep(*s))
            .map(|(id, _)| *id)
            .collect()
    };
    let stopped = ProductStatus::Stopped as i32;
    let sold_out = ProductStatus::SoldOut as i32;
    for (statuses, want) in [
        (vec![], ids(&|_| true)),
        (vec![stopped], ids(&|s| s == stopped)),
        (vec![sold_out, stopped], ids(&|s| s != 1)),
    ] {
        let listed = admin_products(
            &app,
            AdminServiceListProductsRequest {
                statuses: statuses.clone(),
                page_size: 5,
                page_token: String::new(),
            },
        )
        .await
        .unwrap();
        let listed: Vec<i64> = listed.iter().map(|p| p.id).collect();
        assert_eq!(listed, want, "statuses {statuses:?}");
    }
    let public = app
        .products()
        .list_products(ListProductsRequest {
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .products;
    let public: Vec<i64> = public.iter().map(|p| p.id).collect();
    assert_eq!(
        public,
        ids(&|s| s == 1),
        "ProductService still lists SELLING only"
    );
    app.stop().await;
}
