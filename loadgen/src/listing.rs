//! The list-orders scenario: workers walk one buyer's order history (a fixture of, by default,
//! 1,000,000 orders: `scripts/seed-orders`) page by page with OrderService/ListOrders, as a
//! "My orders" page does: most walks read the first page only, some go a few pages deep, some
//! hundreds; a walk keeps one status filter (none, mostly).
//!
//! Guarantees: every page is checked as it arrives, against the contract alone: at most
//! `page_size` orders, all the buyer's, in the filter's statuses, each with items, keys strictly
//! newest first within the page and after the previous page of the same walk (no order twice),
//! and a full page whenever another follows. A page of unknown outcome ends its walk unjudged.

use rand::{Rng, rngs::StdRng};
use std::time::Instant;
use tonic::transport::Channel;

use super::{
    seen::Observed,
    stats::{Class, Recorder, Rpc},
};
use ecommerce::proto::{
    ListOrdersRequest, Order, OrderStatus, order_service_client::OrderServiceClient,
};

/// What the scenario lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listing {
    pub user_id: i64,
    /// Orders the buyer must have before the run starts.
    pub min_orders: u64,
    pub page_size: i32,
}

impl Listing {
    /// The buyer `scripts/seed-orders` fills by default.
    pub const DEFAULT_USER: i64 = 900_000_001;
    pub const DEFAULT_ORDERS: u64 = 1_000_000;
}

/// An order's place in a newest-first list: (created_at in microseconds, id).
pub type Key = (i64, i64);

pub fn key(order: &Order) -> Key {
    let at = order.created_at.unwrap_or_default();
    (
        at.seconds.saturating_mul(1_000_000) + i64::from(at.nanos) / 1_000,
        order.id,
    )
}

/// One worker's walk in progress.
#[derive(Debug, Default)]
pub struct Walk {
    statuses: Vec<i32>,
    token: String,
    /// The last key the walk was shown.
    last: Option<Key>,
    /// Pages still to read before starting over.
    left: u32,
}

impl Walk {
    /// A fresh walk: its filter and length, drawn.
    fn start(rng: &mut StdRng) -> Self {
        let statuses = match rng.random_range(0..100) {
            0..70 => Vec::new(),
            70..85 => vec![OrderStatus::Paid as i32],
            _ => vec![
                OrderStatus::PendingPayment as i32,
                OrderStatus::Cancelled as i32,
            ],
        };
        let left = match rng.random_range(0..100) {
            0..50 => 1,
            50..80 => rng.random_range(2..=10),
            _ => rng.random_range(11..=500),
        };
        Self {
            statuses,
            token: String::new(),
            last: None,
            left,
        }
    }
}

/// Why a page is ill-formed, if it is (`last`: the last key of the walk's previous page).
pub fn page_problem(
    orders: &[Order],
    listing: &Listing,
    statuses: &[i32],
    last: Option<Key>,
    more: bool,
) -> Option<String> {
    let size = usize::try_from(listing.page_size).unwrap_or(0);
    if orders.len() > size || (more && orders.len() < size) {
        return Some(format!(
            "{} orders on a page of {size} (another page follows: {more})",
            orders.len()
        ));
    }
    let mut previous = last;
    for order in orders {
        if order.user_id != listing.user_id {
            return Some(format!("order {} of user {}", order.id, order.user_id));
        }
        if !statuses.is_empty() && !statuses.contains(&order.status) {
            return Some(format!(
                "order {} in status {} for filter {statuses:?}",
                order.id, order.status
            ));
        }
        if order.items.is_empty() {
            return Some(format!("order {} without items", order.id));
        }
        let k = key(order);
        if previous.is_some_and(|p| k >= p) {
            return Some(format!("order {} at {k:?} after {previous:?}", order.id));
        }
        previous = Some(k);
    }
    None
}

/// Reads the next page of the worker's walk (starting a new walk when the last one ended).
pub async fn next_page(
    walk: &mut Walk,
    client: &mut OrderServiceClient<Channel>,
    listing: &Listing,
    rng: &mut StdRng,
    rec: &mut Recorder,
    observed: &mut Observed,
) {
    if walk.left == 0 {
        *walk = Walk::start(rng);
    }
    let request = ListOrdersRequest {
        user_id: listing.user_id,
        statuses: walk.statuses.clone(),
        page_size: listing.page_size,
        page_token: walk.token.clone(),
    };
    let started = Instant::now();
    let result = client.list_orders(request).await;
    if rec.record(Rpc::ListOrders, started, &result) != Class::Ok {
        walk.left = 0;
        return;
    }
    let Ok(page) = result.map(|r| r.into_inner()) else {
        return;
    };
    observed.order_pages += 1;
    let more = !page.next_page_token.is_empty();
    if let Some(problem) = page_problem(&page.orders, listing, &walk.statuses, walk.last, more) {
        observed.page_problems.add(|| problem);
    }
    walk.last = page.orders.last().map(key).or(walk.last);
    walk.token = page.next_page_token;
    walk.left = if more { walk.left - 1 } else { 0 };
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecommerce::proto::OrderItem;
    use std::time::{Duration, UNIX_EPOCH};

    fn order(id: i64, micros: i64, user_id: i64, status: OrderStatus) -> Order {
        Order {
            id,
            user_id,
            status: status as i32,
            items: vec![OrderItem::default()],
            created_at: Some((UNIX_EPOCH + Duration::from_micros(micros as u64)).into()),
            ..Order::default()
        }
    }

    const LISTING: Listing = Listing {
        user_id: 7,
        min_orders: 0,
        page_size: 2,
    };

    #[test]
    fn pages_are_judged_against_the_contract() {
        let paid = OrderStatus::Paid;
        let good = [order(9, 3_000_000, 7, paid), order(8, 2_000_000, 7, paid)];
        assert_eq!(page_problem(&good, &LISTING, &[], None, true), None);
        assert_eq!(page_problem(&good, &LISTING, &[2], None, false), None);
        // Not after the previous page's last order: a repeat.
        assert!(page_problem(&good, &LISTING, &[], Some((2_500_000, 5)), true).is_some());
        // Same instant, ids descending, is newest first.
        let tie = [order(9, 1_000, 7, paid), order(8, 1_000, 7, paid)];
        assert_eq!(page_problem(&tie, &LISTING, &[], None, false), None);
        let rising = [order(8, 1_000, 7, paid), order(9, 1_000, 7, paid)];
        assert!(page_problem(&rising, &LISTING, &[], None, false).is_some());
        let stranger = [order(9, 1_000, 8, paid)];
        assert!(page_problem(&stranger, &LISTING, &[], None, false).is_some());
        let short = [order(9, 1_000, 7, paid)];
        assert!(page_problem(&short, &LISTING, &[], None, true).is_some());
        let pending = [order(9, 1_000, 7, OrderStatus::PendingPayment)];
        assert!(page_problem(&pending, &LISTING, &[2], None, false).is_some());
    }
}
