//! Order and product lists as tests read them: one page, or every page of a walk, with each
//! page's request time and key range, so a test can judge what a page had to contain.

use std::time::Instant;

use ecommerce::proto::{
    AdminServiceGetOrderRequest, AdminServiceListOrdersRequest, AdminServiceListProductsRequest,
    ListOrdersRequest, Order, Product,
};
use tonic::Status;

use crate::support::TestApp;

/// An order's place in a newest-first list: (created_at in microseconds, id), compared
/// descending.
pub type Key = (i64, i64);

pub fn key(order: &Order) -> Key {
    let at = order.created_at.expect("created_at");
    (
        at.seconds * 1_000_000 + i64::from(at.nanos) / 1_000,
        order.id,
    )
}

/// One page of a walk: when it was asked for and what it returned.
pub struct Page {
    pub sent: Instant,
    pub orders: Vec<Order>,
    pub next_page_token: String,
}

pub async fn list_orders(app: &TestApp, request: ListOrdersRequest) -> Result<Page, Status> {
    let sent = Instant::now();
    let response = app.orders().list_orders(request).await?.into_inner();
    Ok(Page {
        sent,
        orders: response.orders,
        next_page_token: response.next_page_token,
    })
}

/// Every page of a buyer's list, first to last.
pub async fn walk(
    app: &TestApp,
    user_id: i64,
    statuses: &[i32],
    page_size: i32,
) -> Result<Vec<Page>, Status> {
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = list_orders(
            app,
            ListOrdersRequest {
                user_id,
                statuses: statuses.to_vec(),
                page_size,
                page_token,
            },
        )
        .await?;
        page_token = page.next_page_token.clone();
        pages.push(page);
        if page_token.is_empty() {
            return Ok(pages);
        }
    }
}

/// Every order of an AdminService/ListOrders walk (the request's token is replaced page by page).
pub async fn admin_orders(
    app: &TestApp,
    mut request: AdminServiceListOrdersRequest,
) -> Result<Vec<Order>, Status> {
    let mut orders = Vec::new();
    loop {
        let page = app.admin().list_orders(request.clone()).await?.into_inner();
        orders.extend(page.orders);
        if page.next_page_token.is_empty() {
            return Ok(orders);
        }
        request.page_token = page.next_page_token;
    }
}

/// Every product of an AdminService/ListProducts walk.
pub async fn admin_products(
    app: &TestApp,
    mut request: AdminServiceListProductsRequest,
) -> Result<Vec<Product>, Status> {
    let mut products = Vec::new();
    loop {
        let page = app
            .admin()
            .list_products(request.clone())
            .await?
            .into_inner();
        products.extend(page.products);
        if page.next_page_token.is_empty() {
            return Ok(products);
        }
        request.page_token = page.next_page_token;
    }
}

/// Any order, through AdminService/GetOrder.
pub async fn admin_order(app: &TestApp, order_id: i64) -> Result<Order, Status> {
    app.admin()
        .get_order(AdminServiceGetOrderRequest { order_id })
        .await
        .map(|r| r.into_inner().order.expect("order"))
}
