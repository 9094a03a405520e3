-- A page of one buyer's orders of every status, newest first ("My orders" without a filter,
-- the hottest list): one backward scan of orders_user_created_idx, stopping after $7 rows.
-- Parameters as in order_page_by_status.sql ($1 holds every status, so its filter keeps all).
WITH page AS (
    SELECT * FROM orders
    WHERE user_id = $2
        AND status = ANY($1::text[])
        AND ($3::timestamptz IS NULL OR created_at >= $3)
        AND ($4::timestamptz IS NULL OR created_at < $4)
        AND ($5::timestamptz IS NULL OR (created_at, id) < ($5, $6))
    ORDER BY created_at DESC, id DESC
    LIMIT $7
)
