//! Coupons as tests drive them: create and issue through the RPCs, stampede many users at once,
//! and read what Postgres and the Redis gate each believe, so a test can tell whether they agree.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use ecommerce::proto::{
    CreateCouponRequest, Discount, FixedDiscount, GetCouponRequest, IssueCouponRequest,
    PercentDiscount, discount,
};
use fred::interfaces::{HashesInterface, ListInterface};
use futures::future::join_all;
use prost_types::Timestamp;
use tonic::Code;

use crate::support::{TestApp, reason};

pub fn ts(at: DateTime<Utc>) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: at.timestamp(),
        nanos: 0,
    })
}

pub fn fixed(amount: i64) -> Option<Discount> {
    Some(Discount {
        kind: Some(discount::Kind::Fixed(FixedDiscount { amount })),
    })
}

pub fn percent(percent: i32, max_discount: i64) -> Option<Discount> {
    Some(Discount {
        kind: Some(discount::Kind::Percent(PercentDiscount {
            percent,
            max_discount,
        })),
    })
}

pub fn coupon_request(total: i64) -> CreateCouponRequest {
    let now = Utc::now();
    CreateCouponRequest {
        name: "flash sale 5,000 off".into(),
        discount: fixed(5_000),
        min_order_amount: 0,
        total_quantity: total,
        issue_starts_at: ts(now - chrono::Duration::minutes(1)),
        issue_ends_at: ts(now + chrono::Duration::hours(1)),
        valid_days: 7,
        idempotency_key: String::new(),
    }
}

pub async fn create_coupon_with(app: &TestApp, request: CreateCouponRequest) -> i64 {
    app.admin()
        .create_coupon(request)
        .await
        .expect("create coupon")
        .into_inner()
        .coupon
        .expect("coupon")
        .id
}

pub async fn create_coupon(app: &TestApp, total: i64) -> i64 {
    create_coupon_with(app, coupon_request(total)).await
}

pub async fn issue(app: &TestApp, coupon_id: i64, user_id: i64) -> Result<i64, tonic::Status> {
    app.coupons()
        .issue_coupon(IssueCouponRequest { user_id, coupon_id })
        .await
        .map(|r| r.into_inner().user_coupon.expect("user coupon").id)
}

/// Issues to every user at once; returns the winners and a count per (code, reason).
pub async fn stampede(
    app: &TestApp,
    coupon_id: i64,
    users: impl Iterator<Item = i64>,
) -> (Vec<i64>, HashMap<(Code, String), usize>) {
    let calls = users.map(|user| async move { (user, issue(app, coupon_id, user).await) });
    let mut winners = Vec::new();
    let mut refusals = HashMap::new();
    for (user, result) in join_all(calls).await {
        match result {
            Ok(_) => winners.push(user),
            Err(status) => *refusals.entry(reason(&status)).or_insert(0) += 1,
        }
    }
    (winners, refusals)
}

pub async fn issued_in_postgres(app: &TestApp, coupon_id: i64) -> Vec<i64> {
    sqlx::query_scalar("SELECT user_id FROM user_coupons WHERE coupon_id = $1 ORDER BY user_id")
        .bind(coupon_id)
        .fetch_all(&app.pg)
        .await
        .unwrap()
}

pub async fn remaining(app: &TestApp, coupon_id: i64) -> i64 {
    app.coupons()
        .get_coupon(GetCouponRequest { coupon_id })
        .await
        .unwrap()
        .into_inner()
        .coupon
        .unwrap()
        .remaining_quantity
}

pub fn sold_out() -> (Code, String) {
    (Code::ResourceExhausted, "COUPON_SOLD_OUT".into())
}

/// What the gate in Redis believes: holders and seats left.
pub async fn gate_state(app: &TestApp, coupon: i64) -> Option<(HashSet<i64>, i64)> {
    gate_state_in(&app.redis, &app.redis_prefix, coupon).await
}

/// The same, in the Redis `redis` reaches (a server the test runs apart from the shared one).
pub async fn gate_state_in(
    redis: &fred::clients::Client,
    prefix: &str,
    coupon: i64,
) -> Option<(HashSet<i64>, i64)> {
    let state = format!("{prefix}coupon:{{{coupon}}}:state");
    let holders = format!("{prefix}coupon:{{{coupon}}}:holders");
    let free = format!("{prefix}coupon:{{{coupon}}}:free");
    let fields: Vec<Option<i64>> = redis.hmget(&state, vec!["total", "next"]).await.ok()?;
    let (total, next) = (fields[0]?, fields[1]?);
    let free_len: i64 = redis.llen(&free).await.ok()?;
    let holder_map: HashMap<String, String> = redis.hgetall(&holders).await.ok()?;
    let users = holder_map
        .keys()
        .filter(|k| k.as_str() != "_")
        .map(|k| k.parse().unwrap())
        .collect();
    Some((users, (total - next + 1) + free_len))
}

/// True when the gate has exactly Postgres's holders and seats.
pub async fn gate_agrees(app: &TestApp, coupon: i64, total: i64) -> bool {
    gate_agrees_in(app, &app.redis, coupon, total).await
}

/// The same, for the gate in the Redis `redis` reaches.
pub async fn gate_agrees_in(
    app: &TestApp,
    redis: &fred::clients::Client,
    coupon: i64,
    total: i64,
) -> bool {
    let in_pg: HashSet<i64> = issued_in_postgres(app, coupon).await.into_iter().collect();
    match gate_state_in(redis, &app.redis_prefix, coupon).await {
        Some((holders, left)) => holders == in_pg && left == total - in_pg.len() as i64,
        None => false,
    }
}
