//! The catalog. Stock moves only through conditional updates: orders take it (see the orders
//! module), the admin sets it outright (optionally only if it still is what they saw) or
//! adjusts it by a delta that can never take it below zero. Every admin change bumps the
//! product's stock generation, which retires older sold-out markers.

use sqlx::{PgConnection, PgExecutor};

use super::split_page;
use crate::{
    domain::{
        DisplayName, NewProduct, PageSize, PageToken, Product, ProductChanges, ProductId,
        ProductStatus, StatusSet,
    },
    store::StoreError,
};

/// The columns that make up a row; a macro so that queries stay `&'static str`.
macro_rules! product_columns {
    () => {
        "id, name, price, stock, status, created_at, updated_at"
    };
}

/// Why a conditional stock change changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StockRefusal {
    NoProduct,
    /// The stock is `0`, not what the change expected or needed.
    StockIs(i64),
}

/// A product as a change left it, with its stock generation.
#[derive(sqlx::FromRow)]
pub struct Changed {
    #[sqlx(flatten)]
    pub product: Product,
    pub stock_gen: i64,
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
    conn: &mut PgConnection,
    id: ProductId,
    changes: ProductChanges,
) -> Result<Result<Changed, StockRefusal>, StoreError> {
    let changed = sqlx::query_as(concat!(
        "UPDATE products SET
             name = COALESCE($2, name),
             price = COALESCE($3, price),
             stock = COALESCE($4, stock),
             status = COALESCE($5, status),
             stock_gen = stock_gen + 1,
             updated_at = now()
         WHERE id = $1 AND ($6::bigint IS NULL OR stock = $6)
         RETURNING stock_gen, ",
        product_columns!(),
        ""
    ))
    .bind(id)
    .bind(changes.name.as_ref().map(DisplayName::as_str))
    .bind(changes.price)
    .bind(changes.stock)
    .bind(changes.status)
    .bind(changes.expected_stock)
    .fetch_optional(&mut *conn)
    .await?;
    match changed {
        Some(changed) => Ok(Ok(changed)),
        None => refusal(conn, id).await.map(Err),
    }
}

/// Adds `delta` units (negative: takes them away) in one conditional statement: never below
/// zero, and an increase never past `max_stock`. A decrease always passes the upper bound
/// (releases may have put the stock above it).
pub async fn adjust_stock(
    conn: &mut PgConnection,
    id: ProductId,
    delta: i64,
    max_stock: i64,
) -> Result<Result<Changed, StockRefusal>, StoreError> {
    // numeric: the sum of two bigints cannot overflow while it is being checked.
    let changed = sqlx::query_as(concat!(
        "UPDATE products SET
             stock = stock + $2,
             stock_gen = stock_gen + CASE WHEN $2 > 0 THEN 1 ELSE 0 END,
             updated_at = now()
         WHERE id = $1
             AND stock::numeric + $2 >= 0
             AND ($2 < 0 OR stock::numeric + $2 <= $3)
         RETURNING stock_gen, ",
        product_columns!(),
        ""
    ))
    .bind(id)
    .bind(delta)
    .bind(max_stock)
    .fetch_optional(&mut *conn)
    .await?;
    match changed {
        Some(changed) => Ok(Ok(changed)),
        None => refusal(conn, id).await.map(Err),
    }
}

/// Why a conditional change to product `id` matched no row.
async fn refusal(conn: &mut PgConnection, id: ProductId) -> Result<StockRefusal, StoreError> {
    let stock: Option<i64> = sqlx::query_scalar("SELECT stock FROM products WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?;
    Ok(stock.map_or(StockRefusal::NoProduct, StockRefusal::StockIs))
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

/// Products of the statuses kept, by id, starting after the page token: one scan of
/// products_status_idx per status, merged (an index scan of the page's rows, whatever the mix).
pub async fn page(
    db: impl PgExecutor<'_>,
    statuses: &StatusSet<ProductStatus>,
    page_size: PageSize,
    after: Option<PageToken>,
) -> Result<(Vec<Product>, Option<PageToken>), StoreError> {
    let kept: Vec<&str> = statuses.kept().into_iter().map(|s| s.as_str()).collect();
    let mut rows: Vec<Product> = sqlx::query_as(concat!(
        "SELECT p.* FROM unnest($1::text[]) AS s(status)
         CROSS JOIN LATERAL (
             SELECT ",
        product_columns!(),
        " FROM products
             WHERE status = s.status AND id > $2
             ORDER BY id
             LIMIT $3
         ) p
         ORDER BY p.id
         LIMIT $3"
    ))
    .bind(&kept)
    .bind(after.map_or(0, PageToken::last_key))
    .bind(page_size.get() + 1)
    .fetch_all(db)
    .await?;
    let next = split_page(&mut rows, page_size, |p| p.id.get());
    Ok((rows, next))
}
