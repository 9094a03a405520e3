//! Hostile input, property-based: every RPC of `ecommerce.v1` gets a few hundred requests drawn by
//! proptest strategies from the values that break services (0, negative and extreme ids and
//! amounts, i32 extremes, empty, 1 MB, non-ASCII and control-character strings, NUL, 10,000 order
//! lines, repeated products, unknown enum numbers, missing optional fields, garbage page tokens)
//! and sent to a real server holding a small realistic shop.
//!
//! `#[sqlx::test]` runs on a current-thread runtime, so proptest's blocking runner cannot drive
//! async calls: the cases are drawn up front from a fixed seed (a failure reproduces exactly),
//! shuffled together so that what one call changes (a restock, a cancel, a payment) is what the
//! next ones meet, and then sent one at a time.
//!
//! Every answer must be OK or a documented refusal carrying an `ecommerce` ErrorInfo; a refusal
//! (and any answer of a read-only RPC) must leave the database exactly as it was; and the server
//! must still answer its health check at the end.

use std::{
    collections::BTreeMap,
    fmt,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use ecommerce::{
    domain::MAX_STOCK,
    error::code_name,
    proto::{
        AdjustStockRequest, CancelOrderRequest, ChargeBalanceRequest, CreateCouponRequest,
        CreateProductRequest, Discount, FixedDiscount, GetBalanceRequest, GetCouponRequest,
        GetOrderRequest, GetPopularProductsRequest, GetProductRequest, IssueCouponRequest,
        ListBalanceHistoryRequest, ListProductsRequest, ListUserCouponsRequest, OrderLine,
        OrderStatus, PayRequest, PercentDiscount, PlaceOrderRequest, ProductStatus,
        UpdateProductRequest, discount,
    },
};
use proptest::{
    collection::vec,
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};
use prost::Message;
use prost_types::Timestamp;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::{Code, Status};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt;

use crate::support::{
    TestApp, assert_no_violations,
    coupons::{coupon_request, create_coupon_with, issue},
    eventually, invalid_field,
    shop::{
        charge, create_product, create_product_with_status, get_order, pay, place, place_with,
        stock,
    },
    spawn_app, spawn_app_with,
};

/// The server's default `MAX_MESSAGE_BYTES`.
const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// The server's default `MAX_BALANCE`.
const MAX_BALANCE: i64 = 1_000_000_000_000;
/// Cases per RPC (and per RPC without the admin token). Sized so the whole run stays well
/// under a minute on two shared cores.
const CASES: usize = 300;
const UNAUTHENTICATED_CASES: usize = 80;
/// Every case list derives from the seed: `HOSTILE_SEED=<u64>` explores other corners, the
/// default keeps CI's run the same every time.
const DEFAULT_SEED: u64 = 0x0005_eed0_f00d;

/// The codes the contract documents for callers' mistakes and business refusals. INTERNAL,
/// UNKNOWN, UNAVAILABLE (the dependencies are up) and DEADLINE_EXCEEDED (nothing is slow here)
/// would each mean the server mishandled an input.
const DOCUMENTED: &[Code] = &[
    Code::Ok,
    Code::InvalidArgument,
    Code::NotFound,
    Code::FailedPrecondition,
    Code::AlreadyExists,
    Code::ResourceExhausted,
    Code::OutOfRange,
    Code::Aborted,
    Code::PermissionDenied,
    Code::Unauthenticated,
];

// ---------------------------------------------------------------------------------------------
// Strategies

// Every field is drawn from `sane_or_hostile`: mostly a value the server accepts, sometimes a
// hostile one. A request whose every field is hostile is refused by its first check, so the
// deep paths (Postgres, the coupon gate, pricing) only meet a hostile value when the fields
// before it are sane: with 4:1 odds a typical request carries one hostile field or none.

fn sane_or_hostile<T: fmt::Debug + Clone + 'static>(
    sane: impl Strategy<Value = T> + 'static,
    hostile: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<T> {
    prop_oneof![4 => sane, 1 => hostile].boxed()
}

/// Ids: mostly in `sane` (the fixture's rows, so that calls meet real rows and succeed often
/// enough to change state), otherwise a boundary, an unknown id, anything at all.
fn id_in(sane: std::ops::RangeInclusive<i64>) -> BoxedStrategy<i64> {
    sane_or_hostile(
        sane,
        prop_oneof![
            Just(0i64),
            Just(-1i64),
            Just(i64::MIN),
            Just(i64::MAX),
            7..=1_000i64,
            any::<i64>(),
        ],
    )
}

/// Products, coupons, user coupons: the fixture has 6, 3 and 2 of them.
fn id() -> BoxedStrategy<i64> {
    id_in(1..=6)
}

/// Users 1 and 2 are funded and hold coupons, 3 and 4 are strangers.
fn user_id() -> BoxedStrategy<i64> {
    id_in(1..=4)
}

/// Orders: the fixture's 3 and those the run places.
fn order_id() -> BoxedStrategy<i64> {
    id_in(1..=40)
}

fn hostile_i64() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(-1i64),
        Just(i64::MIN),
        Just(i64::MAX),
        Just(i64::MAX - 1),
        Just(MAX_BALANCE),
        Just(MAX_BALANCE + 1),
        any::<i64>(),
    ]
}

fn amount() -> BoxedStrategy<i64> {
    sane_or_hostile(1..=200_000i64, hostile_i64())
}

fn hostile_i32() -> impl Strategy<Value = i32> {
    prop_oneof![
        Just(0i32),
        Just(-1i32),
        Just(i32::MIN),
        Just(i32::MAX),
        Just(i32::MIN + 1),
        -200..=200i32,
        any::<i32>(),
    ]
}

fn int32(sane: std::ops::RangeInclusive<i32>) -> BoxedStrategy<i32> {
    sane_or_hostile(sane, hostile_i32())
}

/// Enum fields: a known value, or UNSPECIFIED, or a number no version of the contract has.
fn enum_number() -> BoxedStrategy<i32> {
    sane_or_hostile(
        1..=3i32,
        prop_oneof![
            Just(0i32),
            Just(4i32),
            Just(99i32),
            Just(-1i32),
            Just(i32::MIN),
            Just(i32::MAX),
        ],
    )
}

/// Hostile strings: empty, blank, arbitrary Unicode (`.` includes control characters and NUL),
/// control characters only, NUL inside, at the 200-character and 128-byte limits and one past,
/// 1,000,000 bytes (under the message limit, so the server must read and refuse it) and 1 MiB
/// (over it, so the server must refuse it unread).
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(String::new()),
        1 => Just(" \t ".to_string()),
        3 => any::<String>(),
        2 => "\\PC{1,40}",
        2 => "[\\x00-\\x1f\\x7f]{1,8}",
        1 => "[a-z]{1,5}".prop_map(|s| format!("{s}\0{s}")),
        1 => Just("한".repeat(200)),
        1 => Just("한".repeat(201)),
        1 => Just("k".repeat(128)),
        1 => Just("k".repeat(129)),
        1 => Just("x".repeat(1_000_000)),
        1 => Just("x".repeat(MAX_MESSAGE_BYTES)),
    ]
}

fn name() -> BoxedStrategy<String> {
    sane_or_hostile("[A-Za-z0-9][A-Za-z0-9 _-]{0,29}", hostile_text())
}

/// Idempotency keys: mostly a few fixed ones, so that replays and reuse of a key for another
/// request happen.
fn idempotency_key() -> BoxedStrategy<String> {
    sane_or_hostile(
        prop_oneof![
            Just(String::new()),
            prop::sample::select(vec!["k1", "k2", "retry-3"]).prop_map(String::from),
            "[a-z0-9-]{8}",
        ],
        hostile_text(),
    )
}

/// The token this service issues for a page ending at `key` (a format the tests may know).
fn page_token_for(key: i64) -> String {
    let mut bytes = vec![1u8];
    bytes.extend_from_slice(&key.to_be_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

fn page_token() -> BoxedStrategy<String> {
    sane_or_hostile(
        prop_oneof![Just(String::new()), (1..=20i64).prop_map(page_token_for)],
        prop_oneof![
            hostile_i64().prop_map(page_token_for),
            (2..=255u8, any::<i64>()).prop_map(|(version, key)| {
                let mut bytes = vec![version];
                bytes.extend_from_slice(&key.to_be_bytes());
                URL_SAFE_NO_PAD.encode(bytes)
            }),
            vec(any::<u8>(), 0..40).prop_map(|bytes| URL_SAFE_NO_PAD.encode(bytes)),
            "[A-Za-z0-9_=+/-]{1,48}",
            hostile_text(),
        ],
    )
}

fn timestamp(sane_from_now: std::ops::Range<i64>) -> BoxedStrategy<Option<Timestamp>> {
    let now = Utc::now().timestamp();
    let sane = (
        (now + sane_from_now.start)..(now + sane_from_now.end),
        0..1_000_000_000i32,
    )
        .prop_map(|(seconds, nanos)| Some(Timestamp { seconds, nanos }));
    let seconds = prop_oneof![
        3 => (now - 86_400)..(now + 86_400),
        1 => Just(0i64),
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
        1 => Just(-62_135_596_800i64), // 0001-01-01T00:00:00Z, the first instant protobuf allows
        1 => Just(-62_135_596_801i64),
        1 => Just(253_402_300_799i64), // 9999-12-31T23:59:59Z, the last
        1 => Just(253_402_300_800i64),
        1 => Just(DateTime::<Utc>::MIN_UTC.timestamp()),
        1 => Just(DateTime::<Utc>::MAX_UTC.timestamp()),
        1 => any::<i64>(),
    ];
    let nanos = prop_oneof![
        3 => Just(0i32),
        1 => Just(-1i32),
        1 => Just(999_999_999i32),
        1 => Just(1_000_000_000i32),
        // A leap second as chrono spells it (accepted at :59 only).
        1 => Just(1_500_000_000i32),
        1 => Just(i32::MIN),
        1 => Just(i32::MAX),
    ];
    sane_or_hostile(
        sane,
        prop_oneof![
            1 => Just(None),
            6 => (seconds, nanos).prop_map(|(seconds, nanos)| Some(Timestamp { seconds, nanos })),
        ],
    )
}

fn discount() -> BoxedStrategy<Option<Discount>> {
    let fixed = |amount| {
        Some(Discount {
            kind: Some(discount::Kind::Fixed(FixedDiscount { amount })),
        })
    };
    let percent = |(percent, max_discount)| {
        Some(Discount {
            kind: Some(discount::Kind::Percent(PercentDiscount {
                percent,
                max_discount,
            })),
        })
    };
    sane_or_hostile(
        prop_oneof![
            (1..=20_000i64).prop_map(fixed),
            (1..=100i32, 0..=10_000i64).prop_map(percent),
        ],
        prop_oneof![
            Just(None),
            Just(Some(Discount { kind: None })),
            hostile_i64().prop_map(fixed),
            (hostile_i32(), any::<i64>()).prop_map(percent),
            (1..=100i32, hostile_i64()).prop_map(percent),
        ],
    )
}

fn quantity() -> BoxedStrategy<i32> {
    sane_or_hostile(
        1..=3i32,
        prop_oneof![
            Just(0i32),
            Just(-1i32),
            Just(1_000i32),
            Just(1_001i32),
            Just(i32::MIN),
            Just(i32::MAX),
            any::<i32>(),
        ],
    )
}

fn line() -> impl Strategy<Value = OrderLine> {
    (id(), quantity()).prop_map(|(product_id, quantity)| OrderLine {
        product_id,
        quantity,
    })
}

fn lines() -> BoxedStrategy<Vec<OrderLine>> {
    sane_or_hostile(
        // Distinct fixture products, so that the order can be placed.
        (
            prop::sample::subsequence(vec![1i64, 2, 3, 4, 5, 6], 1..=3),
            vec(1..=3i32, 3),
        )
            .prop_map(|(products, quantities)| {
                products
                    .into_iter()
                    .zip(quantities)
                    .map(|(product_id, quantity)| OrderLine {
                        product_id,
                        quantity,
                    })
                    .collect()
            }),
        prop_oneof![
            2 => Just(Vec::new()),
            6 => vec(line(), 1..=4),
            1 => vec(line(), 49..=51),
            2 => (line(), 2..=5usize).prop_map(|(line, n)| vec![line; n]),
            1 => Just((1..=10_000).map(|product_id| OrderLine { product_id, quantity: 1 }).collect()),
            1 => line().prop_map(|line| vec![line; 10_000]),
        ],
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Auth {
    Admin,
    Missing,
    Wrong,
}

fn no_admin() -> impl Strategy<Value = Auth> {
    prop_oneof![Just(Auth::Missing), Just(Auth::Wrong)]
}

// ---------------------------------------------------------------------------------------------
// Calls

#[derive(Clone)]
enum Call {
    ChargeBalance(ChargeBalanceRequest),
    GetBalance(GetBalanceRequest),
    ListBalanceHistory(ListBalanceHistoryRequest),
    ListProducts(ListProductsRequest),
    GetProduct(GetProductRequest),
    GetPopularProducts(GetPopularProductsRequest),
    IssueCoupon(IssueCouponRequest),
    GetCoupon(GetCouponRequest),
    ListUserCoupons(ListUserCouponsRequest),
    PlaceOrder(PlaceOrderRequest),
    GetOrder(GetOrderRequest),
    CancelOrder(CancelOrderRequest),
    Pay(PayRequest),
    CreateProduct(Auth, CreateProductRequest),
    UpdateProduct(Auth, UpdateProductRequest),
    AdjustStock(Auth, AdjustStockRequest),
    CreateCoupon(Auth, CreateCouponRequest),
}

/// Debug output with long strings cut, so a failing 1 MB case prints as one line.
impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = match self {
            Call::ChargeBalance(r) => format!("{r:?}"),
            Call::GetBalance(r) => format!("{r:?}"),
            Call::ListBalanceHistory(r) => format!("{r:?}"),
            Call::ListProducts(r) => format!("{r:?}"),
            Call::GetProduct(r) => format!("{r:?}"),
            Call::GetPopularProducts(r) => format!("{r:?}"),
            Call::IssueCoupon(r) => format!("{r:?}"),
            Call::GetCoupon(r) => format!("{r:?}"),
            Call::ListUserCoupons(r) => format!("{r:?}"),
            Call::PlaceOrder(r) => format!("{r:?}"),
            Call::GetOrder(r) => format!("{r:?}"),
            Call::CancelOrder(r) => format!("{r:?}"),
            Call::Pay(r) => format!("{r:?}"),
            Call::CreateProduct(a, r) => format!("{a:?} {r:?}"),
            Call::UpdateProduct(a, r) => format!("{a:?} {r:?}"),
            Call::AdjustStock(a, r) => format!("{a:?} {r:?}"),
            Call::CreateCoupon(a, r) => format!("{a:?} {r:?}"),
        };
        if full.len() > 600 {
            let cut = full.char_indices().nth(600).map_or(full.len(), |(i, _)| i);
            write!(
                f,
                "{} {}... ({} bytes)",
                self.rpc(),
                &full[..cut],
                full.len()
            )
        } else {
            write!(f, "{} {full}", self.rpc())
        }
    }
}

impl Call {
    fn rpc(&self) -> &'static str {
        match self {
            Call::ChargeBalance(_) => "ChargeBalance",
            Call::GetBalance(_) => "GetBalance",
            Call::ListBalanceHistory(_) => "ListBalanceHistory",
            Call::ListProducts(_) => "ListProducts",
            Call::GetProduct(_) => "GetProduct",
            Call::GetPopularProducts(_) => "GetPopularProducts",
            Call::IssueCoupon(_) => "IssueCoupon",
            Call::GetCoupon(_) => "GetCoupon",
            Call::ListUserCoupons(_) => "ListUserCoupons",
            Call::PlaceOrder(_) => "PlaceOrder",
            Call::GetOrder(_) => "GetOrder",
            Call::CancelOrder(_) => "CancelOrder",
            Call::Pay(_) => "Pay",
            Call::CreateProduct(Auth::Admin, _) => "CreateProduct",
            Call::CreateProduct(..) => "CreateProduct (no token)",
            Call::UpdateProduct(Auth::Admin, _) => "UpdateProduct",
            Call::UpdateProduct(..) => "UpdateProduct (no token)",
            Call::AdjustStock(Auth::Admin, _) => "AdjustStock",
            Call::AdjustStock(..) => "AdjustStock (no token)",
            Call::CreateCoupon(Auth::Admin, _) => "CreateCoupon",
            Call::CreateCoupon(..) => "CreateCoupon (no token)",
        }
    }

    fn read_only(&self) -> bool {
        matches!(
            self,
            Call::GetBalance(_)
                | Call::ListBalanceHistory(_)
                | Call::ListProducts(_)
                | Call::GetProduct(_)
                | Call::GetPopularProducts(_)
                | Call::GetCoupon(_)
                | Call::ListUserCoupons(_)
                | Call::GetOrder(_)
        )
    }

    fn auth(&self) -> Option<Auth> {
        match self {
            Call::CreateProduct(a, _)
            | Call::UpdateProduct(a, _)
            | Call::AdjustStock(a, _)
            | Call::CreateCoupon(a, _) => Some(*a),
            _ => None,
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            Call::ChargeBalance(r) => r.encoded_len(),
            Call::GetBalance(r) => r.encoded_len(),
            Call::ListBalanceHistory(r) => r.encoded_len(),
            Call::ListProducts(r) => r.encoded_len(),
            Call::GetProduct(r) => r.encoded_len(),
            Call::GetPopularProducts(r) => r.encoded_len(),
            Call::IssueCoupon(r) => r.encoded_len(),
            Call::GetCoupon(r) => r.encoded_len(),
            Call::ListUserCoupons(r) => r.encoded_len(),
            Call::PlaceOrder(r) => r.encoded_len(),
            Call::GetOrder(r) => r.encoded_len(),
            Call::CancelOrder(r) => r.encoded_len(),
            Call::Pay(r) => r.encoded_len(),
            Call::CreateProduct(_, r) => r.encoded_len(),
            Call::UpdateProduct(_, r) => r.encoded_len(),
            Call::AdjustStock(_, r) => r.encoded_len(),
            Call::CreateCoupon(_, r) => r.encoded_len(),
        }
    }

    /// Requests the contract refuses whatever the data: a required id that is not positive, an
    /// empty or over-long order. (A cheap oracle on top of "a documented code".)
    fn surely_invalid(&self) -> bool {
        let bad = |id: i64| id <= 0;
        match self {
            Call::ChargeBalance(r) => bad(r.user_id) || r.amount <= 0,
            Call::GetBalance(r) => bad(r.user_id),
            Call::ListBalanceHistory(r) => bad(r.user_id) || !(0..=100).contains(&r.page_size),
            Call::ListProducts(r) => !(0..=100).contains(&r.page_size),
            Call::GetProduct(r) => bad(r.product_id),
            Call::GetPopularProducts(r) => {
                !(0..=30).contains(&r.days) || !(0..=100).contains(&r.limit)
            }
            Call::IssueCoupon(r) => bad(r.user_id) || bad(r.coupon_id),
            Call::GetCoupon(r) => bad(r.coupon_id),
            Call::ListUserCoupons(r) => bad(r.user_id) || !(0..=100).contains(&r.page_size),
            Call::PlaceOrder(r) => {
                bad(r.user_id)
                    || r.items.is_empty()
                    || r.items.len() > 50
                    || r.user_coupon_id < 0
                    || r.items.iter().any(|l| bad(l.product_id))
                    || r.items.iter().any(|l| !(1..=1000).contains(&l.quantity))
            }
            Call::GetOrder(r) => bad(r.order_id) || bad(r.user_id),
            Call::CancelOrder(r) => bad(r.order_id) || bad(r.user_id),
            Call::Pay(r) => bad(r.order_id) || bad(r.user_id),
            Call::CreateProduct(_, r) => r.price < 0 || r.stock < 0 || !(1..=3).contains(&r.status),
            Call::UpdateProduct(_, r) => {
                bad(r.product_id)
                    || r.price.is_some_and(|p| p < 0)
                    || r.stock.is_some_and(|s| s < 0)
                    || r.expected_stock.is_some_and(|s| s < 0)
                    || r.status.is_some_and(|s| !(1..=3).contains(&s))
            }
            Call::AdjustStock(_, r) => bad(r.product_id) || r.delta == 0,
            Call::CreateCoupon(_, r) => {
                r.discount.as_ref().and_then(|d| d.kind.as_ref()).is_none()
                    || r.min_order_amount < 0
                    || !(1..=1_000_000).contains(&r.total_quantity)
                    || !(1..=3650).contains(&r.valid_days)
                    || r.issue_starts_at.is_none()
                    || r.issue_ends_at.is_none()
            }
        }
    }

    /// Sends the call; the response body is dropped (the invariants are about codes and state).
    async fn send(self, app: &TestApp) -> Result<(), Status> {
        let admin = |auth: Auth| match auth {
            Auth::Admin => app.admin(),
            Auth::Missing => app.admin_with_token(None),
            Auth::Wrong => app.admin_with_token(Some("test-admin-tokeN")),
        };
        match self {
            Call::ChargeBalance(r) => app.balance().charge_balance(r).await.map(drop),
            Call::GetBalance(r) => app.balance().get_balance(r).await.map(drop),
            Call::ListBalanceHistory(r) => app.balance().list_balance_history(r).await.map(drop),
            Call::ListProducts(r) => app.products().list_products(r).await.map(drop),
            Call::GetProduct(r) => app.products().get_product(r).await.map(drop),
            Call::GetPopularProducts(r) => app.products().get_popular_products(r).await.map(drop),
            Call::IssueCoupon(r) => app.coupons().issue_coupon(r).await.map(drop),
            Call::GetCoupon(r) => app.coupons().get_coupon(r).await.map(drop),
            Call::ListUserCoupons(r) => app.coupons().list_user_coupons(r).await.map(drop),
            Call::PlaceOrder(r) => app.orders().place_order(r).await.map(drop),
            Call::GetOrder(r) => app.orders().get_order(r).await.map(drop),
            Call::CancelOrder(r) => app.orders().cancel_order(r).await.map(drop),
            Call::Pay(r) => app.payments().pay(r).await.map(drop),
            Call::CreateProduct(a, r) => admin(a).create_product(r).await.map(drop),
            Call::UpdateProduct(a, r) => admin(a).update_product(r).await.map(drop),
            Call::AdjustStock(a, r) => admin(a).adjust_stock(r).await.map(drop),
            Call::CreateCoupon(a, r) => admin(a).create_coupon(r).await.map(drop),
        }
    }
}

fn create_product_calls(auth: impl Strategy<Value = Auth>) -> impl Strategy<Value = Call> {
    let stock = sane_or_hostile(0..=1_000i64, hostile_i64());
    let price = sane_or_hostile(0..=100_000i64, hostile_i64());
    (auth, name(), price, stock, enum_number()).prop_map(|(auth, name, price, stock, status)| {
        Call::CreateProduct(
            auth,
            CreateProductRequest {
                name,
                price,
                stock,
                status,
            },
        )
    })
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
    (auth, id(), sane_or_hostile(-50..=50i64, hostile_i64())).prop_map(
        |(auth, product_id, delta)| {
            Call::AdjustStock(auth, AdjustStockRequest { product_id, delta })
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
    )
        .prop_map(
            |(auth, name, discount, min_order_amount, total_quantity, starts, ends, valid_days)| {
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
        (create_product_calls(Just(Auth::Admin)).boxed(), CASES),
        (update_product_calls(Just(Auth::Admin)).boxed(), CASES),
        (adjust_stock_calls(Just(Auth::Admin)).boxed(), CASES),
        (create_coupon_calls(Just(Auth::Admin)).boxed(), CASES),
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
fn draw_calls(seed: u64) -> Vec<Call> {
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

// ---------------------------------------------------------------------------------------------
// The shop the calls meet, and what "unchanged" means

/// A few products of each status, coupons that can and cannot be issued, funded and unfunded
/// users, coupons held, a pending order and a paid one. All ids fall in 1..=6, where `id()`
/// draws most of its values.
async fn build_fixture(app: &TestApp) {
    use ProductStatus::*;
    for (name, price, stock, status) in [
        ("keyboard", 10_000, 100, Selling),
        ("mouse", 3_000, 5, Selling),
        ("lamp", 7_000, 0, Selling),
        ("discontinued radio", 20_000, 10, Stopped),
        ("concert ticket", 90_000, 0, SoldOut),
        ("free sticker", 0, 50, Selling),
    ] {
        create_product_with_status(app, name, price, stock, status).await;
    }
    let fixed = create_coupon_with(app, coupon_request(10)).await;
    let percent = create_coupon_with(
        app,
        CreateCouponRequest {
            name: "10% off, at most 2,000".into(),
            discount: Some(Discount {
                kind: Some(discount::Kind::Percent(PercentDiscount {
                    percent: 10,
                    max_discount: 2_000,
                })),
            }),
            min_order_amount: 5_000,
            ..coupon_request(3)
        },
    )
    .await;
    let now = Utc::now();
    create_coupon_with(
        app,
        CreateCouponRequest {
            name: "starts tomorrow".into(),
            issue_starts_at: Some(Timestamp {
                seconds: (now + chrono::Duration::days(1)).timestamp(),
                nanos: 0,
            }),
            issue_ends_at: Some(Timestamp {
                seconds: (now + chrono::Duration::days(2)).timestamp(),
                nanos: 0,
            }),
            ..coupon_request(5)
        },
    )
    .await;

    charge(app, 1, 1_000_000).await;
    charge(app, 2, 5_000).await;
    let held = issue(app, fixed, 1).await.expect("issue");
    issue(app, percent, 2).await.expect("issue");
    place_with(
        app,
        PlaceOrderRequest {
            user_id: 1,
            items: vec![OrderLine {
                product_id: 1,
                quantity: 2,
            }],
            user_coupon_id: held,
            idempotency_key: String::new(),
        },
    )
    .await
    .expect("pending order");
    let paid = place(app, 1, &[(2, 1)]).await.expect("order to pay");
    pay(app, 1, paid.id).await.expect("paid order");
    place(app, 2, &[(6, 3)]).await.expect("pending free order");
}

/// The whole database in one statement: counts and sums of every table, statuses counted, and
/// the catalog hashed (name, price, stock and status of every product; every coupon's terms).
/// Outbox events are counted, not read by status: the delivery job flips them on its own.
const FINGERPRINT: &str = "
SELECT concat_ws(' | ',
  (SELECT format('user_balances %s/%s', count(*), coalesce(sum(balance), 0))
     FROM user_balances),
  (SELECT format('balance_history %s/%s/%s', count(*), coalesce(sum(amount), 0),
                 coalesce(max(id), 0))
     FROM balance_history),
  (SELECT format('products %s/%s/%s', count(*), coalesce(sum(stock), 0),
                 md5(coalesce(string_agg(concat_ws(':', id, status, price, stock, name), ','
                                         ORDER BY id), '')))
     FROM products),
  (SELECT format('coupons %s/%s', count(*),
                 md5(coalesce(string_agg(c::text, ',' ORDER BY id), '')))
     FROM coupons c),
  (SELECT 'user_coupons ' || coalesce(string_agg(s, ',' ORDER BY s), '')
     FROM (SELECT status || '=' || count(*) AS s FROM user_coupons GROUP BY status) uc),
  (SELECT 'orders ' || coalesce(string_agg(s, ',' ORDER BY s), '')
     FROM (SELECT status || '=' || count(*) AS s FROM orders GROUP BY status) o),
  (SELECT format('order_items %s/%s', count(*), coalesce(sum(quantity), 0)) FROM order_items),
  (SELECT format('payments %s/%s', count(*), coalesce(sum(amount), 0)) FROM payments),
  (SELECT format('outbox_events %s', count(*)) FROM outbox_events),
  (SELECT format('idempotency_keys %s', count(*)) FROM idempotency_keys)
)";

async fn fingerprint(app: &TestApp) -> String {
    sqlx::query_scalar(FINGERPRINT)
        .fetch_one(&app.pg)
        .await
        .expect("fingerprint")
}

/// What is wrong with this answer to this call, if anything (state is checked separately).
fn judge(call: &Call, result: &Result<(), Status>) -> Option<String> {
    let status = match result {
        Ok(()) => {
            if call.auth().is_some_and(|a| a != Auth::Admin) {
                return Some("an admin call without the token succeeded".into());
            }
            if call.surely_invalid() {
                return Some("an invalid request succeeded".into());
            }
            return None;
        }
        Err(status) => status,
    };
    let code = status.code();
    if !DOCUMENTED.contains(&code) {
        return Some(format!("undocumented code: {status:?}"));
    }
    let Some(info) = status.get_details_error_info() else {
        return Some(format!("no ErrorInfo: {status:?}"));
    };
    if info.domain != "ecommerce" || info.reason.is_empty() {
        return Some(format!("bad ErrorInfo {info:?}"));
    }
    let too_large = call.encoded_len() > MAX_MESSAGE_BYTES;
    let expected = match call.auth() {
        Some(Auth::Missing | Auth::Wrong) => Some((Code::Unauthenticated, "UNAUTHENTICATED")),
        _ if too_large => Some((Code::ResourceExhausted, "MESSAGE_TOO_LARGE")),
        _ if call.surely_invalid() => Some((Code::InvalidArgument, "")),
        _ => None,
    };
    match expected {
        Some((want, reason)) if code != want || (!reason.is_empty() && info.reason != reason) => {
            Some(format!("expected {want:?} {reason}, got {status:?}"))
        }
        Some(_) => None,
        None if code == Code::Unauthenticated => Some("UNAUTHENTICATED with the token".into()),
        None if info.reason == "MESSAGE_TOO_LARGE" => Some(format!(
            "MESSAGE_TOO_LARGE for {} bytes",
            call.encoded_len()
        )),
        None => None,
    }
}

#[sqlx::test(migrations = false)]
async fn every_rpc_answers_hostile_input_with_a_documented_refusal_and_no_side_effect(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;
    build_fixture(&app).await;
    let seed = std::env::var("HOSTILE_SEED")
        .ok()
        .map(|s| s.parse().expect("HOSTILE_SEED is a u64"))
        .unwrap_or(DEFAULT_SEED);
    let calls = draw_calls(seed);

    let started = Instant::now();
    let mut tally: BTreeMap<&'static str, BTreeMap<&'static str, usize>> = BTreeMap::new();
    let mut violations = Vec::new();
    for call in calls {
        let rpc = call.rpc();
        let read_only = call.read_only();
        let judged = call.clone();
        let before = fingerprint(&app).await;
        let result = call.send(&app).await;
        let code = result.as_ref().err().map_or(Code::Ok, Status::code);
        *tally
            .entry(rpc)
            .or_default()
            .entry(code_name(code))
            .or_default() += 1;
        if let Some(problem) = judge(&judged, &result) {
            violations.push(format!("{judged:?}: {problem}"));
        }
        if result.is_err() || read_only {
            let after = fingerprint(&app).await;
            if after != before {
                violations.push(format!(
                    "{judged:?} answered {} and changed the database:\n  before {before}\n  after  {after}",
                    code_name(code)
                ));
            }
        }
    }
    let elapsed = started.elapsed();

    let mut health = HealthClient::new(app.channel.clone());
    let serving = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status());
    assert_eq!(
        serving.ok(),
        Some(ServingStatus::Serving),
        "the server must still answer after the run"
    );

    let total: usize = tally.values().flat_map(|codes| codes.values()).sum();
    eprintln!("hostile input (seed {seed}): {total} calls in {elapsed:.1?}");
    for (rpc, codes) in &tally {
        let cases: usize = codes.values().sum();
        let codes: Vec<String> = codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        eprintln!("  {rpc:<26} {cases:>4} cases: {}", codes.join(", "));
    }
    assert_no_violations(&violations);
    app.stop().await;
}

/// The admin sets stock outright while orders hold units; cancelling or expiring such an order
/// adds its units back. Stock is bounded so that this addition can never overflow: an order
/// holding units of a product restocked to i64::MAX used to fail its cancel with INTERNAL and
/// block the expiry job's whole batch, every run.
#[sqlx::test(migrations = false)]
async fn stock_is_bounded_so_released_units_always_fit(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, |s| {
        s.set("ORDER_TTL_SECS", 1)
            .set("ORDER_EXPIRY_INTERVAL_SECS", 1);
    })
    .await;
    let product = create_product(&app, "bulk screws", 10, 100).await;
    charge(&app, 1, 1_000_000).await;
    let restock = |stock: i64| {
        let mut admin = app.admin();
        async move {
            admin
                .update_product(UpdateProductRequest {
                    product_id: product,
                    stock: Some(stock),
                    ..Default::default()
                })
                .await
        }
    };

    for too_many in [i64::MAX, i64::MAX - 1, MAX_STOCK + 1] {
        let refused = restock(too_many).await.unwrap_err();
        assert_eq!(invalid_field(&refused), "stock");
        let created = app
            .admin()
            .create_product(CreateProductRequest {
                name: "too many".into(),
                price: 1,
                stock: too_many,
                status: ProductStatus::Selling.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&created), "stock");
    }

    // Cancel: the held units come back on top of a maximal restock.
    let order = place(&app, 1, &[(product, 7)]).await.unwrap();
    restock(MAX_STOCK).await.unwrap();
    app.orders()
        .cancel_order(CancelOrderRequest {
            order_id: order.id,
            user_id: 1,
        })
        .await
        .expect("cancel after a maximal restock");
    assert_eq!(stock(&app, product).await, MAX_STOCK + 7);

    // Expiry: the same for the job, which must not be stuck on such an order.
    let order = place(&app, 1, &[(product, 5)]).await.unwrap();
    restock(MAX_STOCK).await.unwrap();
    let expired = eventually(Duration::from_secs(20), || async {
        get_order(&app, 1, order.id).await.unwrap().status() == OrderStatus::Expired
    })
    .await;
    assert!(expired, "the expiry job closes the order");
    assert_eq!(stock(&app, product).await, MAX_STOCK + 5);
    app.stop().await;
}
