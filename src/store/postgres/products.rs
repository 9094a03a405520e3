//! The catalog. Stock moves only through conditional updates (see the orders module); here the
//! admin sets it outright.

use sqlx::PgExecutor;

use super::split_page;
use crate::{
    domain::{DisplayName, PageSize, PageToken, Product, ProductId, ProductStatus, Won},
    store::StoreError,
};

/// The columns that make up a row; a macro so that queries stay `&'static str`.
macro_rules! product_columns {
    () => {
        "id, name, price, stock, status, created_at, updated_at"
    };
}

pub struct NewProduct {
    pub name: DisplayName,
    pub price: Won,
    pub stock: i64,
    pub status: ProductStatus,
}

/// Fields left `None` keep their value.
#[derive(Default)]
pub struct ProductChanges {
    pub name: Option<DisplayName>,
    pub price: Option<Won>,
    pub stock: Option<i64>,
    pub status: Option<ProductStatus>,
}

pub async fn create(db: impl PgExecutor<'_>, new: NewProduct) -> Result<Product, StoreError> {
    let product = sqlx::query_as(concat!(
        "INSERT INTO products (name, price, stock, status) VALUES ($1, $2, $3, $4)
         RETURNING ",
        product_columns!(),
        ""
    ))
    .bind(new.name.as_str())
    .bind(new.price)
    .bind(new.stock)
    .bind(new.status)
    .fetch_one(db)
    .await?;
    Ok(product)
}

pub async fn update(
    db: impl PgExecutor<'_>,
    id: ProductId,
    changes: ProductChanges,
) -> Result<Option<Product>, StoreError> {
    let product = sqlx::query_as(concat!(
        "UPDATE products SET
             name = COALESCE($2, name),
             price = COALESCE($3, price),
             stock = COALESCE($4, stock),
             status = COALESCE($5, status),
             updated_at = now()
         WHERE id = $1
         RETURNING ",
        product_columns!(),
        ""
    ))
    .bind(id)
    .bind(changes.name.as_ref().map(DisplayName::as_str))
    .bind(changes.price)
    .bind(changes.stock)
    .bind(changes.status)
    .fetch_optional(db)
    .await?;
    Ok(product)
}

pub async fn get(db: impl PgExecutor<'_>, id: ProductId) -> Result<Option<Product>, StoreError> {
    let product = sqlx::query_as(concat!(
        "SELECT ",
        product_columns!(),
        " FROM products WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await?;
    Ok(product)
}

pub async fn any_exist(db: impl PgExecutor<'_>) -> Result<bool, StoreError> {
    let exists = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM products)")
        .fetch_one(db)
        .await?;
    Ok(exists)
}

/// The products among `ids` that exist, in no particular order.
pub async fn get_many(db: impl PgExecutor<'_>, ids: &[i64]) -> Result<Vec<Product>, StoreError> {
    let products = sqlx::query_as(concat!(
        "SELECT ",
        product_columns!(),
        " FROM products WHERE id = ANY($1)"
    ))
    .bind(ids)
    .fetch_all(db)
    .await?;
    Ok(products)
}

/// SELLING products by id, starting after the page token.
pub async fn selling_page(
    db: impl PgExecutor<'_>,
    page_size: PageSize,
    after: Option<PageToken>,
) -> Result<(Vec<Product>, Option<PageToken>), StoreError> {
    let mut rows: Vec<Product> = sqlx::query_as(concat!(
        "SELECT ",
        product_columns!(),
        " FROM products
         WHERE status = 'SELLING' AND id > $1
         ORDER BY id
         LIMIT $2"
    ))
    .bind(after.map_or(0, PageToken::last_key))
    .bind(page_size.get() + 1)
    .fetch_all(db)
    .await?;
    let next = split_page(&mut rows, page_size, |p| p.id.get());
    Ok((rows, next))
}
