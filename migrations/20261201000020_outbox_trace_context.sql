-- The W3C trace context of the call that wrote the event (NULL while tracing is off), sent
-- with the event so the data platform's consumer can continue the payment's trace.
ALTER TABLE outbox_events
    ADD COLUMN traceparent TEXT,
    ADD COLUMN tracestate TEXT;
