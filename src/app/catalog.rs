//! The catalog: listing what is on sale, reading a product, and the admin's changes.
//!
//! Invariant: stock never goes below zero, whoever changes it and however concurrently (every
//! change is one conditional statement), and any increase clears the sold-out shortcuts on
//! every replica. Listing and reading may be served by a standby (`DATABASE_READ_URL`),
//! at most `READ_MAX_LAG_MS` behind; the admin's changes and lists go to the primary. A creation
//! or stock adjustment retried with its idempotency key (admin scope) happens once: the key is
//! claimed in the change's own transaction, so a concurrent retry waits for the first attempt
//! and replays it, and an attempt abandoned at any await (a deadline, a disconnect) rolls back
//! with its claim, leaving the retry to do the work.

use std::sync::Arc;

use sqlx::{PgPool, Postgres, pool::PoolConnection};

use super::{
    idempotency::{NextAction, next_action},
    sold_out::SoldOut,
};
use crate::{
    domain::{
        IdempotencyKey, KeyScope, MAX_STOCK, NewProduct, PageSize, PageToken, Product,
        ProductChanges, ProductId, ProductStatus, Restock, StatusSet,
    },
    error::{AppError, Resource},
    metrics,
    store::postgres::{
        self as postgres,
        idempotency::{self, Operation},
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
        let selling = StatusSet::products([ProductStatus::Selling]);
        let mut conn = stale_ok_read(&self.reads).await?;
        Ok(products::page(&mut *conn, &selling, page_size, after).await?)
    }

    pub async fn product(&self, id: ProductId) -> Result<Product, AppError> {
        let mut conn = stale_ok_read(&self.reads).await?;
        products::get(&mut *conn, id)
            .await?
            .ok_or(product_not_found(id))
    }

    /// Products of the statuses kept, by id (AdminService/ListProducts).
    pub async fn page(
        &self,
        statuses: &StatusSet<ProductStatus>,
        page_size: PageSize,
        after: Option<PageToken>,
    ) -> Result<(Vec<Product>, Option<PageToken>), AppError> {
        Ok(products::page(&self.pg, statuses, page_size, after).await?)
    }

    /// Creates a product; with a key, a retry returns the product the first call created.
    pub async fn create(
        &self,
        new: NewProduct,
        key: Option<&IdempotencyKey>,
    ) -> Result<Product, AppError> {
        let Some(key) = key else {
            return Ok(products::create(&self.pg, new).await?);
        };
        let operation = Operation::CreateProduct;
        let mut tx = self.pg.begin().await?;
        let fingerprint = || {
            format!(
                "{:?}",
                (
                    new.name.as_str(),
                    new.price.get(),
                    new.stock,
                    new.status.as_str()
                )
            )
        };
        if let NextAction::ReturnSaved(id) =
            next_action(&mut tx, KeyScope::Admin, operation, Some(key), fingerprint).await?
        {
            return self.saved_product(&mut tx, id).await;
        }
        let product = products::create(&mut *tx, new).await?;
        idempotency::complete(&mut tx, KeyScope::Admin, operation, key, product.id.get()).await?;
        postgres::commit(tx).await?;
        Ok(product)
    }

    /// The product a replayed admin key names.
    async fn saved_product(
        &self,
        conn: &mut sqlx::PgConnection,
        id: i64,
    ) -> Result<Product, AppError> {
        let id = ProductId::parse(id, "product_id").map_err(|_| saved_id_broken(id))?;
        products::get(conn, id)
            .await?
            .ok_or_else(|| saved_id_broken(id.get()))
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
    /// zero (OUT_OF_STOCK), an increase never past [`MAX_STOCK`] (OUT_OF_RANGE). With a key, a
    /// retry applies nothing more and answers the product as it is now; a refusal keeps no key.
    pub async fn adjust_stock(
        &self,
        id: ProductId,
        delta: i64,
        key: Option<&IdempotencyKey>,
    ) -> Result<Product, AppError> {
        let Some(key) = key else {
            let mut conn = self.pg.acquire().await?;
            let changed = self.adjusted(&mut conn, id, delta).await?;
            return Ok(self.after_adjust(id, delta, changed).await);
        };
        let operation = Operation::AdjustStock;
        let mut tx = self.pg.begin().await?;
        let fingerprint = || format!("{id}:{delta}");
        if let NextAction::ReturnSaved(saved) =
            next_action(&mut tx, KeyScope::Admin, operation, Some(key), fingerprint).await?
        {
            return self.saved_product(&mut tx, saved).await;
        }
        let changed = self.adjusted(&mut tx, id, delta).await?;
        idempotency::complete(&mut tx, KeyScope::Admin, operation, key, id.get()).await?;
        postgres::commit(tx).await?;
        Ok(self.after_adjust(id, delta, changed).await)
    }

    /// An increase clears the sold-out markers (after the commit that made it visible).
    async fn after_adjust(&self, id: ProductId, delta: i64, changed: Changed) -> Product {
        if delta > 0 {
            self.restocked(id, changed).await
        } else {
            changed.product
        }
    }

    /// The conditional change itself, or why it changed nothing.
    async fn adjusted(
        &self,
        conn: &mut sqlx::PgConnection,
        id: ProductId,
        delta: i64,
    ) -> Result<Changed, AppError> {
        if delta > MAX_STOCK {
            return Err(AppError::StockLimitExceeded { max: MAX_STOCK });
        }
        match products::adjust_stock(conn, id, delta, MAX_STOCK).await? {
            Ok(changed) => Ok(changed),
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

/// A key whose saved result names no product: the record is broken, not the request.
fn saved_id_broken(id: i64) -> AppError {
    AppError::internal(format!(
        "an admin idempotency key names product {id}, which does not exist"
    ))
}

fn product_not_found(id: ProductId) -> AppError {
    AppError::NotFound {
        resource: Resource::Product,
        id: id.get(),
    }
}
