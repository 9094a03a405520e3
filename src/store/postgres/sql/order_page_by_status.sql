-- A page of orders newest first, filtered by status (every status when none is asked): one
-- backward scan per status of orders_user_status_created_idx (with a buyer) or
-- orders_status_created_idx, each stopping after $7 rows, merged.
-- $1 statuses kept, $2 buyer or NULL, $3/$4 creation range bounds or NULL, $5/$6 the cursor
-- (created_at, id) or NULL, $7 rows to read (a page and one more).
WITH page AS (
    SELECT o.* FROM unnest($1::text[]) AS s(status)
    CROSS JOIN LATERAL (
        SELECT * FROM orders
        WHERE status = s.status
            AND ($2::bigint IS NULL OR user_id = $2)
            AND ($3::timestamptz IS NULL OR created_at >= $3)
            AND ($4::timestamptz IS NULL OR created_at < $4)
            AND ($5::timestamptz IS NULL OR (created_at, id) < ($5, $6))
        ORDER BY created_at DESC, id DESC
        LIMIT $7
    ) o
    ORDER BY o.created_at DESC, o.id DESC
    LIMIT $7
)
