//! Reads the server's state after the run: through RPCs (GetCoupon, GetProduct, GetOrder for
//! every confirmed order, GetBalance for every tracked user) and, with `--database-url`, through
//! read-only queries for what no RPC shows.
//!
//! These reads are not part of the measurement. Each is retried on an unknown outcome; what
//! still cannot be read is left out, and the checks report it as unverified.

use std::collections::HashMap;

use anyhow::Context;
use futures::{StreamExt, stream};
use sqlx::{PgPool, postgres::PgPoolOptions};

use super::{
    connect::{Connections, retry},
    fixtures::Fixtures,
    judge::{DbCoupon, DbPayments, LedgerMismatch, OrderState},
    seen::Observed,
};
use ecommerce::proto::{
    GetBalanceRequest, GetCouponRequest, GetOrderRequest, GetProductRequest, OrderStatus,
    balance_service_client::BalanceServiceClient, coupon_service_client::CouponServiceClient,
    order_service_client::OrderServiceClient, product_service_client::ProductServiceClient,
};

#[derive(Debug, Default)]
pub struct Final {
    pub coupon_remaining: Option<i64>,
    pub stock_now: Option<i64>,
    pub orders: HashMap<i64, OrderState>,
    pub balances: HashMap<i64, i64>,
    pub db: DbFacts,
}

#[derive(Debug, Default)]
pub struct DbFacts {
    pub coupon: Option<DbCoupon>,
    pub payments: Option<DbPayments>,
    pub ledger: Option<Vec<LedgerMismatch>>,
}

pub async fn gather(
    connections: &Connections,
    fixtures: &Fixtures,
    observed: &Observed,
    concurrency: usize,
    db: Option<&PgPool>,
) -> anyhow::Result<Final> {
    let mut fin = Final::default();
    if let Some(coupon_id) = fixtures.coupon_id {
        let client = CouponServiceClient::new(connections.channel(0));
        fin.coupon_remaining = retry(|| {
            let mut client = client.clone();
            async move { client.get_coupon(GetCouponRequest { coupon_id }).await }
        })
        .await
        .ok()
        .and_then(|r| r.coupon)
        .map(|c| c.remaining_quantity);
    }
    if let Some(product_id) = fixtures.product_id {
        let client = ProductServiceClient::new(connections.channel(0));
        fin.stock_now = retry(|| {
            let mut client = client.clone();
            async move { client.get_product(GetProductRequest { product_id }).await }
        })
        .await
        .ok()
        .and_then(|r| r.product)
        .map(|p| p.stock);
        fin.orders = read_orders(connections, observed, product_id, concurrency).await;
    }
    fin.balances = read_balances(connections, observed, concurrency).await;
    if let Some(pool) = db {
        fin.db = query_db(pool, fixtures, observed)
            .await
            .context("checking Postgres")?;
    }
    Ok(fin)
}

async fn read_orders(
    connections: &Connections,
    observed: &Observed,
    product_id: i64,
    concurrency: usize,
) -> HashMap<i64, OrderState> {
    stream::iter(observed.orders.iter().enumerate())
        .map(|(i, placed)| {
            let client = OrderServiceClient::new(connections.channel(i));
            let request = GetOrderRequest {
                order_id: placed.order_id,
                user_id: placed.user_id,
            };
            async move {
                let order = retry(|| {
                    let mut client = client.clone();
                    async move { client.get_order(request).await }
                })
                .await
                .ok()?
                .order?;
                let units = order
                    .items
                    .iter()
                    .filter(|item| item.product_id == product_id)
                    .map(|item| i64::from(item.quantity))
                    .sum();
                let status = OrderStatus::try_from(order.status).unwrap_or_default();
                Some((placed.order_id, OrderState { status, units }))
            }
        })
        .buffer_unordered(concurrency)
        .filter_map(|state| async move { state })
        .collect()
        .await
}

async fn read_balances(
    connections: &Connections,
    observed: &Observed,
    concurrency: usize,
) -> HashMap<i64, i64> {
    stream::iter(observed.book.users().enumerate())
        .map(|(i, user_id)| {
            let client = BalanceServiceClient::new(connections.channel(i));
            async move {
                let balance = retry(|| {
                    let mut client = client.clone();
                    async move { client.get_balance(GetBalanceRequest { user_id }).await }
                })
                .await
                .ok()?
                .balance;
                Some((user_id, balance))
            }
        })
        .buffer_unordered(concurrency)
        .filter_map(|balance| async move { balance })
        .collect()
        .await
}

pub async fn connect_db(options: &sqlx::postgres::PgConnectOptions) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.clone())
        .await
        .context("cannot connect to --database-url")
}

async fn query_db(
    pool: &PgPool,
    fixtures: &Fixtures,
    observed: &Observed,
) -> Result<DbFacts, sqlx::Error> {
    let mut facts = DbFacts::default();
    if let Some(coupon_id) = fixtures.coupon_id {
        let (rows, distinct_users): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT user_id) FROM user_coupons WHERE coupon_id = $1",
        )
        .bind(coupon_id)
        .fetch_one(pool)
        .await?;
        let winners_missing: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM unnest($1::bigint[]) AS w(user_id)
             WHERE NOT EXISTS (
                 SELECT 1 FROM user_coupons u WHERE u.coupon_id = $2 AND u.user_id = w.user_id)",
        )
        .bind(&observed.coupon_winners)
        .bind(coupon_id)
        .fetch_one(pool)
        .await?;
        facts.coupon = Some(DbCoupon {
            rows,
            distinct_users,
            winners_missing,
        });
    }
    if fixtures.product_id.is_some() {
        let order_ids: Vec<i64> = observed.orders.iter().map(|o| o.order_id).collect();
        let (rows, max_per_order): (i64, i64) = sqlx::query_as(
            "SELECT coalesce(sum(n), 0)::bigint, coalesce(max(n), 0)::bigint FROM (
                 SELECT count(*) AS n FROM payments WHERE order_id = ANY($1) GROUP BY order_id
             ) AS per_order",
        )
        .bind(&order_ids)
        .fetch_one(pool)
        .await?;
        facts.payments = Some(DbPayments {
            rows,
            max_per_order,
        });
    }
    if !observed.book.is_empty() {
        let users: Vec<i64> = observed.book.users().collect();
        let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
            "SELECT b.user_id, b.balance, coalesce(sum(
                 CASE h.kind WHEN 'USE' THEN -h.amount ELSE h.amount END), 0)::bigint
             FROM user_balances b LEFT JOIN balance_history h ON h.user_id = b.user_id
             WHERE b.user_id = ANY($1)
             GROUP BY b.user_id, b.balance
             HAVING b.balance <> coalesce(sum(
                 CASE h.kind WHEN 'USE' THEN -h.amount ELSE h.amount END), 0)",
        )
        .bind(&users)
        .fetch_all(pool)
        .await?;
        facts.ledger = Some(
            rows.into_iter()
                .map(|(user, balance, ledger_sum)| LedgerMismatch {
                    user,
                    balance,
                    ledger_sum,
                })
                .collect(),
        );
    }
    Ok(facts)
}
