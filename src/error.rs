//! The service's error vocabulary and the one table that turns it into gRPC statuses.
//!
//! Use cases return [`AppError`]; `impl From<AppError> for tonic::Status` below is the only place
//! a gRPC code is chosen. Every status carries a `google.rpc.ErrorInfo` with domain `ecommerce`
//! and a stable UPPER_SNAKE reason that callers can branch on. Internal details (SQL, driver
//! messages) are logged here and never sent to the caller.

use std::{borrow::Cow, collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{BadRequest, ErrorDetail, ErrorInfo, RetryInfo, StatusExt};

use crate::{
    domain::{OrderStatus, UserCouponId, ValidationError, Won},
    store::{Dependency, StoreError},
};

pub const ERROR_DOMAIN: &str = "ecommerce";

/// The UPPER_SNAKE name of a gRPC code, as the gRPC specification spells it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Things that can be looked up by id and be missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Product,
    Coupon,
    UserCoupon,
    Order,
}

impl Resource {
    fn reason(self) -> &'static str {
        match self {
            Resource::Product => "PRODUCT_NOT_FOUND",
            Resource::Coupon => "COUPON_NOT_FOUND",
            Resource::UserCoupon => "USER_COUPON_NOT_FOUND",
            Resource::Order => "ORDER_NOT_FOUND",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Resource::Product => "product",
            Resource::Coupon => "coupon",
            Resource::UserCoupon => "user coupon",
            Resource::Order => "order",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("invalid {}: {}", .0.field, .0.message)]
    InvalidArgument(#[from] ValidationError),
    #[error("this idempotency key was already used for a different request")]
    IdempotencyKeyReused,
    #[error("{} {id} not found", .resource.name())]
    NotFound { resource: Resource, id: i64 },
    #[error("the balance would exceed the maximum of {max}")]
    BalanceLimitExceeded { max: Won },
    #[error("the coupon is sold out")]
    CouponSoldOut,
    #[error("the user already holds this coupon ({user_coupon_id})")]
    CouponAlreadyIssued { user_coupon_id: UserCouponId },
    #[error("the coupon cannot be issued outside its issue window")]
    CouponNotIssuable,
    #[error("{issued} coupons are already issued: the total cannot go below that")]
    CouponQuantityBelowIssued { issued: i64 },
    #[error("product {product_id} is not on sale")]
    ProductNotSelling { product_id: i64 },
    #[error("product {product_id} does not have enough stock")]
    OutOfStock { product_id: i64 },
    #[error("the stock is {stock}, not the expected value")]
    StockChanged { stock: i64 },
    #[error("the stock would pass the maximum of {max}")]
    StockLimitExceeded { max: i64 },
    #[error("the coupon cannot be used: {why}")]
    CouponUnusable { why: &'static str },
    #[error("the balance is too low: {required} needed")]
    InsufficientBalance { required: Won },
    #[error("the order is already paid")]
    OrderAlreadyPaid,
    #[error("the order is {status} and can no longer change")]
    OrderClosed { status: OrderStatus },
    #[error("the order's payment window has passed")]
    OrderExpired,
    #[error("the order is {status}: only a paid order with units left can be refunded")]
    OrderNotRefundable { status: OrderStatus },
    #[error("product {product_id} has only {remaining} units left to refund")]
    RefundExceedsRemaining { product_id: i64, remaining: i32 },
    #[error("the cart already holds {max} lines")]
    CartFull { max: usize },
    #[error("the cart is empty")]
    CartEmpty,
    #[error("the caller is not the buyer of this order")]
    NotOrderOwner,
    #[error("missing or invalid credentials")]
    Unauthenticated,
    #[error("too many calls from this user; retry after {} ms", .retry_after.as_millis())]
    RateLimited { retry_after: Duration },
    #[error("the server is at its concurrency limit; retry with backoff")]
    Overloaded,
    #[error("the call did not finish before its deadline")]
    DeadlineExceeded,
    #[error("the request is larger than the server accepts")]
    MessageTooLarge,
    #[error("{} is unavailable", .dependency.name())]
    Unavailable {
        dependency: Dependency,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The connection to Postgres was lost while the call's write was committing: it may or
    /// may not have happened. A retry with the same idempotency key settles it.
    #[error(
        "the outcome is unknown: postgres was lost while committing; retry with the same idempotency key"
    )]
    OutcomeUnknown(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// How long a caller told UNAVAILABLE waits before retrying (`google.rpc.RetryInfo`): about the
/// time a dependency's failover or restart takes to show, so retries neither hammer nor dawdle.
pub const RETRY_UNAVAILABLE_AFTER: Duration = Duration::from_secs(1);

impl AppError {
    pub fn internal(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Internal(error.into())
    }

    /// The gRPC code and ErrorInfo reason of this error: the table callers program against.
    pub fn code_and_reason(&self) -> (Code, &'static str) {
        match self {
            AppError::InvalidArgument(_) => (Code::InvalidArgument, "INVALID_FIELD"),
            AppError::IdempotencyKeyReused => (Code::InvalidArgument, "IDEMPOTENCY_KEY_REUSED"),
            AppError::NotFound { resource, .. } => (Code::NotFound, resource.reason()),
            AppError::BalanceLimitExceeded { .. } => (Code::OutOfRange, "BALANCE_LIMIT_EXCEEDED"),
            AppError::CouponSoldOut => (Code::ResourceExhausted, "COUPON_SOLD_OUT"),
            AppError::CouponAlreadyIssued { .. } => (Code::AlreadyExists, "COUPON_ALREADY_ISSUED"),
            AppError::CouponNotIssuable => (Code::FailedPrecondition, "COUPON_NOT_ISSUABLE"),
            AppError::CouponQuantityBelowIssued { .. } => {
                (Code::FailedPrecondition, "COUPON_QUANTITY_BELOW_ISSUED")
            }
            AppError::ProductNotSelling { .. } => (Code::FailedPrecondition, "PRODUCT_NOT_SELLING"),
            AppError::OutOfStock { .. } => (Code::FailedPrecondition, "OUT_OF_STOCK"),
            AppError::StockChanged { .. } => (Code::Aborted, "STOCK_CHANGED"),
            AppError::StockLimitExceeded { .. } => (Code::OutOfRange, "STOCK_LIMIT_EXCEEDED"),
            AppError::CouponUnusable { .. } => (Code::FailedPrecondition, "COUPON_UNUSABLE"),
            AppError::InsufficientBalance { .. } => {
                (Code::FailedPrecondition, "INSUFFICIENT_BALANCE")
            }
            AppError::OrderAlreadyPaid => (Code::AlreadyExists, "ORDER_ALREADY_PAID"),
            AppError::OrderClosed { .. } => (Code::FailedPrecondition, "ORDER_CLOSED"),
            AppError::OrderExpired => (Code::FailedPrecondition, "ORDER_EXPIRED"),
            AppError::OrderNotRefundable { .. } => {
                (Code::FailedPrecondition, "ORDER_NOT_REFUNDABLE")
            }
            AppError::RefundExceedsRemaining { .. } => {
                (Code::FailedPrecondition, "REFUND_EXCEEDS_REMAINING")
            }
            AppError::CartFull { .. } => (Code::FailedPrecondition, "CART_FULL"),
            AppError::CartEmpty => (Code::FailedPrecondition, "CART_EMPTY"),
            AppError::NotOrderOwner => (Code::PermissionDenied, "NOT_ORDER_OWNER"),
            AppError::Unauthenticated => (Code::Unauthenticated, "UNAUTHENTICATED"),
            AppError::RateLimited { .. } => (Code::ResourceExhausted, "RATE_LIMITED"),
            AppError::Overloaded => (Code::ResourceExhausted, "OVERLOADED"),
            AppError::DeadlineExceeded => (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
            AppError::MessageTooLarge => (Code::ResourceExhausted, "MESSAGE_TOO_LARGE"),
            AppError::Unavailable { .. } => (Code::Unavailable, "DEPENDENCY_UNAVAILABLE"),
            AppError::OutcomeUnknown(_) => (Code::Unavailable, "OUTCOME_UNKNOWN"),
            AppError::Internal(_) => (Code::Internal, "INTERNAL"),
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        let mut meta = HashMap::new();
        let mut put = |k: &str, v: Cow<'_, str>| {
            meta.insert(k.to_owned(), v.into_owned());
        };
        match self {
            AppError::InvalidArgument(e) => put("field", Cow::Borrowed(&e.field)),
            AppError::NotFound { id, .. } => put("id", id.to_string().into()),
            AppError::BalanceLimitExceeded { max } => {
                put("max_balance", max.get().to_string().into())
            }
            AppError::ProductNotSelling { product_id } | AppError::OutOfStock { product_id } => {
                put("product_id", product_id.to_string().into())
            }
            AppError::CouponAlreadyIssued { user_coupon_id } => {
                put("user_coupon_id", user_coupon_id.to_string().into())
            }
            AppError::StockChanged { stock } => put("stock", stock.to_string().into()),
            AppError::CouponQuantityBelowIssued { issued } => {
                put("issued", issued.to_string().into())
            }
            AppError::CartFull { max } => put("max_lines", max.to_string().into()),
            AppError::StockLimitExceeded { max } => put("max_stock", max.to_string().into()),
            AppError::CouponUnusable { why } => put("why", Cow::Borrowed(why)),
            AppError::InsufficientBalance { required } => {
                put("required", required.get().to_string().into())
            }
            AppError::OrderClosed { status } | AppError::OrderNotRefundable { status } => {
                put("status", Cow::Borrowed(status.as_str()))
            }
            AppError::RefundExceedsRemaining {
                product_id,
                remaining,
            } => {
                put("product_id", product_id.to_string().into());
                put("remaining", remaining.to_string().into());
            }
            AppError::RateLimited { retry_after } => {
                put("retry_after_ms", retry_after.as_millis().to_string().into())
            }
            AppError::Unavailable { dependency, .. } => {
                put("dependency", Cow::Borrowed(dependency.name()))
            }
            AppError::OutcomeUnknown(_) => {
                put("dependency", Cow::Borrowed(Dependency::Postgres.name()))
            }
            _ => {}
        }
        meta
    }
}

impl From<StoreError> for AppError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable { dependency, source } => {
                AppError::Unavailable { dependency, source }
            }
            StoreError::OutcomeUnknown(source) => AppError::OutcomeUnknown(source),
            other => AppError::Internal(Box::new(other)),
        }
    }
}

/// The same mapping for one failure shared by many calls (a write batch's): each call gets its
/// own error, with the failure's words.
impl From<&StoreError> for AppError {
    fn from(error: &StoreError) -> Self {
        match error {
            StoreError::Unavailable { dependency, source } => AppError::Unavailable {
                dependency: *dependency,
                source: source.to_string().into(),
            },
            StoreError::OutcomeUnknown(source) => {
                AppError::OutcomeUnknown(source.to_string().into())
            }
            other => AppError::internal(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for AppError {
    fn from(error: sqlx::Error) -> Self {
        StoreError::from(error).into()
    }
}

impl From<ValidationError> for Status {
    fn from(error: ValidationError) -> Self {
        AppError::from(error).into()
    }
}

impl From<AppError> for Status {
    fn from(error: AppError) -> Self {
        let (code, reason) = error.code_and_reason();
        // The call's server span (a no-op while tracing is off or outside a call).
        tracing::Span::current().record("error.reason", reason);
        crate::metrics::error_answered(code, reason);
        match &error {
            AppError::Internal(source) => {
                tracing::error!(error = %source, debug = ?source, "internal error");
            }
            AppError::Unavailable { source, .. } => {
                tracing::warn!(error = %source, "dependency unavailable");
            }
            AppError::OutcomeUnknown(source) => {
                tracing::warn!(error = %source, "connection lost while committing: outcome unknown");
            }
            _ => {}
        }
        let mut details = vec![ErrorDetail::from(ErrorInfo::new(
            reason,
            ERROR_DOMAIN,
            error.metadata(),
        ))];
        match &error {
            AppError::InvalidArgument(e) => details.push(
                BadRequest::with_violation(e.field.to_string(), e.message.to_string()).into(),
            ),
            AppError::RateLimited { retry_after } => {
                details.push(RetryInfo::new(Some(*retry_after)).into());
            }
            AppError::Unavailable { .. } | AppError::OutcomeUnknown(_) => {
                details.push(RetryInfo::new(Some(RETRY_UNAVAILABLE_AFTER)).into());
            }
            _ => {}
        }
        Status::with_error_details_vec(code, error.to_string(), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason_of(status: &Status) -> String {
        status.get_details_error_info().expect("ErrorInfo").reason
    }

    #[test]
    fn statuses_carry_code_reason_and_field() {
        let status: Status = AppError::from(ValidationError::new("amount", "must be > 0")).into();
        assert_eq!(status.code(), Code::InvalidArgument);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "INVALID_FIELD");
        assert_eq!(info.domain, "ecommerce");
        assert_eq!(info.metadata["field"], "amount");
        let bad = status.get_details_bad_request().unwrap();
        assert_eq!(bad.field_violations[0].field, "amount");

        let status: Status = AppError::OutOfStock { product_id: 9 }.into();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(reason_of(&status), "OUT_OF_STOCK");
        assert_eq!(
            status.get_details_error_info().unwrap().metadata["product_id"],
            "9"
        );

        let status: Status = AppError::CouponSoldOut.into();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(reason_of(&status), "COUPON_SOLD_OUT");
    }

    #[test]
    fn a_rate_limited_call_says_when_to_come_back() {
        let status: Status = AppError::RateLimited {
            retry_after: Duration::from_millis(1_250),
        }
        .into();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(reason_of(&status), "RATE_LIMITED");
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.metadata["retry_after_ms"], "1250");
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(1_250)));
    }

    #[test]
    fn unavailable_hides_the_driver_message() {
        let status: Status = AppError::Unavailable {
            dependency: Dependency::Postgres,
            source: "connection refused to 10.0.0.7:5432 password=hunter2".into(),
        }
        .into();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("hunter2"));
        assert!(!status.message().contains("10.0.0.7"));
        assert_eq!(reason_of(&status), "DEPENDENCY_UNAVAILABLE");
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(RETRY_UNAVAILABLE_AFTER));
    }

    /// What a failover looks like to the store, error by error.
    #[test]
    fn a_failover_answers_unavailable_never_internal() {
        let db = |code: &str, message: &str| -> sqlx::Error { database_error(code, message) };
        for (error, reason) in [
            (
                db("25006", "cannot execute INSERT in a read-only transaction"),
                "DEPENDENCY_UNAVAILABLE",
            ),
            (
                db(
                    "57P01",
                    "terminating connection due to administrator command",
                ),
                "DEPENDENCY_UNAVAILABLE",
            ),
            (
                db(
                    "57P02",
                    "terminating connection because of crash of another server process",
                ),
                "DEPENDENCY_UNAVAILABLE",
            ),
            (
                db("57P03", "the database system is in recovery mode"),
                "DEPENDENCY_UNAVAILABLE",
            ),
            (
                sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into()),
                "DEPENDENCY_UNAVAILABLE",
            ),
        ] {
            let status: Status = AppError::from(error).into();
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert_eq!(reason_of(&status), reason);
            assert!(status.get_details_retry_info().is_some());
        }
        // The same losses during COMMIT leave the outcome unknown; a refusal does not.
        for lost in [
            sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into()),
            db(
                "57P01",
                "terminating connection due to administrator command",
            ),
        ] {
            let status: Status = AppError::from(StoreError::from_commit(lost)).into();
            assert_eq!(status.code(), Code::Unavailable);
            assert_eq!(reason_of(&status), "OUTCOME_UNKNOWN");
            assert_eq!(
                status.get_details_error_info().unwrap().metadata["dependency"],
                "postgres"
            );
            assert!(status.get_details_retry_info().is_some());
        }
        let refused = StoreError::from_commit(db("40001", "could not serialize access"));
        assert_eq!(
            AppError::from(refused).code_and_reason(),
            (Code::Unavailable, "DEPENDENCY_UNAVAILABLE")
        );
        let constraint = StoreError::from_commit(db("23514", "check violation"));
        assert!(matches!(constraint, StoreError::Postgres(_)));
    }

    /// A server error with this SQLSTATE, as sqlx returns it.
    fn database_error(code: &str, message: &str) -> sqlx::Error {
        #[derive(Debug)]
        struct Db(String, String);
        impl std::fmt::Display for Db {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.1)
            }
        }
        impl std::error::Error for Db {}
        impl sqlx::error::DatabaseError for Db {
            fn message(&self) -> &str {
                &self.1
            }
            fn code(&self) -> Option<Cow<'_, str>> {
                Some(Cow::Borrowed(&self.0))
            }
            fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
                self
            }
            fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
                self
            }
            fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
                self
            }
            fn kind(&self) -> sqlx::error::ErrorKind {
                sqlx::error::ErrorKind::Other
            }
        }
        sqlx::Error::Database(Box::new(Db(code.into(), message.into())))
    }
}
