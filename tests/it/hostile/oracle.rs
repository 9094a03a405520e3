//! What a right answer is: a documented code with an `ecommerce` ErrorInfo, the refusal the
//! contract names where the request alone decides it, and, after a refusal or a read, a database
//! unchanged to the last row.

use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::{
    MAX_MESSAGE_BYTES,
    calls::{Auth, Call},
};
use crate::support::TestApp;

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

/// A status filter naming UNSPECIFIED or a number the contract does not define.
fn bad_statuses(raw: &[i32], known: impl Fn(i32) -> bool) -> bool {
    raw.iter().any(|&s| s == 0 || !known(s))
}

fn known_order_status(raw: i32) -> bool {
    ecommerce::proto::OrderStatus::try_from(raw).is_ok()
}

fn known_product_status(raw: i32) -> bool {
    ecommerce::proto::ProductStatus::try_from(raw).is_ok()
}

impl Call {
    /// Requests the contract refuses whatever the data: a required id that is not positive, an
    /// empty or over-long order. (A cheap oracle on top of "a documented code".)
    fn surely_invalid(&self) -> bool {
        let bad = |id: i64| id <= 0;
        let bad_page = |size: i32| !(0..=100).contains(&size);
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
            Call::GetCart(r) => bad(r.user_id),
            Call::SetItem(r) => {
                bad(r.user_id) || bad(r.product_id) || !(0..=1000).contains(&r.quantity)
            }
            Call::RemoveItem(r) => bad(r.user_id) || bad(r.product_id),
            Call::Clear(r) => bad(r.user_id),
            Call::Checkout(r) => bad(r.user_id) || r.user_coupon_id < 0,
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
            Call::ListParkedEvents(_, r) => !(0..=100).contains(&r.page_size),
            Call::RefundOrder(_, r) => {
                bad(r.order_id)
                    || r.idempotency_key.is_empty()
                    || r.lines.len() > 50
                    || r.lines.iter().any(|l| bad(l.product_id))
                    || r.lines.iter().any(|l| !(1..=1000).contains(&l.quantity))
            }
            Call::RedriveEvents(_, r) => {
                r.event_ids.is_empty() != r.all
                    || r.event_ids.len() > 1000
                    || r.event_ids
                        .iter()
                        .any(|id| uuid::Uuid::try_parse(id).is_err())
            }
            Call::ListOrders(r) => {
                bad(r.user_id)
                    || bad_page(r.page_size)
                    || bad_statuses(&r.statuses, known_order_status)
            }
            Call::AdminGetOrder(_, r) => bad(r.order_id),
            Call::AdminListOrders(_, r) => {
                r.user_id < 0
                    || r.product_id < 0
                    || bad_page(r.page_size)
                    || bad_statuses(&r.statuses, known_order_status)
            }
            Call::AdminListProducts(_, r) => {
                bad_page(r.page_size) || bad_statuses(&r.statuses, known_product_status)
            }
            Call::ListCoupons(_, r) => bad_page(r.page_size),
            Call::UpdateCoupon(_, r) => {
                bad(r.coupon_id)
                    || r.total_quantity
                        .is_some_and(|t| !(1..=1_000_000).contains(&t))
            }
        }
    }
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
  (SELECT format('order_items %s/%s/%s', count(*), coalesce(sum(quantity), 0),
                 coalesce(sum(refunded_quantity), 0)) FROM order_items),
  (SELECT format('payments %s/%s', count(*), coalesce(sum(amount), 0)) FROM payments),
  (SELECT format('refunds %s/%s', count(*), coalesce(sum(amount), 0)) FROM refunds),
  (SELECT format('refund_lines %s/%s', count(*), coalesce(sum(quantity), 0)) FROM refund_lines),
  (SELECT format('outbox_events %s', count(*)) FROM outbox_events),
  (SELECT format('idempotency_keys %s', count(*)) FROM idempotency_keys),
  (SELECT format('cart_items %s/%s/%s', count(*), coalesce(sum(quantity), 0),
                 md5(coalesce(string_agg(concat_ws(':', user_id, product_id, quantity), ','
                                         ORDER BY user_id, product_id), '')))
     FROM cart_items)
)";

pub(super) async fn fingerprint(app: &TestApp) -> String {
    sqlx::query_scalar(FINGERPRINT)
        .fetch_one(&app.pg)
        .await
        .expect("fingerprint")
}

/// What is wrong with this answer to this call, if anything (state is checked separately).
pub(super) fn judge(call: &Call, result: &Result<(), Status>) -> Option<String> {
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
