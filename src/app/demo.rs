//! A small demo catalog for local runs (`SEED_DEMO_DATA=true`, set by `scripts/run`).
//! Written through the same use cases as the Admin RPCs, and only into an empty catalog, so
//! restarting never duplicates it.

use super::{App, NewProduct};
use crate::{
    domain::{DisplayName, ProductStatus, Won},
    error::AppError,
    store::postgres::products,
};

const PRODUCTS: &[(&str, i64, i64, ProductStatus)] = &[
    ("Mechanical keyboard", 89_000, 100, ProductStatus::Selling),
    ("Wireless mouse", 32_000, 250, ProductStatus::Selling),
    ("27-inch monitor", 329_000, 20, ProductStatus::Selling),
    ("USB-C hub", 45_000, 0, ProductStatus::SoldOut),
    ("Laptop stand", 39_000, 50, ProductStatus::Stopped),
];

impl App {
    /// Returns how many products were created (0 when the catalog already had some).
    pub async fn seed_demo_catalog(&self) -> Result<usize, AppError> {
        if products::any_exist(self.pg()).await? {
            return Ok(0);
        }
        for (name, price, stock, status) in PRODUCTS {
            self.create_product(NewProduct {
                name: DisplayName::parse((*name).to_owned(), "name")?,
                price: Won::new(*price),
                stock: *stock,
                status: *status,
            })
            .await?;
        }
        Ok(PRODUCTS.len())
    }
}
