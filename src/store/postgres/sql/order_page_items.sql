-- The page's orders, each with its items (one row per item, in product order), newest first.
SELECT page.*, i.product_id AS item_product_id, i.product_name AS item_name,
    i.unit_price AS item_unit_price, i.quantity AS item_quantity,
    i.refunded_quantity AS item_refunded_quantity
FROM page LEFT JOIN order_items i ON i.order_id = page.id
ORDER BY page.created_at DESC, page.id DESC, i.product_id
