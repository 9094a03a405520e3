//! The cases of a run: a strategy per RPC (and per admin RPC without the token), how many cases
//! each gets, and the draw that turns a seed into one shuffled list of calls.

use ecommerce::proto::{
    AdjustStockRequest, AdminServiceGetOrderRequest, AdminServiceListOrdersRequest,
    AdminServiceListProductsRequest, CancelOrderRequest, ChargeBalanceRequest, CheckoutRequest,
    ClearRequest, CreateCouponRequest, CreateProductRequest, GetBalanceRequest, GetCartRequest,
    GetCouponRequest, GetOrderRequest, GetPopularProductsRequest, GetProductRequest,
    IssueCouponRequest, ListBalanceHistoryRequest, ListCouponsRequest, ListOrdersRequest,
    ListParkedEventsRequest, ListProductsRequest, ListUserCouponsRequest, PayRequest,
    PlaceOrderRequest, RedriveEventsRequest, RefundLine, RefundOrderRequest, RemoveItemRequest,
    SetItemRequest, UpdateCouponRequest, UpdateProductRequest,
};
use proptest::{
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};

use super::{
    calls::{Auth, Call},
    fields::{
        amount, created_page_token, discount, enum_number, event_ids, filter_id, hostile_i64, id,
        idempotency_key, int32, lines, name, optional_timestamp, order_id, page_token,
        sane_or_hostile, statuses, timestamp, user_id,
    },
};

/// Cases per RPC (and per RPC without the admin token). Sized so the whole run stays well
/// under a minute on two shared cores.
const CASES: usize = 300;
const UNAUTHENTICATED_CASES: usize = 80;

fn no_admin() -> impl Strategy<Value = Auth> {
    prop_oneof![Just(Auth::Missing), Just(Auth::Wrong)]
}

fn create_product_calls(auth: impl Strategy<Value = Auth>) -> impl Strategy<Value = Call> {
    let stock = sane_or_hostile(0..=1_000i64, hostile_i64());
    let price = sane_or_hostile(0..=100_000i64, hostile_i64());
    (auth, name(), price, stock, enum_number(), idempotency_key()).prop_map(
        |(auth, name, price, stock, status, idempotency_key)| {
            Call::CreateProduct(
                auth,
                CreateProductRequest {
                    name,
                    price,
                    stock,
                    status,
                    idempotency_key,
                },
            )
        },
    )
}

fn update_product_calls(auth: impl Strategy<Value = Auth>) -> impl Strategy<Value = Call> {
    (
        auth,
        id(),
        prop::option::of(name()),
        prop::option::of(sane_or_hostile(0..=100_000i64, hostile_i64())),
        prop::option::of(sane_or_hostile(0..=1_000i64, hostile_i64())),
        prop::option::of(enum_number()),
        prop::option::of(sane_or_hostile(0..=1_000i64, hostile_i64())),
    )
        .prop_map(
            |(auth, product_id, name, price, stock, status, expected_stock)| {
                Call::UpdateProduct(
                    auth,
                    UpdateProductRequest {
                        product_id,
                        name,
                        price,
                        stock,
                        status,
                        expected_stock,
                    },
                )
            },
        )
}

fn adjust_stock_calls(auth: impl Strategy<Value = Auth>) -> impl Strategy<Value = Call> {
    (
        auth,
        id(),
        sane_or_hostile(-50..=50i64, hostile_i64()),
        idempotency_key(),
    )
        .prop_map(|(auth, product_id, delta, idempotency_key)| {
            Call::AdjustStock(
                auth,
                AdjustStockRequest {
                    product_id,
                    delta,
                    idempotency_key,
                },
            )
        })
}

fn list_parked_calls(auth: impl Strategy<Value = Auth>) -> impl Strategy<Value = Call> {
    (auth, int32(0..=100), page_token()).prop_map(|(auth, page_size, page_token)| {
        Call::ListParkedEvents(
            auth,
            ListParkedEventsRequest {
                page_size,
                page_token,
            },
        )
    })
}

fn redrive_calls(auth: impl Strategy<Value = Auth>) -> impl Strategy<Value = Call> {
    (auth, event_ids(), any::<bool>()).prop_map(|(auth, event_ids, all)| {
        Call::RedriveEvents(auth, RedriveEventsRequest { event_ids, all })
    })
}

/// Refunds of the fixture's and the run's orders: mostly everything left (no lines), otherwise
/// the order lines' strategy (hostile ones included) as refund lines.
fn refund_calls(auth: impl Strategy<Value = Auth>) -> impl Strategy<Value = Call> {
    let refund_lines = prop_oneof![
        2 => Just(Vec::new()),
        3 => lines().prop_map(|lines| {
            lines
                .into_iter()
                .map(|l| RefundLine {
                    product_id: l.product_id,
                    quantity: l.quantity,
                })
                .collect()
        }),
    ];
    let reason = prop_oneof![2 => Just(String::new()), 1 => name()];
    (
        auth,
        order_id(),
        refund_lines,
        any::<bool>(),
        reason,
        idempotency_key(),
    )
        .prop_map(
            |(auth, order_id, lines, restock, reason, idempotency_key)| {
                Call::RefundOrder(
                    auth,
                    RefundOrderRequest {
                        order_id,
                        lines,
                        restock,
                        reason,
                        idempotency_key,
                    },
                )
            },
        )
}

fn admin_get_order_calls(auth: impl Strategy<Value = Auth>) -> impl Strategy<Value = Call> {
    (auth, order_id()).prop_map(|(auth, order_id)| {
        Call::AdminGetOrder(auth, AdminServiceGetOrderRequest { order_id })
    })
}

fn admin_list_orders_calls(auth: impl Strategy<Value = Auth>) -> impl Strategy<Value = Call> {
    (
        auth,
        filter_id(user_id()),
        statuses(4),
        filter_id(id()),
        optional_timestamp(),
        optional_timestamp(),
        int32(0..=100),
        created_page_token(),
    )
        .prop_map(
            |(auth, user_id, statuses, product_id, after, before, page_size, page_token)| {
                Call::AdminListOrders(
                    auth,
                    AdminServiceListOrdersRequest {
                        user_id,
                        statuses,
                        product_id,
                        created_after: after,
                        created_before: before,
                        page_size,
                        page_token,
                    },
                )
            },
        )
}

fn admin_list_products_calls(auth: impl Strategy<Value = Auth>) -> impl Strategy<Value = Call> {
    (auth, statuses(3), int32(0..=100), page_token()).prop_map(
        |(auth, statuses, page_size, page_token)| {
            Call::AdminListProducts(
                auth,
                AdminServiceListProductsRequest {
                    statuses,
                    page_size,
                    page_token,
                },
            )
        },
    )
}

fn list_coupons_calls(auth: impl Strategy<Value = Auth>) -> impl Strategy<Value = Call> {
    (auth, int32(0..=100), page_token()).prop_map(|(auth, page_size, page_token)| {
        Call::ListCoupons(
            auth,
            ListCouponsRequest {
                page_size,
                page_token,
            },
        )
    })
}

/// A live coupon renamed, ended (or its end moved before its start), given more seats or
/// fewer (below the issued ones too), or hostile values in each field.
fn update_coupon_calls(auth: impl Strategy<Value = Auth>) -> impl Strategy<Value = Call> {
    let total = sane_or_hostile(1..=20i64, hostile_i64());
    (
        auth,
        id(),
        prop_oneof![Just(None), name().prop_map(Some)],
        optional_timestamp(),
        prop_oneof![Just(None), total.prop_map(Some)],
        idempotency_key(),
    )
        .prop_map(
            |(auth, coupon_id, name, issue_ends_at, total_quantity, idempotency_key)| {
                Call::UpdateCoupon(
                    auth,
                    UpdateCouponRequest {
                        coupon_id,
                        name,
                        issue_ends_at,
                        total_quantity,
                        idempotency_key,
                    },
                )
            },
        )
}

fn create_coupon_calls(auth: impl Strategy<Value = Auth>) -> impl Strategy<Value = Call> {
    let total = sane_or_hostile(1..=20i64, hostile_i64());
    let min_order_amount = sane_or_hostile(0..=20_000i64, hostile_i64());
    (
        auth,
        name(),
        discount(),
        min_order_amount,
        total,
        timestamp(-3_600..0),
        timestamp(3_600..86_400),
        int32(1..=30),
        idempotency_key(),
    )
        .prop_map(
            |(
                auth,
                name,
                discount,
                min_order_amount,
                total_quantity,
                starts,
                ends,
                valid_days,
                idempotency_key,
            )| {
                Call::CreateCoupon(
                    auth,
                    CreateCouponRequest {
                        name,
                        discount,
                        min_order_amount,
                        total_quantity,
                        issue_starts_at: starts,
                        issue_ends_at: ends,
                        valid_days,
                        idempotency_key,
                    },
                )
            },
        )
}

/// Every RPC's strategy, with how many cases to draw from it.
fn strategies() -> Vec<(BoxedStrategy<Call>, usize)> {
    vec![
        (
            (user_id(), amount(), idempotency_key())
                .prop_map(|(user_id, amount, idempotency_key)| {
                    Call::ChargeBalance(ChargeBalanceRequest {
                        user_id,
                        amount,
                        idempotency_key,
                    })
                })
                .boxed(),
            CASES,
        ),
        (
            user_id()
                .prop_map(|user_id| Call::GetBalance(GetBalanceRequest { user_id }))
                .boxed(),
            CASES,
        ),
        (
            (user_id(), int32(0..=100), page_token())
                .prop_map(|(user_id, page_size, page_token)| {
                    Call::ListBalanceHistory(ListBalanceHistoryRequest {
                        user_id,
                        page_size,
                        page_token,
                    })
                })
                .boxed(),
            CASES,
        ),
        (
            (int32(0..=100), page_token())
                .prop_map(|(page_size, page_token)| {
                    Call::ListProducts(ListProductsRequest {
                        page_size,
                        page_token,
                    })
                })
                .boxed(),
            CASES,
        ),
        (
            id().prop_map(|product_id| Call::GetProduct(GetProductRequest { product_id }))
                .boxed(),
            CASES,
        ),
        (
            (int32(0..=30), int32(0..=100))
                .prop_map(|(days, limit)| {
                    Call::GetPopularProducts(GetPopularProductsRequest { days, limit })
                })
                .boxed(),
            CASES,
        ),
        (
            (user_id(), id())
                .prop_map(|(user_id, coupon_id)| {
                    Call::IssueCoupon(IssueCouponRequest { user_id, coupon_id })
                })
                .boxed(),
            CASES,
        ),
        (
            id().prop_map(|coupon_id| Call::GetCoupon(GetCouponRequest { coupon_id }))
                .boxed(),
            CASES,
        ),
        (
            (user_id(), int32(0..=100), page_token())
                .prop_map(|(user_id, page_size, page_token)| {
                    Call::ListUserCoupons(ListUserCouponsRequest {
                        user_id,
                        page_size,
                        page_token,
                    })
                })
                .boxed(),
            CASES,
        ),
        (
            (
                user_id(),
                lines(),
                prop_oneof![3 => Just(0i64), 2 => id()],
                idempotency_key(),
            )
                .prop_map(|(user_id, items, user_coupon_id, idempotency_key)| {
                    Call::PlaceOrder(PlaceOrderRequest {
                        user_id,
                        items,
                        user_coupon_id,
                        idempotency_key,
                    })
                })
                .boxed(),
            CASES,
        ),
        (
            (order_id(), user_id())
                .prop_map(|(order_id, user_id)| {
                    Call::GetOrder(GetOrderRequest { order_id, user_id })
                })
                .boxed(),
            CASES,
        ),
        (
            (order_id(), user_id())
                .prop_map(|(order_id, user_id)| {
                    Call::CancelOrder(CancelOrderRequest { order_id, user_id })
                })
                .boxed(),
            CASES,
        ),
        (
            (order_id(), user_id(), idempotency_key())
                .prop_map(|(order_id, user_id, idempotency_key)| {
                    Call::Pay(PayRequest {
                        order_id,
                        user_id,
                        idempotency_key,
                    })
                })
                .boxed(),
            CASES,
        ),
        (
            user_id()
                .prop_map(|user_id| Call::GetCart(GetCartRequest { user_id }))
                .boxed(),
            CASES,
        ),
        (
            (user_id(), id(), int32(0..=1000))
                .prop_map(|(user_id, product_id, quantity)| {
                    Call::SetItem(SetItemRequest {
                        user_id,
                        product_id,
                        quantity,
                    })
                })
                .boxed(),
            CASES,
        ),
        (
            (user_id(), id())
                .prop_map(|(user_id, product_id)| {
                    Call::RemoveItem(RemoveItemRequest {
                        user_id,
                        product_id,
                    })
                })
                .boxed(),
            CASES,
        ),
        (
            user_id()
                .prop_map(|user_id| Call::Clear(ClearRequest { user_id }))
                .boxed(),
            CASES,
        ),
        (
            (
                user_id(),
                prop_oneof![3 => Just(0i64), 2 => id()],
                idempotency_key(),
            )
                .prop_map(|(user_id, user_coupon_id, idempotency_key)| {
                    Call::Checkout(CheckoutRequest {
                        user_id,
                        user_coupon_id,
                        idempotency_key,
                    })
                })
                .boxed(),
            CASES,
        ),
        (create_product_calls(Just(Auth::Admin)).boxed(), CASES),
        (update_product_calls(Just(Auth::Admin)).boxed(), CASES),
        (adjust_stock_calls(Just(Auth::Admin)).boxed(), CASES),
        (create_coupon_calls(Just(Auth::Admin)).boxed(), CASES),
        (list_parked_calls(Just(Auth::Admin)).boxed(), CASES),
        (redrive_calls(Just(Auth::Admin)).boxed(), CASES),
        (refund_calls(Just(Auth::Admin)).boxed(), CASES),
        (
            create_product_calls(no_admin()).boxed(),
            UNAUTHENTICATED_CASES,
        ),
        (
            update_product_calls(no_admin()).boxed(),
            UNAUTHENTICATED_CASES,
        ),
        (
            adjust_stock_calls(no_admin()).boxed(),
            UNAUTHENTICATED_CASES,
        ),
        (
            create_coupon_calls(no_admin()).boxed(),
            UNAUTHENTICATED_CASES,
        ),
        (list_parked_calls(no_admin()).boxed(), UNAUTHENTICATED_CASES),
        (redrive_calls(no_admin()).boxed(), UNAUTHENTICATED_CASES),
        (refund_calls(no_admin()).boxed(), UNAUTHENTICATED_CASES),
        // Issue 21's reads, drawn after the others so that their draws stay as they were.
        (
            (user_id(), statuses(4), int32(0..=100), created_page_token())
                .prop_map(|(user_id, statuses, page_size, page_token)| {
                    Call::ListOrders(ListOrdersRequest {
                        user_id,
                        statuses,
                        page_size,
                        page_token,
                    })
                })
                .boxed(),
            CASES,
        ),
        (admin_get_order_calls(Just(Auth::Admin)).boxed(), CASES),
        (admin_list_orders_calls(Just(Auth::Admin)).boxed(), CASES),
        (admin_list_products_calls(Just(Auth::Admin)).boxed(), CASES),
        (list_coupons_calls(Just(Auth::Admin)).boxed(), CASES),
        (update_coupon_calls(Just(Auth::Admin)).boxed(), CASES),
        (
            list_coupons_calls(no_admin()).boxed(),
            UNAUTHENTICATED_CASES,
        ),
        (
            update_coupon_calls(no_admin()).boxed(),
            UNAUTHENTICATED_CASES,
        ),
        (
            admin_get_order_calls(no_admin()).boxed(),
            UNAUTHENTICATED_CASES,
        ),
        (
            admin_list_orders_calls(no_admin()).boxed(),
            UNAUTHENTICATED_CASES,
        ),
        (
            admin_list_products_calls(no_admin()).boxed(),
            UNAUTHENTICATED_CASES,
        ),
    ]
}

fn runner(seed: u64) -> TestRunner {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    )
}

/// Draws every RPC's cases and shuffles them together.
pub(super) fn draw_calls(seed: u64) -> Vec<Call> {
    let mut calls = Vec::new();
    for (i, (strategy, cases)) in strategies().into_iter().enumerate() {
        let mut runner = runner(seed.wrapping_add(i as u64 + 1));
        for _ in 0..cases {
            calls.push(
                strategy
                    .new_tree(&mut runner)
                    .expect("strategies never reject")
                    .current(),
            );
        }
    }
    let order = Just((0..calls.len()).collect::<Vec<usize>>())
        .prop_shuffle()
        .new_tree(&mut runner(seed))
        .expect("a shuffle never rejects")
        .current();
    let mut slots: Vec<Option<Call>> = calls.into_iter().map(Some).collect();
    order
        .into_iter()
        .map(|i| slots[i].take().expect("a permutation"))
        .collect()
}
