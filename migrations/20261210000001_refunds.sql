-- Refunds (issue 21). A paid order can give back some or all of its units: the order moves to
-- PARTIALLY_REFUNDED or REFUNDED, and every refund is a row with one row per refunded line. The
-- counters the refund transaction bumps carry the invariant, so no refund, however it races
-- another, a cancel or the expiry job, can give back more than was paid:
--   * a line never refunds more units than it holds (order_items.refunded_quantity <= quantity);
--   * an order never refunds more money than it was paid (orders.refunded_amount <= final_amount);
--   * only a refunded order has refunded anything, and a REFUNDED one gave back all it was paid.

ALTER TABLE orders DROP CONSTRAINT orders_status_check;
ALTER TABLE orders ADD CONSTRAINT orders_status_check CHECK (status IN (
    'PENDING_PAYMENT', 'PAID', 'PARTIALLY_REFUNDED', 'REFUNDED', 'CANCELLED', 'EXPIRED'));

ALTER TABLE orders DROP CONSTRAINT orders_paid_at_iff_paid;
ALTER TABLE orders ADD CONSTRAINT orders_paid_at_iff_paid
    CHECK ((status IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED')) = (paid_at IS NOT NULL));

ALTER TABLE orders ADD COLUMN refunded_amount BIGINT NOT NULL DEFAULT 0;
ALTER TABLE orders ADD CONSTRAINT orders_refund_within_paid
    CHECK (refunded_amount >= 0 AND refunded_amount <= final_amount);
ALTER TABLE orders ADD CONSTRAINT orders_refunded_only_by_refunds CHECK (
    CASE status
        WHEN 'REFUNDED' THEN refunded_amount = final_amount
        WHEN 'PARTIALLY_REFUNDED' THEN true
        ELSE refunded_amount = 0
    END);

ALTER TABLE order_items ADD COLUMN refunded_quantity INTEGER NOT NULL DEFAULT 0;
ALTER TABLE order_items ADD CONSTRAINT order_items_refund_within_quantity
    CHECK (refunded_quantity >= 0 AND refunded_quantity <= quantity);

-- A partially refunded order still holds its coupon (USED). A fully refunded one may have given
-- it back (AVAILABLE again, free for a new order), so it no longer counts as the coupon's order.
DROP INDEX orders_one_live_order_per_coupon;
CREATE UNIQUE INDEX orders_one_live_order_per_coupon ON orders (user_coupon_id)
    WHERE status IN ('PENDING_PAYMENT', 'PAID', 'PARTIALLY_REFUNDED');

CREATE TABLE refunds (
    id                  BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id            BIGINT      NOT NULL REFERENCES orders (id),
    user_id             BIGINT      NOT NULL CHECK (user_id > 0),
    amount              BIGINT      NOT NULL CHECK (amount >= 0),
    balance_after       BIGINT      NOT NULL CHECK (balance_after >= 0),
    balance_history_id  BIGINT      NOT NULL UNIQUE REFERENCES balance_history (id),
    restocked           BOOLEAN     NOT NULL,
    coupon_returned     BOOLEAN     NOT NULL,
    reason              TEXT        NOT NULL CHECK (char_length(reason) <= 500),
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Lets a refund line name its refund and its order together (below).
    CONSTRAINT refunds_id_order_unique UNIQUE (id, order_id)
);

CREATE INDEX refunds_order_idx ON refunds (order_id, id);

-- A line of a refund belongs to its refund's order and to a line of that order.
CREATE TABLE refund_lines (
    refund_id   BIGINT  NOT NULL,
    order_id    BIGINT  NOT NULL,
    product_id  BIGINT  NOT NULL,
    quantity    INTEGER NOT NULL CHECK (quantity BETWEEN 1 AND 1000),
    amount      BIGINT  NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (refund_id, product_id),
    CONSTRAINT refund_lines_of_refund FOREIGN KEY (refund_id, order_id)
        REFERENCES refunds (id, order_id),
    CONSTRAINT refund_lines_of_order_item FOREIGN KEY (order_id, product_id)
        REFERENCES order_items (order_id, product_id)
);

-- A refund retried with its key returns the first refund. Its key is scoped to the order's
-- buyer (user_id > 0). The list keeps the admin calls' operations (ADJUST_STOCK, CREATE_PRODUCT,
-- CREATE_COUPON), which the admin-retries migration of the same issue, ordered before this one,
-- allows.
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_operation_check;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_operation_check
    CHECK (operation IN ('CHARGE', 'PLACE_ORDER', 'PAY', 'CHECKOUT', 'REFUND',
                         'ADJUST_STOCK', 'CREATE_PRODUCT', 'CREATE_COUPON'));
