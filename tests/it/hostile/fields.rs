//! What each request field is drawn from: through `sane_or_hostile`, mostly a value the server
//! accepts, sometimes one that breaks services (0, negative and extreme numbers, unknown enum
//! numbers, empty, huge, non-ASCII and control-character strings, garbage page tokens, impossible
//! timestamps).
//!
//! A request whose every field is hostile is refused by its first check, so the deep paths
//! (Postgres, the coupon gate, pricing) only meet a hostile value when the fields before it are
//! sane: with 4:1 odds a typical request carries one hostile field or none.

use std::fmt;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use ecommerce::proto::{Discount, FixedDiscount, OrderLine, PercentDiscount, discount};
use proptest::{collection::vec, prelude::*};
use prost_types::Timestamp;

use super::MAX_MESSAGE_BYTES;

/// The server's default `MAX_BALANCE`.
const MAX_BALANCE: i64 = 1_000_000_000_000;

pub(super) fn sane_or_hostile<T: fmt::Debug + Clone + 'static>(
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
pub(super) fn id() -> BoxedStrategy<i64> {
    id_in(1..=6)
}

/// Users 1 and 2 are funded and hold coupons, 3 and 4 are strangers.
pub(super) fn user_id() -> BoxedStrategy<i64> {
    id_in(1..=4)
}

/// Orders: the fixture's 3 and those the run places.
pub(super) fn order_id() -> BoxedStrategy<i64> {
    id_in(1..=40)
}

pub(super) fn hostile_i64() -> impl Strategy<Value = i64> {
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

pub(super) fn amount() -> BoxedStrategy<i64> {
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

pub(super) fn int32(sane: std::ops::RangeInclusive<i32>) -> BoxedStrategy<i32> {
    sane_or_hostile(sane, hostile_i32())
}

/// Enum fields: a known value, or UNSPECIFIED, or a number no version of the contract has.
pub(super) fn enum_number() -> BoxedStrategy<i32> {
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

pub(super) fn name() -> BoxedStrategy<String> {
    sane_or_hostile("[A-Za-z0-9][A-Za-z0-9 _-]{0,29}", hostile_text())
}

/// Ids of outbox events to re-drive: a few UUIDs (none parked), or hostile strings, or more
/// ids than one call may name.
pub(super) fn event_ids() -> BoxedStrategy<Vec<String>> {
    let uuid = "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}";
    sane_or_hostile(
        vec(uuid, 0..4),
        prop_oneof![
            4 => vec(hostile_text(), 1..3),
            1 => Just(vec![uuid::Uuid::nil().to_string(); 1001]),
        ],
    )
}

/// Idempotency keys: mostly a few fixed ones, so that replays and reuse of a key for another
/// request happen.
pub(super) fn idempotency_key() -> BoxedStrategy<String> {
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

pub(super) fn page_token() -> BoxedStrategy<String> {
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

/// The token this service issues for a newest-first page ending at (`micros`, `id`).
fn created_token_for(micros: i64, id: i64) -> String {
    let mut bytes = vec![2u8];
    bytes.extend_from_slice(&micros.to_be_bytes());
    bytes.extend_from_slice(&id.to_be_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Tokens of the order lists: mostly none or one near now, otherwise an instant or id no page
/// ends at, a product list's token, or garbage.
pub(super) fn created_page_token() -> BoxedStrategy<String> {
    let now = Utc::now().timestamp_micros();
    sane_or_hostile(
        prop_oneof![
            Just(String::new()),
            ((now - 86_400_000_000)..(now + 1_000_000), 1..=40i64)
                .prop_map(|(micros, id)| created_token_for(micros, id)),
        ],
        prop_oneof![
            (hostile_i64(), hostile_i64()).prop_map(|(micros, id)| created_token_for(micros, id)),
            page_token(),
        ],
    )
}

/// A list's status filter: mostly a few known statuses (of `1..=known`), sometimes none,
/// UNSPECIFIED, unknown numbers, or thousands of entries.
pub(super) fn statuses(known: i32) -> BoxedStrategy<Vec<i32>> {
    sane_or_hostile(
        vec(1..=known, 0..=3),
        prop_oneof![
            3 => vec(enum_number(), 1..=4),
            1 => Just(vec![0]),
            1 => Just(vec![1; 10_000]),
            1 => vec(any::<i32>(), 1..=3),
        ],
    )
}

/// A list filter's id: 0 (any) or an id, sane or hostile.
pub(super) fn filter_id(id: BoxedStrategy<i64>) -> BoxedStrategy<i64> {
    prop_oneof![2 => Just(0i64), 3 => id].boxed()
}

/// An optional bound of a creation range: mostly unset, otherwise around now or hostile.
pub(super) fn optional_timestamp() -> BoxedStrategy<Option<Timestamp>> {
    prop_oneof![3 => Just(None), 2 => timestamp(-86_400..60)].boxed()
}

pub(super) fn timestamp(sane_from_now: std::ops::Range<i64>) -> BoxedStrategy<Option<Timestamp>> {
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

pub(super) fn discount() -> BoxedStrategy<Option<Discount>> {
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

pub(super) fn lines() -> BoxedStrategy<Vec<OrderLine>> {
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
