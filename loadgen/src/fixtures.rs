//! Set-up through the public API only, so a run works against any deployment: a coupon and a
//! product created with the Admin RPCs, every pool user's balance read before the run, buyers
//! funded with ChargeBalance, and holders issued the coupon with IssueCoupon.
//!
//! Guarantees: funding charges and the Admin creations carry an idempotency key, so a retried
//! charge never credits twice and a retried creation never makes a second coupon or product;
//! every balance the run will check is opened in the returned book with its value before the
//! run and every funding credit, so the checks never assume a user started at zero.

use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow};
use futures::{StreamExt, TryStreamExt, stream};

use super::{
    connect::{Connections, describe, retry},
    holders::{Holder, make_holders},
    ledger::BalanceBook,
    listing::Listing,
    scenario::{COUPON_DISCOUNT, PRICE, Plan, SECOND_PRICE},
    users::UserSpace,
};
use ecommerce::proto::{
    ChargeBalanceRequest, CreateCouponRequest, CreateProductRequest, Discount, FixedDiscount,
    GetBalanceRequest, ListOrdersRequest, ProductStatus,
    balance_service_client::BalanceServiceClient, discount,
    order_service_client::OrderServiceClient,
};

/// Issue window of the stampede coupon, around the moment of set-up.
const WINDOW_OPENED_BEFORE: Duration = Duration::from_secs(60);
const WINDOW_CLOSES_AFTER: Duration = Duration::from_secs(3600);
const COUPON_VALID_DAYS: i32 = 7;

pub struct Fixtures {
    pub coupon_id: Option<i64>,
    pub product_id: Option<i64>,
    /// Every product created, `product_id` first.
    pub products: Vec<i64>,
    /// Pool users who place orders.
    pub buyers: Vec<i64>,
    /// Pool users who receive random charges.
    pub charged: Vec<i64>,
    /// Coupon users issued the coupon before the run.
    pub holders: Vec<Holder>,
    /// Every pool user's balance before the run, plus the funding credits.
    pub book: BalanceBook,
}

/// A pool user's balance before the run and, for a buyer, the funding charge (ledger entry id,
/// amount).
struct Opened {
    user: i64,
    baseline: i64,
    funding: Option<(i64, i64)>,
}

pub async fn set_up(
    connections: &Connections,
    plan: &Plan,
    users: UserSpace,
    tag: &str,
    concurrency: usize,
) -> anyhow::Result<Fixtures> {
    let coupon_id = match plan.coupon_stock {
        Some(stock) => Some(create_coupon(connections, stock, tag).await?),
        None => None,
    };
    let holders = match coupon_id {
        Some(coupon_id) if plan.holders > 0 => {
            make_holders(connections, coupon_id, users, plan.holders, concurrency).await?
        }
        _ => Vec::new(),
    };
    let mut products = Vec::new();
    if let Some(stock) = plan.product_stock {
        for (i, price) in [PRICE, SECOND_PRICE]
            .into_iter()
            .take(plan.products)
            .enumerate()
        {
            products.push(create_product(connections, stock, price, &format!("{tag}-{i}")).await?);
        }
    }
    let product_id = products.first().copied();
    let pool: Vec<i64> = (0..plan.pool()).map(|i| users.pool_user(i)).collect();
    let opened: Vec<Opened> = stream::iter(pool.iter().enumerate())
        .map(|(i, &user)| {
            let client = BalanceServiceClient::new(connections.channel(i));
            let fund = (i as u64) < plan.buyers;
            async move {
                let baseline = retry(|| {
                    let mut client = client.clone();
                    async move {
                        client
                            .get_balance(GetBalanceRequest { user_id: user })
                            .await
                    }
                })
                .await
                .map_err(|s| anyhow!("GetBalance for user {user}: {}", describe(&s)))?
                .balance;
                if !fund {
                    return Ok::<_, anyhow::Error>(Opened {
                        user,
                        baseline,
                        funding: None,
                    });
                }
                let request = ChargeBalanceRequest {
                    user_id: user,
                    amount: plan.fund_each,
                    idempotency_key: format!("{tag}-fund"),
                };
                let charged = retry(|| {
                    let (mut client, request) = (client.clone(), request.clone());
                    async move { client.charge_balance(request).await }
                })
                .await
                .map_err(|s| anyhow!("funding user {user}: {}", describe(&s)))?;
                Ok(Opened {
                    user,
                    baseline,
                    funding: Some((charged.history_id, plan.fund_each)),
                })
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let mut book = BalanceBook::default();
    for o in opened {
        book.open(o.user, o.baseline);
        if let Some((history_id, amount)) = o.funding {
            book.credit(o.user, history_id, amount, None);
        }
    }
    Ok(Fixtures {
        coupon_id,
        product_id,
        products,
        buyers: pool[..plan.buyers as usize].to_vec(),
        charged: pool[..plan.charged as usize].to_vec(),
        holders,
        book,
    })
}

async fn create_coupon(connections: &Connections, stock: i64, tag: &str) -> anyhow::Result<i64> {
    let now = SystemTime::now();
    let request = CreateCouponRequest {
        name: format!("loadgen {tag} stampede"),
        discount: Some(Discount {
            kind: Some(discount::Kind::Fixed(FixedDiscount {
                amount: COUPON_DISCOUNT,
            })),
        }),
        min_order_amount: 0,
        total_quantity: stock,
        issue_starts_at: Some((now - WINDOW_OPENED_BEFORE).into()),
        issue_ends_at: Some((now + WINDOW_CLOSES_AFTER).into()),
        valid_days: COUPON_VALID_DAYS,
        // A retried creation returns the first coupon instead of creating another.
        idempotency_key: format!("{tag}-coupon"),
    };
    let admin = connections.admin();
    retry(|| {
        let (mut admin, request) = (admin.clone(), request.clone());
        async move { admin.create_coupon(request).await }
    })
    .await
    .map_err(|s| anyhow!("CreateCoupon: {}", describe(&s)))?
    .coupon
    .map(|c| c.id)
    .context("CreateCoupon answered without a coupon")
}

async fn create_product(
    connections: &Connections,
    stock: i64,
    price: i64,
    tag: &str,
) -> anyhow::Result<i64> {
    let request = CreateProductRequest {
        name: format!("loadgen {tag} hot product"),
        price,
        stock,
        status: ProductStatus::Selling.into(),
        idempotency_key: format!("{tag}-product"),
    };
    let admin = connections.admin();
    retry(|| {
        let (mut admin, request) = (admin.clone(), request.clone());
        async move { admin.create_product(request).await }
    })
    .await
    .map_err(|s| anyhow!("CreateProduct: {}", describe(&s)))?
    .product
    .map(|p| p.id)
    .context("CreateProduct answered without a product")
}

/// Makes sure the listed buyer has the orders the run needs. With the database: counts the
/// table and the buyer's orders (read-only) and refuses to run short; without it, only checks
/// that the buyer has a first page. Returns (orders in the table, the buyer's), when counted.
pub async fn require_orders(
    connections: &Connections,
    db: Option<&sqlx::PgPool>,
    listing: &Listing,
) -> anyhow::Result<Option<(i64, i64)>> {
    let user = listing.user_id;
    let hint = format!(
        "seed them first: scripts/seed-orders --user {user} --orders {}",
        listing.min_orders
    );
    let Some(db) = db else {
        let client = OrderServiceClient::new(connections.channel(0));
        let request = ListOrdersRequest {
            user_id: user,
            page_size: 1,
            ..Default::default()
        };
        let page = retry(|| {
            let (mut client, request) = (client.clone(), request.clone());
            async move { client.list_orders(request).await }
        })
        .await
        .map_err(|s| anyhow!("ListOrders for user {user}: {}", describe(&s)))?;
        anyhow::ensure!(!page.orders.is_empty(), "user {user} has no orders; {hint}");
        return Ok(None);
    };
    let (table, mine): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM orders WHERE user_id = $1)",
    )
    .bind(user)
    .fetch_one(db)
    .await
    .context("counting orders in --database-url")?;
    anyhow::ensure!(
        u64::try_from(mine).unwrap_or(0) >= listing.min_orders,
        "user {user} has {mine} orders, the run needs {}; {hint}",
        listing.min_orders
    );
    Ok(Some((table, mine)))
}
