//! What a list shows: the statuses it keeps and, for orders, the buyer, the product and the
//! creation range. Invariant: a filter is always satisfiable as far as the request alone can
//! tell (a creation range is never empty or reversed) and names each status once.

use chrono::{DateTime, Utc};

use super::{OrderStatus, ProductId, ProductStatus, UserId, ValidationError};

/// Statuses a list keeps; none chosen keeps every status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusSet<S: 'static> {
    chosen: Vec<S>,
    all: &'static [S],
}

impl<S: Copy + PartialEq> StatusSet<S> {
    /// `all` is every value of the status type (its `ALL`); repeats in `chosen` count once.
    fn new(chosen: impl IntoIterator<Item = S>, all: &'static [S]) -> Self {
        let mut set = Vec::new();
        for status in chosen {
            if !set.contains(&status) {
                set.push(status);
            }
        }
        Self { chosen: set, all }
    }

    /// Whether every status is kept (none chosen, or all of them).
    pub fn keeps_all(&self) -> bool {
        self.all
            .iter()
            .all(|s| self.chosen.is_empty() || self.chosen.contains(s))
    }

    /// The statuses kept, in the order of `ALL`: every one when none was chosen.
    pub fn kept(&self) -> Vec<S> {
        self.all
            .iter()
            .copied()
            .filter(|s| self.chosen.is_empty() || self.chosen.contains(s))
            .collect()
    }
}

impl StatusSet<OrderStatus> {
    pub fn orders(chosen: impl IntoIterator<Item = OrderStatus>) -> Self {
        Self::new(chosen, OrderStatus::ALL)
    }
}

impl StatusSet<ProductStatus> {
    pub fn products(chosen: impl IntoIterator<Item = ProductStatus>) -> Self {
        Self::new(chosen, ProductStatus::ALL)
    }
}

/// When the orders of a list were created: at or after `after`, before `before` (each bound
/// optional).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CreatedRange {
    after: Option<DateTime<Utc>>,
    before: Option<DateTime<Utc>>,
}

impl CreatedRange {
    /// Refuses a range that nothing can be in (`after` not before `before`).
    pub fn parse(
        after: Option<DateTime<Utc>>,
        before: Option<DateTime<Utc>>,
    ) -> Result<Self, ValidationError> {
        match (after, before) {
            (Some(a), Some(b)) if a >= b => Err(ValidationError::new(
                "created_before",
                "must be later than created_after",
            )),
            _ => Ok(Self { after, before }),
        }
    }

    pub fn after(self) -> Option<DateTime<Utc>> {
        self.after
    }

    pub fn before(self) -> Option<DateTime<Utc>> {
        self.before
    }
}

/// Which orders a list shows, newest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderFilter {
    /// `None`: every buyer (AdminService only).
    pub user: Option<UserId>,
    pub statuses: StatusSet<OrderStatus>,
    /// Only orders with a line of this product.
    pub product: Option<ProductId>,
    pub created: CreatedRange,
}

impl OrderFilter {
    /// One buyer's orders of some statuses (OrderService/ListOrders).
    pub fn buyer(user: UserId, statuses: StatusSet<OrderStatus>) -> Self {
        Self {
            user: Some(user),
            statuses,
            product: None,
            created: CreatedRange::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_status_keeps_every_status_and_repeats_count_once() {
        assert_eq!(StatusSet::orders([]).kept(), OrderStatus::ALL.to_vec());
        assert!(StatusSet::orders([]).keeps_all());
        assert!(StatusSet::orders(OrderStatus::ALL.iter().copied()).keeps_all());
        assert!(!StatusSet::orders([OrderStatus::Paid]).keeps_all());
        let paid_twice = StatusSet::orders([
            OrderStatus::Paid,
            OrderStatus::PendingPayment,
            OrderStatus::Paid,
        ]);
        assert_eq!(
            paid_twice.kept(),
            vec![OrderStatus::PendingPayment, OrderStatus::Paid]
        );
        assert_eq!(
            StatusSet::products([ProductStatus::Stopped]).kept(),
            vec![ProductStatus::Stopped]
        );
    }

    #[test]
    fn a_creation_range_must_not_be_empty() {
        let t = |s| DateTime::from_timestamp(s, 0).unwrap();
        assert!(CreatedRange::parse(Some(t(10)), Some(t(11))).is_ok());
        assert!(CreatedRange::parse(Some(t(10)), None).is_ok());
        assert!(CreatedRange::parse(None, Some(t(10))).is_ok());
        for (a, b) in [(10, 10), (11, 10)] {
            let err = CreatedRange::parse(Some(t(a)), Some(t(b))).unwrap_err();
            assert_eq!(err.field, "created_before");
        }
    }
}
