//! Demo data for local runs (`SEED_DEMO_DATA=true`, set by `scripts/run`): a small catalog and
//! one coupon open for issue, so the walk-through `scripts/run` prints (scripts/walkthrough.txt)
//! shows every flow. Written through the same use cases as the Admin RPCs, and only into an
//! empty catalog, so restarting never duplicates it.

use std::sync::Arc;

use chrono::{Duration, Utc};

use super::{Catalog, Coupons};
use crate::{
    domain::{
        Discount, DisplayName, IssueWindow, NewCoupon, NewProduct, ProductStatus, ValidDays, Won,
    },
    error::AppError,
};

const PRODUCTS: &[(&str, i64, i64, ProductStatus)] = &[
    ("Mechanical keyboard", 89_000, 100, ProductStatus::Selling),
    ("Wireless mouse", 32_000, 250, ProductStatus::Selling),
    ("27-inch monitor", 329_000, 20, ProductStatus::Selling),
    ("USB-C hub", 45_000, 0, ProductStatus::SoldOut),
    ("Laptop stand", 39_000, 50, ProductStatus::Stopped),
];

/// What seeding created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seeded {
    pub products: usize,
    pub coupons: usize,
}

/// Seeds the demo data into an empty catalog; creates nothing when the catalog has products.
pub async fn seed_demo(catalog: &Catalog, coupons: &Arc<Coupons>) -> Result<Seeded, AppError> {
    if !catalog.is_empty().await? {
        return Ok(Seeded::default());
    }
    for (name, price, stock, status) in PRODUCTS {
        catalog
            .create(
                NewProduct {
                    name: DisplayName::parse((*name).to_owned(), "name")?,
                    price: Won::new(*price),
                    stock: *stock,
                    status: *status,
                },
                None,
            )
            .await?;
    }
    // Open from a minute ago, so the walk-through's IssueCoupon is inside the window even if
    // this replica's clock is a little ahead of the caller's.
    let now = Utc::now();
    coupons
        .create(
            NewCoupon {
                name: DisplayName::parse("Welcome: 10% off, up to 20,000 won".to_owned(), "name")?,
                discount: Discount::percent(10, 20_000)?,
                min_order_amount: Won::new(50_000),
                total_quantity: 100,
                window: IssueWindow::parse(now - Duration::minutes(1), now + Duration::days(3650))?,
                valid_days: ValidDays::parse(30)?,
            },
            None,
        )
        .await?;
    Ok(Seeded {
        products: PRODUCTS.len(),
        coupons: 1,
    })
}
