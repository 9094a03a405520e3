//! The balance ledger's entry kinds. A CHARGE or REFUND adds its amount, a USE subtracts it, so
//! the sum of a user's ledger is their balance.

use chrono::{DateTime, Utc};

use super::{OrderId, UserId, Won, macros::text_enum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LedgerKind {
    Charge,
    Use,
    Refund,
}

text_enum!(LedgerKind {
    Charge => "CHARGE",
    Use => "USE",
    Refund => "REFUND",
});

/// One ledger entry: what changed a balance, by how much, and what the balance became.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct LedgerEntry {
    pub id: i64,
    pub user_id: UserId,
    pub kind: LedgerKind,
    pub amount: Won,
    pub balance_after: Won,
    pub order_id: Option<OrderId>,
    pub created_at: DateTime<Utc>,
}
