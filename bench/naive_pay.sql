-- The payment transaction a user would write without this service, on distinct orders: lock
-- the order, deduct the balance conditionally, write the ledger entry and the payment, mark the
-- order paid. pgbench runs it as the baseline of Pay (no outbox event, no idempotency key: less
-- work than the service does).
BEGIN;
SELECT nextval('bench_pay_next') AS order_id \gset
SELECT user_id, amount FROM bench_pay_orders WHERE id = :order_id AND status = 'PENDING' FOR UPDATE \gset
UPDATE bench_balances SET balance = balance - :amount WHERE user_id = :user_id AND balance >= :amount RETURNING balance AS balance_after \gset
INSERT INTO bench_ledger (user_id, kind, amount, balance_after, order_id) VALUES (:user_id, 'USE', :amount, :balance_after, :order_id) RETURNING id AS ledger_id \gset
INSERT INTO bench_payments (order_id, user_id, amount, balance_after, ledger_id) VALUES (:order_id, :user_id, :amount, :balance_after, :ledger_id);
UPDATE bench_pay_orders SET status = 'PAID', paid_at = now() WHERE id = :order_id;
COMMIT;
