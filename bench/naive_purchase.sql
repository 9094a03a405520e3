-- A whole purchase as a user would write it without this service, the twin of the load
-- generator's hot-product scenario (each buyer orders one unit, then pays that order): the naive
-- order transaction (lock the product row, take a unit, write the order) and then the naive
-- payment transaction (lock that order, deduct the balance conditionally, write the ledger entry
-- and the payment, mark the order paid), back to back in one pgbench script. 1,000 buyers, as the
-- scenario has by default. No outbox event, no idempotency key: less work than the service does.
\set user_id random(1, 1000)
BEGIN;
SELECT stock FROM bench_products WHERE id = 1 FOR UPDATE;
UPDATE bench_products SET stock = stock - 1 WHERE id = 1;
INSERT INTO bench_purchase_orders (user_id, product_id, quantity, amount)
    VALUES (:user_id, 1, 1, 1000) RETURNING id AS order_id \gset
COMMIT;
BEGIN;
SELECT user_id, amount FROM bench_purchase_orders WHERE id = :order_id AND status = 'PENDING' FOR UPDATE \gset
UPDATE bench_balances SET balance = balance - :amount WHERE user_id = :user_id AND balance >= :amount RETURNING balance AS balance_after \gset
INSERT INTO bench_purchase_ledger (user_id, kind, amount, balance_after, order_id) VALUES (:user_id, 'USE', :amount, :balance_after, :order_id) RETURNING id AS ledger_id \gset
INSERT INTO bench_purchase_payments (order_id, user_id, amount, balance_after, ledger_id) VALUES (:order_id, :user_id, :amount, :balance_after, :ledger_id);
UPDATE bench_purchase_orders SET status = 'PAID', paid_at = now() WHERE id = :order_id;
COMMIT;
