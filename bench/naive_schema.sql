DROP TABLE IF EXISTS bench_orders, bench_products;
CREATE TABLE bench_products (id int PRIMARY KEY, stock bigint NOT NULL CHECK (stock >= 0));
CREATE TABLE bench_orders (
    id bigserial PRIMARY KEY,
    product_id int NOT NULL REFERENCES bench_products (id),
    quantity int NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO bench_products VALUES (1, 1000000000);
