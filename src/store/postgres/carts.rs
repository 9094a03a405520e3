//! Carts. The `carts` row is the cart's lock: every change locks it first (creating it if
//! needed), so the line limit holds under concurrent changes and a checkout empties exactly the
//! lines it ordered.

use sqlx::PgConnection;

use crate::{
    domain::{Cart, CartLine, OrderLine, ProductId, ProductStatus, Quantity, UserId, Won},
    store::StoreError,
};

/// Why a line was not added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddRefusal {
    /// The cart already holds this many lines, none of them for this product.
    Full,
    NoProduct,
}

/// Locks the user's cart row (creating it), so the statements after it see every change
/// committed before and none made after until this transaction ends.
async fn lock(tx: &mut PgConnection, user_id: UserId) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO carts (user_id) VALUES ($1)
         ON CONFLICT (user_id) DO UPDATE SET updated_at = now()",
    )
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Sets a product's quantity, adding the line only while the cart holds fewer than `max_lines`.
pub async fn set_line(
    tx: &mut PgConnection,
    user_id: UserId,
    product_id: ProductId,
    quantity: Quantity,
    max_lines: usize,
) -> Result<Result<(), AddRefusal>, StoreError> {
    lock(tx, user_id).await?;
    // A new statement: under READ COMMITTED it sees every line committed before the lock.
    let written = sqlx::query(
        "INSERT INTO cart_items (user_id, product_id, quantity)
         SELECT $1, $2, $3
         WHERE EXISTS (SELECT 1 FROM cart_items WHERE user_id = $1 AND product_id = $2)
            OR (SELECT count(*) FROM cart_items WHERE user_id = $1) < $4
         ON CONFLICT (user_id, product_id) DO UPDATE SET quantity = EXCLUDED.quantity",
    )
    .bind(user_id)
    .bind(product_id)
    .bind(quantity.get())
    .bind(max_lines as i64)
    .execute(&mut *tx)
    .await;
    match written {
        Ok(done) if done.rows_affected() == 0 => Ok(Err(AddRefusal::Full)),
        Ok(_) => Ok(Ok(())),
        Err(e) => {
            let e = StoreError::from(e);
            if e.violated_constraint() == Some("cart_items_product_fk") {
                Ok(Err(AddRefusal::NoProduct))
            } else {
                Err(e)
            }
        }
    }
}

pub async fn remove_line(
    tx: &mut PgConnection,
    user_id: UserId,
    product_id: ProductId,
) -> Result<(), StoreError> {
    lock(tx, user_id).await?;
    sqlx::query("DELETE FROM cart_items WHERE user_id = $1 AND product_id = $2")
        .bind(user_id)
        .bind(product_id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Empties the cart and returns what it held, by product id.
pub async fn take_lines(
    tx: &mut PgConnection,
    user_id: UserId,
) -> Result<Vec<OrderLine>, StoreError> {
    lock(tx, user_id).await?;
    let mut rows: Vec<(ProductId, i32)> =
        sqlx::query_as("DELETE FROM cart_items WHERE user_id = $1 RETURNING product_id, quantity")
            .bind(user_id)
            .fetch_all(&mut *tx)
            .await?;
    rows.sort_unstable_by_key(|(product, _)| *product);
    rows.into_iter()
        .map(|(product_id, quantity)| {
            Ok(OrderLine {
                product_id,
                quantity: stored_quantity(quantity)?,
            })
        })
        .collect()
}

#[derive(sqlx::FromRow)]
struct LineRow {
    product_id: ProductId,
    quantity: i32,
    name: String,
    price: Won,
    status: ProductStatus,
    stock: i64,
}

/// The cart with each product as it is now.
pub async fn get(conn: &mut PgConnection, user_id: UserId) -> Result<Cart, StoreError> {
    let rows: Vec<LineRow> = sqlx::query_as(
        "SELECT c.product_id, c.quantity, p.name, p.price, p.status, p.stock
         FROM cart_items c JOIN products p ON p.id = c.product_id
         WHERE c.user_id = $1
         ORDER BY c.product_id",
    )
    .bind(user_id)
    .fetch_all(&mut *conn)
    .await?;
    let lines = rows
        .into_iter()
        .map(|row| {
            Ok(CartLine {
                product_id: row.product_id,
                quantity: stored_quantity(row.quantity)?,
                name: row.name,
                unit_price: row.price,
                status: row.status,
                stock: row.stock,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    Ok(Cart { lines })
}

/// The schema bounds quantities as the domain does; anything else is corrupt data.
fn stored_quantity(raw: i32) -> Result<Quantity, StoreError> {
    Quantity::parse(raw, "quantity")
        .map_err(|_| StoreError::Inconsistent(format!("cart quantity {raw} out of range")))
}
