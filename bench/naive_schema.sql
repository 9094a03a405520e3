DROP TABLE IF EXISTS bench_purchase_payments, bench_purchase_ledger, bench_purchase_orders;
DROP TABLE IF EXISTS bench_orders, bench_products;
CREATE TABLE bench_products (id int PRIMARY KEY, stock bigint NOT NULL CHECK (stock >= 0));
CREATE TABLE bench_orders (
    id bigserial PRIMARY KEY,
    product_id int NOT NULL REFERENCES bench_products (id),
    quantity int NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO bench_products VALUES (1, 1000000000);

-- The naive payment (bench/naive_pay.sql): 10,000 buyers, 1,000,000 open orders paid in turn.
DROP TABLE IF EXISTS bench_payments, bench_ledger, bench_pay_orders, bench_balances;
DROP SEQUENCE IF EXISTS bench_pay_next;
CREATE TABLE bench_balances (user_id int PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0));
CREATE TABLE bench_pay_orders (
    id bigint PRIMARY KEY,
    user_id int NOT NULL REFERENCES bench_balances (user_id),
    amount bigint NOT NULL,
    status text NOT NULL,
    paid_at timestamptz
);
CREATE TABLE bench_ledger (
    id bigserial PRIMARY KEY,
    user_id int NOT NULL REFERENCES bench_balances (user_id),
    kind text NOT NULL,
    amount bigint NOT NULL,
    balance_after bigint NOT NULL,
    order_id bigint REFERENCES bench_pay_orders (id),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE bench_payments (
    id bigserial PRIMARY KEY,
    order_id bigint NOT NULL UNIQUE REFERENCES bench_pay_orders (id),
    user_id int NOT NULL,
    amount bigint NOT NULL,
    balance_after bigint NOT NULL,
    ledger_id bigint NOT NULL REFERENCES bench_ledger (id),
    paid_at timestamptz NOT NULL DEFAULT now()
);
CREATE SEQUENCE bench_pay_next;
INSERT INTO bench_balances SELECT u, 1000000000000 FROM generate_series(1, 10000) u;
INSERT INTO bench_pay_orders SELECT o, 1 + o % 10000, 1000, 'PENDING', NULL
    FROM generate_series(1, 1000000) o;

-- The naive purchase (bench/naive_purchase.sql): its orders carry what the payment needs, and
-- its ledger entries and payments point at them; the buyers are the first 1,000 balances above.
CREATE TABLE bench_purchase_orders (
    id bigserial PRIMARY KEY,
    user_id int NOT NULL REFERENCES bench_balances (user_id),
    product_id int NOT NULL REFERENCES bench_products (id),
    quantity int NOT NULL,
    amount bigint NOT NULL,
    status text NOT NULL DEFAULT 'PENDING',
    created_at timestamptz NOT NULL DEFAULT now(),
    paid_at timestamptz
);
CREATE TABLE bench_purchase_ledger (
    id bigserial PRIMARY KEY,
    user_id int NOT NULL REFERENCES bench_balances (user_id),
    kind text NOT NULL,
    amount bigint NOT NULL,
    balance_after bigint NOT NULL,
    order_id bigint REFERENCES bench_purchase_orders (id),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE bench_purchase_payments (
    id bigserial PRIMARY KEY,
    order_id bigint NOT NULL UNIQUE REFERENCES bench_purchase_orders (id),
    user_id int NOT NULL,
    amount bigint NOT NULL,
    balance_after bigint NOT NULL,
    ledger_id bigint NOT NULL REFERENCES bench_purchase_ledger (id),
    paid_at timestamptz NOT NULL DEFAULT now()
);
