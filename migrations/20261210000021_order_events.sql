-- Lifecycle events (issue 21): every order transition (placed, paid, cancelled, expired,
-- refunded) writes one outbox event in its own transaction, numbered per order.
--
-- The number of the order's last event. Placing is event 1 (the default, so an insert needs
-- no change); each later transition increments it under the order's row lock and puts the new
-- value in its event's `sequence`. Orders placed before this migration count as placed.
-- Adding a column with a constant default rewrites nothing.
ALTER TABLE orders ADD COLUMN event_sequence INTEGER NOT NULL DEFAULT 1
    CONSTRAINT orders_event_sequence_positive CHECK (event_sequence > 0);

-- The order an event is about: its CloudEvents `subject`. NULL for the PaymentCompleted events
-- written before this migration (and by replicas still running the previous version during a
-- rolling upgrade): readers take it from their payload's `order_id` then.
ALTER TABLE outbox_events ADD COLUMN order_id BIGINT;
