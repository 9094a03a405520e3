//! The order and product lists inside the workload: what any list must show at any moment
//! (only the orders its filter keeps, newest first, none twice, amounts that add up), the
//! admin's stock adjustments retried with their keys, and, once the workload is over, every
//! list against the record and the books.

use std::collections::{HashMap, HashSet};

use ecommerce::proto::{
    AdjustStockRequest, AdminServiceListOrdersRequest, AdminServiceListProductsRequest, Order,
    OrderStatus,
};
use futures::future::join_all;
use rand::{Rng, rngs::StdRng, seq::IndexedRandom};

use super::{
    USERS,
    record::{Record, Shared},
    shop::Shop,
};
use crate::support::{
    TestApp,
    lists::{admin_order, admin_orders, admin_products, key, walk},
    shop::stock,
};

/// What is wrong with a list of orders whatever the moment: an order its filter does not keep,
/// keys not strictly newest first (an order twice), an order without items or whose amounts do
/// not add up.
fn problems(
    what: &str,
    orders: &[Order],
    user: Option<i64>,
    statuses: &[i32],
    product: Option<i64>,
) -> Vec<String> {
    let mut found = Vec::new();
    for pair in orders.windows(2) {
        if key(&pair[1]) >= key(&pair[0]) {
            found.push(format!(
                "{what}: order {} listed after {}",
                pair[1].id, pair[0].id
            ));
        }
    }
    for o in orders {
        let kept = user.is_none_or(|u| o.user_id == u)
            && (statuses.is_empty() || statuses.contains(&o.status))
            && product.is_none_or(|p| o.items.iter().any(|i| i.product_id == p));
        let sum: i64 = o
            .items
            .iter()
            .map(|i| i.unit_price * i64::from(i.quantity))
            .sum();
        if !kept || o.items.is_empty() || sum != o.total_amount {
            found.push(format!("{what}: listed {o:?}"));
        }
    }
    found
}

fn some_statuses(rng: &mut StdRng) -> Vec<i32> {
    let all = [
        OrderStatus::PendingPayment,
        OrderStatus::Paid,
        OrderStatus::Cancelled,
        OrderStatus::Expired,
    ];
    if rng.random_bool(0.6) {
        return Vec::new();
    }
    let n = rng.random_range(1..=2);
    all.choose_multiple(rng, n).map(|s| *s as i32).collect()
}

/// A buyer's whole list, walked page by page while the workload changes it.
pub(super) async fn list_op(app: &TestApp, shared: &Shared, rng: &mut StdRng) {
    let user = rng.random_range(1..=USERS);
    let statuses = some_statuses(rng);
    let page_size = rng.random_range(5..=50);
    let pages = walk(app, user, &statuses, page_size).await;
    shared.note("list orders (every page)", &pages, &[]);
    if let Ok(pages) = pages {
        let orders: Vec<Order> = pages.into_iter().flat_map(|p| p.orders).collect();
        let what = format!("ListOrders user {user} statuses {statuses:?}");
        for problem in problems(&what, &orders, Some(user), &statuses, None) {
            shared.violation(problem);
        }
    }
}

/// One of the admin's reads: an order by id, the first pages of a filtered list of every
/// buyer's orders, or the products.
pub(super) async fn admin_read_op(app: &TestApp, shop: &Shop, shared: &Shared, rng: &mut StdRng) {
    match rng.random_range(0..3) {
        0 => {
            let Some((order_id, user)) = shared.with(|r| r.order_list.choose(rng).copied()) else {
                return;
            };
            let read = admin_order(app, order_id).await;
            shared.note("admin get order", &read, &[]);
            if let Ok(order) = read {
                let paid = shared.with(|r| r.orders.get(&order_id).map(|p| p.final_amount));
                if order.user_id != user || paid.is_none_or(|f| f != order.final_amount) {
                    shared.violation(format!("GetOrder {order_id} read {order:?}"));
                }
            }
        }
        1 => {
            let user = rng.random_bool(0.5).then(|| rng.random_range(1..=USERS));
            let product = rng
                .random_bool(0.5)
                .then(|| shop.products.choose(rng).unwrap().0);
            let statuses = some_statuses(rng);
            let request = AdminServiceListOrdersRequest {
                user_id: user.unwrap_or(0),
                statuses: statuses.clone(),
                product_id: product.unwrap_or(0),
                page_size: rng.random_range(10..=100),
                ..Default::default()
            };
            let listed = app
                .admin()
                .list_orders(request.clone())
                .await
                .map(|r| r.into_inner().orders);
            shared.note("admin list orders (first page)", &listed, &[]);
            if let Ok(orders) = listed {
                let what = format!("admin ListOrders {request:?}");
                for problem in problems(&what, &orders, user, &statuses, product) {
                    shared.violation(problem);
                }
            }
        }
        _ => {
            let listed = admin_products(app, AdminServiceListProductsRequest::default()).await;
            shared.note("admin list products (every page)", &listed, &[]);
            if let Ok(products) = listed {
                let ids: HashSet<i64> = products.iter().map(|p| p.id).collect();
                if shop.products.iter().any(|p| !ids.contains(&p.0))
                    || !ids.contains(&shop.adjusted)
                {
                    shared.violation(format!("ListProducts missed products: {ids:?}"));
                }
            }
        }
    }
}

/// A keyed stock adjustment of the product set aside for them, sometimes retried with its key
/// and sometimes sent twice at once: each key must move the stock once.
pub(super) async fn adjust_op(
    app: &TestApp,
    shop: &Shop,
    shared: &Shared,
    rng: &mut StdRng,
    key: String,
) {
    let delta = *[-3i64, -2, -1, 1, 2, 3].choose(rng).unwrap();
    let request = AdjustStockRequest {
        product_id: shop.adjusted,
        delta,
        idempotency_key: key.clone(),
    };
    let call = |request: AdjustStockRequest| async move {
        app.admin().adjust_stock(request).await.map(drop)
    };
    let sends = if rng.random_bool(0.2) { 2 } else { 1 };
    let mut results = join_all((0..sends).map(|_| call(request.clone()))).await;
    if rng.random_bool(0.3) {
        results.push(call(request).await);
    }
    for result in &results {
        shared.note("adjust stock (keyed, retried)", result, &[]);
    }
    if results.iter().any(Result::is_ok) {
        shared.with(|r| r.adjustments.insert(key, delta));
    }
}

/// Once the workload is over and settled: every buyer's list is exactly the orders placed for
/// them, the statuses filter keeps exactly what the books say, the admin's list is every order,
/// and the adjusted product moved once per key.
pub(super) async fn check_lists(app: &TestApp, shop: &Shop, record: &Record) -> Vec<String> {
    let mut found = Vec::new();
    let placed: HashMap<i64, i64> = record.orders.iter().map(|(id, p)| (*id, p.user)).collect();
    let adjusted: i64 = record.adjustments.values().sum();
    let paid = OrderStatus::Paid as i32;
    for user in 1..=USERS {
        let listed: Vec<Order> = walk(app, user, &[], 100)
            .await
            .expect("walk")
            .into_iter()
            .flat_map(|p| p.orders)
            .collect();
        found.extend(problems(
            "settled ListOrders",
            &listed,
            Some(user),
            &[],
            None,
        ));
        let ids: HashSet<i64> = listed.iter().map(|o| o.id).collect();
        let want: HashSet<i64> = placed
            .iter()
            .filter(|(_, u)| **u == user)
            .map(|(id, _)| *id)
            .collect();
        if ids != want {
            found.push(format!("ListOrders user {user}: {ids:?}, placed {want:?}"));
        }
        let paid_listed: HashSet<i64> = walk(app, user, &[paid], 100)
            .await
            .expect("walk")
            .into_iter()
            .flat_map(|p| p.orders.into_iter().map(|o| o.id))
            .collect();
        let paid_stored: HashSet<i64> =
            sqlx::query_scalar("SELECT id FROM orders WHERE user_id = $1 AND status = 'PAID'")
                .bind(user)
                .fetch_all(&app.pg)
                .await
                .unwrap()
                .into_iter()
                .collect();
        if paid_listed != paid_stored {
            found.push(format!(
                "ListOrders user {user} PAID: {paid_listed:?}, stored {paid_stored:?}"
            ));
        }
    }
    let every = admin_orders(
        app,
        AdminServiceListOrdersRequest {
            page_size: 100,
            ..Default::default()
        },
    )
    .await
    .expect("admin walk");
    found.extend(problems(
        "settled admin ListOrders",
        &every,
        None,
        &[],
        None,
    ));
    let every: HashSet<i64> = every.iter().map(|o| o.id).collect();
    if every != placed.keys().copied().collect() {
        found.push(format!(
            "admin ListOrders lists {} orders, {} were placed",
            every.len(),
            placed.len()
        ));
    }
    let now = stock(app, shop.adjusted).await;
    if now != shop.adjusted_stock + adjusted {
        found.push(format!(
            "adjusted product: stock {now}, {} + {adjusted} applied once per key",
            shop.adjusted_stock
        ));
    }
    found
}
