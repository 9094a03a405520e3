//! A small demo catalog for local runs (`SEED_DEMO_DATA=true`, set by `scripts/run`).
//! Written through the same use cases as the Admin RPCs, and only into an empty catalog, so
//! restarting never duplicates it.

use super::Catalog;
use crate::{
    domain::{DisplayName, NewProduct, ProductStatus, Won},
    error::AppError,
};

const PRODUCTS: &[(&str, i64, i64, ProductStatus)] = &[
    ("Mechanical keyboard", 89_000, 100, ProductStatus::Selling),
    ("Wireless mouse", 32_000, 250, ProductStatus::Selling),
    ("27-inch monitor", 329_000, 20, ProductStatus::Selling),
    ("USB-C hub", 45_000, 0, ProductStatus::SoldOut),
    ("Laptop stand", 39_000, 50, ProductStatus::Stopped),
];

/// Returns how many products were created (0 when the catalog already had some).
pub async fn seed_catalog(catalog: &Catalog) -> Result<usize, AppError> {
    if !catalog.is_empty().await? {
        return Ok(0);
    }
    for (name, price, stock, status) in PRODUCTS {
        catalog
            .create(NewProduct {
                name: DisplayName::parse((*name).to_owned(), "name")?,
                price: Won::new(*price),
                stock: *stock,
                status: *status,
            })
            .await?;
    }
    Ok(PRODUCTS.len())
}
