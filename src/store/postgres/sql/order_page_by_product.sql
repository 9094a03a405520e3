-- A page of orders newest first with a line of product $8: a backward scan of
-- order_items_product_created_idx (an item's created_at is its order's), each order then read
-- by its key and checked against the other filters. Parameters as in order_page_by_status.sql.
WITH hits AS (
    SELECT pi.order_id FROM order_items pi
    JOIN orders o ON o.id = pi.order_id
    WHERE pi.product_id = $8
        AND ($3::timestamptz IS NULL OR pi.created_at >= $3)
        AND ($4::timestamptz IS NULL OR pi.created_at < $4)
        AND ($5::timestamptz IS NULL OR (pi.created_at, pi.order_id) < ($5, $6))
        AND ($2::bigint IS NULL OR o.user_id = $2)
        AND o.status = ANY($1)
    ORDER BY pi.created_at DESC, pi.order_id DESC
    LIMIT $7
),
page AS (
    SELECT * FROM orders WHERE id IN (SELECT order_id FROM hits)
)
