-- The order transaction a user would write without this service: lock the product row, take
-- one unit, write the order. pgbench runs it as the baseline of the hot-product scenario.
BEGIN;
SELECT stock FROM bench_products WHERE id = 1 FOR UPDATE;
UPDATE bench_products SET stock = stock - 1 WHERE id = 1;
INSERT INTO bench_orders (product_id, quantity) VALUES (1, 1);
COMMIT;
