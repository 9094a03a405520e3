-- Carts. Not money, but buyers expect them to survive a restart, so they live here and not in
-- Redis. The carts row is the cart's lock: every change takes it first, so the line limit
-- (checked in the statement that adds a line) holds under concurrent changes, and a checkout
-- that empties the cart cannot interleave with one that fills it.
CREATE TABLE carts (
    user_id     BIGINT      PRIMARY KEY CHECK (user_id > 0),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The quantity bounds are PlaceOrder's, so a cart always makes a valid order.
CREATE TABLE cart_items (
    user_id     BIGINT      NOT NULL REFERENCES carts (user_id),
    product_id  BIGINT      NOT NULL,
    quantity    INTEGER     NOT NULL CHECK (quantity BETWEEN 1 AND 1000),
    added_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, product_id),
    CONSTRAINT cart_items_product_fk FOREIGN KEY (product_id) REFERENCES products (id)
);

-- A checkout retried with its key returns the order of the first attempt.
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_operation_check;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_operation_check
    CHECK (operation IN ('CHARGE', 'PLACE_ORDER', 'PAY', 'CHECKOUT'));
