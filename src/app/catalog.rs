//! The catalog: listing what is on sale, reading a product, and the admin's changes.
//!
//! Invariant: stock never goes below zero, whoever changes it and however concurrently (every
//! change is one conditional statement), and any increase clears the sold-out shortcuts on
//! every replica. Listing and reading may be served by a standby (`DATABASE_READ_URL`),
//! at most `READ_MAX_LAG_MS` behind; the admin's changes go to the primary.

use std::sync::Arc;

use sqlx::{PgPool, Postgres, pool::PoolConnection};

use super::sold_out::SoldOut;
use crate::{
    domain::{
        MAX_STOCK, NewProduct, PageSize, PageToken, Product, ProductChanges, ProductId, Restock,
    },
    error::{AppError, Resource},
    metrics,
    store::postgres::{
        products::{self, Changed, StockRefusal},
        replica::{Reads, Source},
    },
};

/// The catalog flows.
pub struct Catalog {
    pg: PgPool,
    reads: Arc<Reads>,
    sold_out: Arc<SoldOut>,
}

/// A connection for a read that may be `READ_MAX_LAG_MS` stale, counted by where it leads.
pub(super) async fn stale_ok_read(reads: &Reads) -> Result<PoolConnection<Postgres>, AppError> {
    let (conn, source) = reads.acquire().await?;
    metrics::db_read(match source {
        Source::Standby => "standby",
        Source::Primary => "primary",
    });
    Ok(conn)
}

impl Catalog {
    pub fn new(pg: PgPool, reads: Arc<Reads>, sold_out: Arc<SoldOut>) -> Self {
        Self {
            pg,
            reads,
            sold_out,
        }
    }

    pub async fn selling(
        &self,
        page_size: PageSize,
        after: Option<PageToken>,
    ) -> Result<(Vec<Product>, Option<PageToken>), AppError> {
        let mut conn = stale_ok_read(&self.reads).await?;
        Ok(products::selling_page(&mut *conn, page_size, after).await?)
    }

    pub async fn product(&self, id: ProductId) -> Result<Product, AppError> {
        let mut conn = stale_ok_read(&self.reads).await?;
        products::get(&mut *conn, id)
            .await?
            .ok_or(product_not_found(id))
    }

    pub async fn create(&self, new: NewProduct) -> Result<Product, AppError> {
        Ok(products::create(&self.pg, new).await?)
    }

    /// Whether the catalog has any product at all.
    pub(super) async fn is_empty(&self) -> Result<bool, AppError> {
        Ok(!products::any_exist(&self.pg).await?)
    }

    /// Changes the fields that are set; with `expected_stock`, only if the stock still is that
    /// (ABORTED with the current stock otherwise).
    pub async fn update(
        &self,
        id: ProductId,
        changes: ProductChanges,
    ) -> Result<Product, AppError> {
        let mut conn = self.pg.acquire().await?;
        match products::update(&mut conn, id, changes).await? {
            // New stock or a new status: let Postgres decide the next order, not a stale marker.
            Ok(changed) => Ok(self.restocked(id, changed).await),
            Err(StockRefusal::NoProduct) => Err(product_not_found(id)),
            Err(StockRefusal::StockIs(stock)) => Err(AppError::StockChanged { stock }),
        }
    }

    /// Adds `delta` units to the stock (takes them away when negative), atomically: never below
    /// zero (OUT_OF_STOCK), an increase never past [`MAX_STOCK`] (OUT_OF_RANGE).
    pub async fn adjust_stock(&self, id: ProductId, delta: i64) -> Result<Product, AppError> {
        if delta > MAX_STOCK {
            return Err(AppError::StockLimitExceeded { max: MAX_STOCK });
        }
        let mut conn = self.pg.acquire().await?;
        match products::adjust_stock(&mut conn, id, delta, MAX_STOCK).await? {
            Ok(changed) if delta > 0 => Ok(self.restocked(id, changed).await),
            Ok(changed) => Ok(changed.product),
            Err(StockRefusal::NoProduct) => Err(product_not_found(id)),
            // A removal fails only for want of stock, an addition only at the limit (the stock
            // read back may have moved since).
            Err(StockRefusal::StockIs(_)) if delta < 0 => Err(AppError::OutOfStock {
                product_id: id.get(),
            }),
            Err(StockRefusal::StockIs(_)) => Err(AppError::StockLimitExceeded { max: MAX_STOCK }),
        }
    }

    async fn restocked(&self, id: ProductId, changed: Changed) -> Product {
        self.sold_out
            .clear(vec![Restock {
                product: id,
                stock_gen: changed.stock_gen,
            }])
            .await;
        changed.product
    }
}

fn product_not_found(id: ProductId) -> AppError {
    AppError::NotFound {
        resource: Resource::Product,
        id: id.get(),
    }
}
