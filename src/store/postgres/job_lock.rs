//! Job locks: a Postgres advisory lock per scheduled job, so one replica runs it at a time.

use sqlx::PgConnection;

use crate::store::StoreError;

/// Takes the session advisory lock `id` if no one holds it; false when another session does.
pub async fn try_lock(conn: &mut PgConnection, id: i64) -> Result<bool, StoreError> {
    let locked = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(id)
        .fetch_one(conn)
        .await?;
    Ok(locked)
}

/// Releases the session advisory lock `id` taken on this connection.
pub async fn unlock(conn: &mut PgConnection, id: i64) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}
