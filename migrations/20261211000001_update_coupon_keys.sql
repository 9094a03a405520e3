-- UpdateCoupon (issue 21, the coupon controls) takes an optional idempotency key, an admin key
-- like AdjustStock's, CreateProduct's and CreateCoupon's: scope user_id 0. Both lists keep every
-- operation the earlier migrations allow (the refunds migration's REFUND included).
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_operation_check;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_operation_check
    CHECK (operation IN ('CHARGE', 'PLACE_ORDER', 'PAY', 'CHECKOUT', 'REFUND',
                         'ADJUST_STOCK', 'CREATE_PRODUCT', 'CREATE_COUPON', 'UPDATE_COUPON'));
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_scope_check;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_scope_check
    CHECK (user_id >= 0
           AND (user_id = 0) = (operation IN ('ADJUST_STOCK', 'CREATE_PRODUCT', 'CREATE_COUPON',
                                              'UPDATE_COUPON')));
