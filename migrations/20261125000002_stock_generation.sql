-- Every increase of a product's stock (an order cancelled or expired, an admin change) bumps
-- its stock generation. A sold-out marker in Redis carries the generation the refused order
-- read, and Redis refuses a marker older than the last increase: an order that saw "none left"
-- just before stock came back can never mark the product sold out again after the release
-- cleared the marker.
ALTER TABLE products ADD COLUMN stock_gen BIGINT NOT NULL DEFAULT 0;
