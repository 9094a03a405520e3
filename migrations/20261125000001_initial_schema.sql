-- The whole model. Constraints carry the invariants, so that a bug in the code is refused by the
-- database instead of becoming bad data:
--   * a balance is never negative;            * stock is never negative;
--   * one coupon per (user, coupon);          * never more coupons than total_quantity (seats);
--   * one payment per order;                  * every reference points at a real row.
-- Statuses are TEXT with CHECK constraints (easier to evolve than Postgres enums).

CREATE TABLE user_balances (
    user_id     BIGINT      PRIMARY KEY CHECK (user_id > 0),
    balance     BIGINT      NOT NULL DEFAULT 0,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT user_balances_balance_non_negative CHECK (balance >= 0)
);

CREATE TABLE products (
    id          BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        TEXT        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    price       BIGINT      NOT NULL CHECK (price >= 0),
    stock       BIGINT      NOT NULL,
    status      TEXT        NOT NULL CHECK (status IN ('SELLING', 'STOPPED', 'SOLD_OUT')),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT products_stock_non_negative CHECK (stock >= 0)
);

-- ListProducts walks SELLING products by id.
CREATE INDEX products_selling_idx ON products (id) WHERE status = 'SELLING';

CREATE TABLE coupons (
    id                BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name              TEXT        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    discount_type     TEXT        NOT NULL CHECK (discount_type IN ('FIXED', 'PERCENT')),
    discount_amount   BIGINT,
    discount_percent  SMALLINT,
    max_discount      BIGINT,
    min_order_amount  BIGINT      NOT NULL DEFAULT 0 CHECK (min_order_amount >= 0),
    total_quantity    BIGINT      NOT NULL CHECK (total_quantity BETWEEN 1 AND 1000000),
    issue_starts_at   TIMESTAMPTZ NOT NULL,
    issue_ends_at     TIMESTAMPTZ NOT NULL,
    valid_days        INTEGER     NOT NULL CHECK (valid_days BETWEEN 1 AND 3650),
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT coupons_window_ordered CHECK (issue_starts_at < issue_ends_at),
    CONSTRAINT coupons_discount_shape CHECK (
        (discount_type = 'FIXED' AND discount_amount > 0
            AND discount_percent IS NULL AND max_discount IS NULL)
        OR (discount_type = 'PERCENT' AND discount_percent BETWEEN 1 AND 100
            AND discount_amount IS NULL AND (max_discount IS NULL OR max_discount > 0))
    )
);

CREATE TABLE orders (
    id               BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id          BIGINT      NOT NULL CHECK (user_id > 0),
    status           TEXT        NOT NULL
        CHECK (status IN ('PENDING_PAYMENT', 'PAID', 'CANCELLED', 'EXPIRED')),
    total_amount     BIGINT      NOT NULL CHECK (total_amount >= 0),
    discount_amount  BIGINT      NOT NULL CHECK (discount_amount >= 0),
    final_amount     BIGINT      NOT NULL CHECK (final_amount >= 0),
    user_coupon_id   BIGINT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at       TIMESTAMPTZ NOT NULL,
    paid_at          TIMESTAMPTZ,
    cancelled_at     TIMESTAMPTZ,
    CONSTRAINT orders_amounts_add_up CHECK (final_amount = total_amount - discount_amount),
    CONSTRAINT orders_paid_at_iff_paid CHECK ((status = 'PAID') = (paid_at IS NOT NULL))
);

CREATE INDEX orders_user_idx ON orders (user_id, id);
-- The expiry job scans only open orders by deadline.
CREATE INDEX orders_open_expiry_idx ON orders (expires_at) WHERE status = 'PENDING_PAYMENT';

-- Seats: the coupon gate hands out seat numbers 1..total_quantity, and (coupon_id, seat) is
-- unique, so Postgres alone guarantees that no more than total_quantity coupons exist, even if
-- Redis forgets everything in the middle of a stampede.
CREATE TABLE user_coupons (
    id          BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    coupon_id   BIGINT      NOT NULL REFERENCES coupons (id),
    user_id     BIGINT      NOT NULL CHECK (user_id > 0),
    seat        BIGINT      NOT NULL CHECK (seat > 0),
    status      TEXT        NOT NULL DEFAULT 'AVAILABLE'
        CHECK (status IN ('AVAILABLE', 'RESERVED', 'USED')),
    order_id    BIGINT      REFERENCES orders (id),
    issued_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ NOT NULL,
    used_at     TIMESTAMPTZ,
    CONSTRAINT user_coupons_one_per_user UNIQUE (coupon_id, user_id),
    CONSTRAINT user_coupons_seat_unique UNIQUE (coupon_id, seat),
    CONSTRAINT user_coupons_order_iff_held CHECK ((status = 'AVAILABLE') = (order_id IS NULL))
);

CREATE INDEX user_coupons_user_idx ON user_coupons (user_id, id);

CREATE FUNCTION user_coupons_seat_within_total() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM coupons WHERE id = NEW.coupon_id AND NEW.seat <= total_quantity
    ) THEN
        RAISE EXCEPTION 'seat % is beyond the coupon''s total quantity', NEW.seat
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'user_coupons_seat_within_total';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER user_coupons_seat_within_total
    BEFORE INSERT OR UPDATE OF seat, coupon_id ON user_coupons
    FOR EACH ROW EXECUTE FUNCTION user_coupons_seat_within_total();

ALTER TABLE orders
    ADD CONSTRAINT orders_user_coupon_fk FOREIGN KEY (user_coupon_id) REFERENCES user_coupons (id);

-- A coupon backs at most one order that is open or paid.
CREATE UNIQUE INDEX orders_one_live_order_per_coupon ON orders (user_coupon_id)
    WHERE status IN ('PENDING_PAYMENT', 'PAID');

CREATE TABLE order_items (
    order_id      BIGINT  NOT NULL REFERENCES orders (id),
    product_id    BIGINT  NOT NULL REFERENCES products (id),
    product_name  TEXT    NOT NULL,
    unit_price    BIGINT  NOT NULL CHECK (unit_price >= 0),
    quantity      INTEGER NOT NULL CHECK (quantity BETWEEN 1 AND 1000),
    PRIMARY KEY (order_id, product_id)
);

CREATE INDEX order_items_product_idx ON order_items (product_id);

CREATE TABLE balance_history (
    id             BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id        BIGINT      NOT NULL REFERENCES user_balances (user_id),
    kind           TEXT        NOT NULL CHECK (kind IN ('CHARGE', 'USE', 'REFUND')),
    amount         BIGINT      NOT NULL,
    balance_after  BIGINT      NOT NULL CHECK (balance_after >= 0),
    order_id       BIGINT      REFERENCES orders (id),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A payment of a fully discounted order still leaves its (zero) USE entry.
    CONSTRAINT balance_history_amount_sign CHECK (amount > 0 OR (kind <> 'CHARGE' AND amount = 0)),
    CONSTRAINT balance_history_order_iff_not_charge CHECK ((kind = 'CHARGE') = (order_id IS NULL))
);

CREATE INDEX balance_history_user_idx ON balance_history (user_id, id DESC);

CREATE TABLE payments (
    id                  BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id            BIGINT      NOT NULL REFERENCES orders (id),
    user_id             BIGINT      NOT NULL CHECK (user_id > 0),
    amount              BIGINT      NOT NULL CHECK (amount >= 0),
    balance_after       BIGINT      NOT NULL CHECK (balance_after >= 0),
    balance_history_id  BIGINT      NOT NULL REFERENCES balance_history (id),
    paid_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT payments_one_per_order UNIQUE (order_id)
);

-- The ranking job sums paid quantities by payment day.
CREATE INDEX payments_paid_at_idx ON payments (paid_at);

-- Transactional outbox: written in the payment's transaction, delivered by a job.
CREATE TABLE outbox_events (
    id               BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id         UUID        NOT NULL UNIQUE,
    event_type       TEXT        NOT NULL,
    aggregate_id     BIGINT      NOT NULL,
    payload          JSONB       NOT NULL,
    status           TEXT        NOT NULL DEFAULT 'PENDING'
        CHECK (status IN ('PENDING', 'DELIVERED', 'PARKED')),
    attempts         INTEGER     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error       TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at     TIMESTAMPTZ,
    CONSTRAINT outbox_delivered_at_iff_delivered
        CHECK ((status = 'DELIVERED') = (delivered_at IS NOT NULL))
);

CREATE INDEX outbox_pending_idx ON outbox_events (next_attempt_at, id) WHERE status = 'PENDING';

-- A retried call with the same key returns the first result (result_id) and changes nothing.
-- The row is inserted first in the call's transaction, so a concurrent retry waits for the
-- first attempt to commit or roll back instead of racing it.
CREATE TABLE idempotency_keys (
    user_id              BIGINT      NOT NULL CHECK (user_id > 0),
    operation            TEXT        NOT NULL CHECK (operation IN ('CHARGE', 'PLACE_ORDER', 'PAY')),
    idempotency_key      TEXT        NOT NULL CHECK (char_length(idempotency_key) BETWEEN 1 AND 128),
    request_fingerprint  TEXT        NOT NULL,
    result_id            BIGINT,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, operation, idempotency_key)
);

CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
