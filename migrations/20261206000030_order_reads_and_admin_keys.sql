-- Order reads and admin retries (issue 21).
--
-- 1. Order lists are keyset pages, newest first: ordered by (created_at DESC, id DESC), the
--    next page starting below the last (created_at, id) of the previous one. Each filter a page
--    can carry has an index in that order, so a page reads about its own rows, never the table
--    (docs/QUERY_PLANS.md: the plans at 1,000,000 orders):
--    * one buyer, every status ("My orders", the hottest list): a backward scan of
--      (user_id, created_at, id). orders_user_idx (user_id, id) had no reader and is replaced
--      (same leading column).
--    * by status, with or without a buyer and a creation range: one backward scan per status
--      of (user_id, status, created_at, id) or (status, created_at, id), merged; with no buyer,
--      "every status" is every status, one scan each.
--    * by product: a backward scan of order_items (product_id, created_at, order_id), each
--      order read by its key. An item's created_at is its order's: both are the DEFAULT now()
--      of the transaction that writes them together. order_items_product_idx (product_id)
--      kept equal keys in heap order (a newest-first page of a best seller sorted all its
--      lines) and is replaced (same leading column).
ALTER TABLE order_items ADD COLUMN created_at TIMESTAMPTZ NOT NULL DEFAULT now();
UPDATE order_items i SET created_at = o.created_at FROM orders o WHERE o.id = i.order_id;

CREATE INDEX orders_user_created_idx ON orders (user_id, created_at, id);
CREATE INDEX orders_user_status_created_idx ON orders (user_id, status, created_at, id);
CREATE INDEX orders_status_created_idx ON orders (status, created_at, id);
DROP INDEX orders_user_idx;
CREATE INDEX order_items_product_created_idx ON order_items (product_id, created_at, order_id);
DROP INDEX order_items_product_idx;

-- Product lists page by id, a status filter being one scan per status: AdminService/ListProducts
-- any statuses, ProductService/ListProducts SELLING alone, which products_selling_idx (id) WHERE
-- status = 'SELLING' served and this index now serves.
CREATE INDEX products_status_idx ON products (status, id);
DROP INDEX products_selling_idx;

-- 2. Idempotency keys of admin calls. AdjustStock, CreateProduct and CreateCoupon act for the
--    operator, not for a buyer, so their keys need a scope of their own. It is user_id 0 in the
--    same table, tied to the operations by a CHECK: a buyer's operation can never be claimed at
--    scope 0, an admin operation never in a buyer's scope, so the two never collide. The claim,
--    replay, mismatch and purge code and the primary key stay the same for every keyed call.
--    (A table of its own would have doubled that code and the purge; a scope column in the
--    primary key would have rebuilt the key and touched every keyed statement.)
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_user_id_check;
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_operation_check;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_operation_check
    CHECK (operation IN ('CHARGE', 'PLACE_ORDER', 'PAY', 'CHECKOUT',
                         'ADJUST_STOCK', 'CREATE_PRODUCT', 'CREATE_COUPON'));
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_scope_check
    CHECK (user_id >= 0
           AND (user_id = 0) = (operation IN ('ADJUST_STOCK', 'CREATE_PRODUCT', 'CREATE_COUPON')));
