//! Pure types and rules of the shop: money, ids, discounts, statuses and their transitions,
//! validated request values. No I/O lives here; every rule is unit-tested beside its code.
//!
//! Invariant: a value of these types is always valid. Raw wire values become domain values only
//! through a parsing constructor that names the offending field when it refuses.

mod balance;
mod calendar;
mod cart;
mod commit;
mod coupon;
mod events;
mod idempotency;
mod ids;
mod listing;
mod macros;
mod money;
mod name;
mod order;
mod pagination;
mod product;
mod refund;
mod validation;

pub use balance::{LedgerEntry, LedgerKind};
pub use calendar::{Calendar, DayWindow};
pub use cart::{Cart, CartLine, LineChange, MAX_CART_LINES};
pub use commit::{Snapshot, TxId};
pub use coupon::{
    Coupon, CouponChanges, CouponTerms, Discount, IssueWindow, NewCoupon, UserCoupon,
    UserCouponStatus, ValidDays, parse_total_quantity,
};
pub use events::{
    EventSequence, OrderCancelled, OrderEvent, OrderExpired, OrderPlaced, OrderRefunded,
    ParkedEvent, PaymentCompleted, RedriveSelection,
};
pub use idempotency::{IdempotencyKey, KeyScope};
pub use ids::{CouponId, OrderId, PaymentId, ProductId, RefundId, UserCouponId, UserId};
pub use listing::{CreatedRange, OrderFilter, StatusSet};
pub use money::Won;
pub use name::DisplayName;
pub use order::{
    MAX_ORDER_LINES, Order, OrderItem, OrderLine, OrderLines, OrderStatus, Payment, Pricing,
    Quantity,
};
pub use pagination::{CreatedCursor, PageSize, PageToken};
pub use product::{
    MAX_STOCK, NewProduct, Product, ProductChanges, ProductStatus, Restock, parse_stock,
};
pub use refund::{Refund, RefundPlan, RefundReason, RefundRefusal, RefundSelection, RefundedLine};
pub use validation::ValidationError;
