-- A large order history in a few seconds per million, for the order-read plans
-- (docs/QUERY_PLANS.md) and the list-orders load-generator scenario. Run by scripts/seed-orders:
--
--   psql -v orders=1000000 -v users=1 -v first_user=900000001 -v tag=seed1 -f bench/seed_orders.sql
--
-- Orders go round-robin to users first_user .. first_user + users - 1 (users = 1: one buyer with
-- every order), oldest first, spread over the past year, with 1..3 lines each over 20 products of
-- their own (STOPPED, no stock: nothing can buy them, so no flow of the service meets them).
-- Statuses: 70% PAID, 15% CANCELLED, 10% EXPIRED, 5% PENDING_PAYMENT (due in a year, so the
-- expiry job leaves them alone during a benchmark). Amounts add up as the schema requires; the
-- orders have no payments or ledger entries (they are read, never paid or refunded).
\set ON_ERROR_STOP on
BEGIN;

INSERT INTO products (name, price, stock, status)
SELECT format('%s product %s', :'tag', k), 1000 * k, 0, 'STOPPED'
FROM generate_series(1, 20) AS k;

CREATE TEMP TABLE seed_products ON COMMIT DROP AS
SELECT row_number() OVER (ORDER BY id) - 1 AS k, id, price, name
FROM products WHERE name LIKE :'tag' || ' product %';

-- Ids drawn in creation order, so that the history looks like one the service wrote.
CREATE TEMP TABLE seed_orders ON COMMIT DROP AS
SELECT g, nextval(pg_get_serial_sequence('orders', 'id')) AS id,
       now() - interval '365 days' + (interval '365 days' * g / :orders::bigint) AS at
FROM generate_series(1, :orders::bigint) AS g
ORDER BY g;

INSERT INTO orders (id, user_id, status, total_amount, discount_amount, final_amount,
                    user_coupon_id, created_at, expires_at, paid_at, cancelled_at)
OVERRIDING SYSTEM VALUE
SELECT s.id,
       :first_user::bigint + (s.g % :users::bigint),
       st.status,
       t.total, 0, t.total, NULL,
       s.at,
       CASE WHEN st.status = 'PENDING_PAYMENT' THEN now() + interval '1 year'
            ELSE s.at + interval '15 minutes' END,
       CASE WHEN st.status = 'PAID' THEN s.at + interval '1 minute' END,
       CASE WHEN st.status IN ('CANCELLED', 'EXPIRED') THEN s.at + interval '2 minutes' END
FROM seed_orders s
CROSS JOIN LATERAL (
    SELECT CASE WHEN s.g % 20 < 14 THEN 'PAID'
                WHEN s.g % 20 < 17 THEN 'CANCELLED'
                WHEN s.g % 20 < 19 THEN 'EXPIRED'
                ELSE 'PENDING_PAYMENT' END AS status
) st
CROSS JOIN LATERAL (
    SELECT sum(p.price) AS total
    FROM generate_series(0, s.g % 3) AS j
    JOIN seed_products p ON p.k = (s.g + j) % 20
) t;

INSERT INTO order_items (order_id, product_id, product_name, unit_price, quantity, created_at)
SELECT s.id, p.id, p.name, p.price, 1, s.at
FROM seed_orders s
CROSS JOIN LATERAL generate_series(0, s.g % 3) AS j
JOIN seed_products p ON p.k = (s.g + j) % 20;

COMMIT;
ANALYZE orders;
ANALYZE order_items;
