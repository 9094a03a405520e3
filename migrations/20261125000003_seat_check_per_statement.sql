-- The seat check (no seat beyond the coupon's total) ran once per inserted row, a PL/pgSQL call
-- and a lookup of the coupon each time: in a stampede, winners are inserted hundreds per
-- statement, and that per-row work was a large part of each batch. Inserts are now checked once
-- per statement, against the rows the statement inserted (a transition table), with one join.
-- An update of a row's seat or coupon (never done by the service) keeps the per-row check.
-- The error is the same: check_violation on user_coupons_seat_within_total.

DROP TRIGGER user_coupons_seat_within_total ON user_coupons;

CREATE TRIGGER user_coupons_seat_within_total
    BEFORE UPDATE OF seat, coupon_id ON user_coupons
    FOR EACH ROW EXECUTE FUNCTION user_coupons_seat_within_total();

CREATE FUNCTION user_coupons_seats_within_total() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    beyond BIGINT;
BEGIN
    SELECT n.seat INTO beyond
    FROM inserted n JOIN coupons c ON c.id = n.coupon_id
    WHERE n.seat > c.total_quantity
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'seat % is beyond the coupon''s total quantity', beyond
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'user_coupons_seat_within_total';
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER user_coupons_seats_within_total
    AFTER INSERT ON user_coupons
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION user_coupons_seats_within_total();
