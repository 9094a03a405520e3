//! The shop as tests drive it through the RPCs: stock the catalog, fund a buyer, place and pay
//! orders, check that money adds up.

use ecommerce::proto::{
    Cart, ChargeBalanceRequest, CheckoutRequest, CreateProductRequest, GetBalanceRequest,
    GetCartRequest, GetOrderRequest, GetProductRequest, Order, OrderLine, PayRequest, Payment,
    PlaceOrderRequest, ProductStatus, SetItemRequest,
};
use std::collections::HashSet;

use futures::{StreamExt, stream};
use sqlx::{Connection, PgConnection, postgres::PgConnectOptions};
use tonic::Status;

use crate::support::TestApp;

pub async fn create_product(app: &TestApp, name: &str, price: i64, stock: i64) -> i64 {
    create_product_with_status(app, name, price, stock, ProductStatus::Selling).await
}

pub async fn create_product_with_status(
    app: &TestApp,
    name: &str,
    price: i64,
    stock: i64,
    status: ProductStatus,
) -> i64 {
    app.admin()
        .create_product(CreateProductRequest {
            name: name.into(),
            price,
            stock,
            status: status.into(),
            idempotency_key: String::new(),
        })
        .await
        .expect("create product")
        .into_inner()
        .product
        .expect("product")
        .id
}

pub async fn charge(app: &TestApp, user_id: i64, amount: i64) {
    app.balance()
        .charge_balance(ChargeBalanceRequest {
            user_id,
            amount,
            idempotency_key: String::new(),
        })
        .await
        .expect("charge");
}

pub async fn balance(app: &TestApp, user_id: i64) -> i64 {
    app.balance()
        .get_balance(GetBalanceRequest { user_id })
        .await
        .expect("balance")
        .into_inner()
        .balance
}

pub fn lines(items: &[(i64, i32)]) -> Vec<OrderLine> {
    items
        .iter()
        .map(|(product_id, quantity)| OrderLine {
            product_id: *product_id,
            quantity: *quantity,
        })
        .collect()
}

pub async fn place_with(app: &TestApp, request: PlaceOrderRequest) -> Result<Order, Status> {
    app.orders()
        .place_order(request)
        .await
        .map(|r| r.into_inner().order.expect("order"))
}

pub async fn place(app: &TestApp, user_id: i64, items: &[(i64, i32)]) -> Result<Order, Status> {
    place_with(
        app,
        PlaceOrderRequest {
            user_id,
            items: lines(items),
            ..Default::default()
        },
    )
    .await
}

pub async fn set_item(
    app: &TestApp,
    user_id: i64,
    product_id: i64,
    quantity: i32,
) -> Result<Cart, Status> {
    app.carts()
        .set_item(SetItemRequest {
            user_id,
            product_id,
            quantity,
        })
        .await
        .map(|r| r.into_inner().cart.expect("cart"))
}

pub async fn get_cart(app: &TestApp, user_id: i64) -> Cart {
    app.carts()
        .get_cart(GetCartRequest { user_id })
        .await
        .expect("get cart")
        .into_inner()
        .cart
        .expect("cart")
}

pub async fn checkout(app: &TestApp, user_id: i64, key: &str) -> Result<Order, Status> {
    checkout_with(
        app,
        CheckoutRequest {
            user_id,
            user_coupon_id: 0,
            idempotency_key: key.into(),
        },
    )
    .await
}

pub async fn checkout_with(app: &TestApp, request: CheckoutRequest) -> Result<Order, Status> {
    app.carts()
        .checkout(request)
        .await
        .map(|r| r.into_inner().order.expect("order"))
}

pub async fn pay(app: &TestApp, user_id: i64, order_id: i64) -> Result<Payment, Status> {
    pay_with_key(app, user_id, order_id, "").await
}

pub async fn pay_with_key(
    app: &TestApp,
    user_id: i64,
    order_id: i64,
    key: &str,
) -> Result<Payment, Status> {
    app.payments()
        .pay(PayRequest {
            order_id,
            user_id,
            idempotency_key: key.into(),
        })
        .await
        .map(|r| r.into_inner().payment.expect("payment"))
}

/// Each user buys a one-unit gift card and pays for it, eight at a time; returns the payment
/// ids. Payments never wait on the data platform.
pub async fn pay_orders(app: &TestApp, users: impl IntoIterator<Item = i64>) -> HashSet<i64> {
    let product = create_product(app, "gift card", 10_000, 1_000_000).await;
    stream::iter(users)
        .map(|user| async move {
            charge(app, user, 10_000).await;
            let order = place(app, user, &[(product, 1)]).await.unwrap();
            pay(app, user, order.id)
                .await
                .expect("payments never wait on the sink")
                .id
        })
        .buffer_unordered(8)
        .collect()
        .await
}

pub async fn get_order(app: &TestApp, user_id: i64, order_id: i64) -> Result<Order, Status> {
    app.orders()
        .get_order(GetOrderRequest { order_id, user_id })
        .await
        .map(|r| r.into_inner().order.expect("order"))
}

pub async fn stock(app: &TestApp, product_id: i64) -> i64 {
    app.products()
        .get_product(GetProductRequest { product_id })
        .await
        .expect("product")
        .into_inner()
        .product
        .expect("product")
        .stock
}

/// Asserts the balance equals the sum of the user's ledger, and returns it.
pub async fn assert_ledger_matches(app: &TestApp, user_id: i64) -> i64 {
    let ledger: Option<i64> = sqlx::query_scalar(
        "SELECT sum(CASE kind WHEN 'USE' THEN -amount ELSE amount END)::bigint
         FROM balance_history WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    let balance = balance(app, user_id).await;
    assert!(balance >= 0, "negative balance {balance}");
    assert_eq!(
        balance,
        ledger.unwrap_or(0),
        "balance of user {user_id} != its ledger"
    );
    balance
}

/// Holds a product's row lock until dropped, so orders for it wait in Postgres: a slow path.
pub async fn lock_product(db: &PgConnectOptions, product: i64) -> PgConnection {
    let mut conn = PgConnection::connect_with(db).await.unwrap();
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    sqlx::query("SELECT id FROM products WHERE id = $1 FOR UPDATE")
        .bind(product)
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

/// Puts `orders` past their payment deadline, for the expiry job to close.
pub async fn make_overdue(app: &TestApp, orders: &[i64]) {
    sqlx::query("UPDATE orders SET expires_at = now() - interval '1 second' WHERE id = ANY($1)")
        .bind(orders)
        .execute(&app.pg)
        .await
        .unwrap();
}
