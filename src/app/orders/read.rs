//! Reading orders: one by id, and pages of them newest first.
//!
//! Invariants: a buyer reads only their own orders (GetOrder answers PERMISSION_DENIED for
//! another's; ListOrders lists only the user's); AdminService reads any. A walk through the
//! pages of a list never returns an order twice, and returns every order that was committed
//! before its first page was read and still matches the filter, however many orders are placed
//! meanwhile.
//!
//! Why the pages keep that promise. The list's order is the key (created_at DESC, id DESC).
//! Both parts are fixed when the order is written (created_at is its transaction's start, the
//! id is drawn inside that transaction) and never change, and the id makes the key unique.
//! Page i is one statement, so it reads one snapshot S_i, and returns the first n matching
//! orders whose key is below the cursor c_(i-1) (the first page: below everything); its cursor
//! c_i is the key of the last order it returned. So:
//! - the pages' key ranges [c_i, c_(i-1)) are disjoint: no order can come back on a later page
//!   (no repeats, whatever commits when);
//! - page i returns every order visible in S_i with a key in [c_i, c_(i-1)) (it returned them
//!   in key order down to c_i), and the ranges tile every key down to the last page's, which
//!   reaches the bottom. An order committed before the first page was read is visible in every
//!   S_i, so it is returned exactly once, by the page whose range holds its key (no gaps).
//!
//! What concurrency can still do, and why it is not a gap. Keys are drawn before commit, and
//! group commit makes batches commit out of key order: a batch that started earlier (smaller
//! created_at, smaller ids) can commit after a later one, and so become visible after a page
//! whose range held its keys was read. Such an order was not committed when that page was read:
//! it was being placed while the list was walked (its caller had not heard OK yet), and it is
//! listed by any walk that starts after its commit. Newest first puts such arrivals at the
//! front, where a reader looking for new orders starts again; a reader that instead keeps
//! paging downward from an old cursor, or stops at the first order it already knows, would not
//! see them, which is why order lifecycle events, not list polling, are how a consumer follows
//! new orders. `tests/it/order_lists.rs` checks all of this against 32 concurrent writers, page
//! by page: an order acknowledged before a page was requested is on that page if its key is in
//! the page's range.
//!
//! The same holds for a status filter with one difference: an order's status can change between
//! two pages, and each page judges it as it is at its own snapshot.
//!
//! Cancel safety: reads take no locks and write nothing; dropping the call at its await drops
//! the statement.

use super::Orders;
use crate::{
    domain::{CreatedCursor, Order, OrderFilter, OrderId, PageSize, UserId},
    error::{AppError, Resource},
    store::postgres::{order_pages, orders},
};

impl Orders {
    /// The buyer's order: PERMISSION_DENIED when `user_id` is not its buyer.
    pub async fn get(&self, id: OrderId, user_id: UserId) -> Result<Order, AppError> {
        let order = self.get_any(id).await?;
        if order.user_id != user_id {
            return Err(AppError::NotOrderOwner);
        }
        Ok(order)
    }

    /// Any order, whoever bought it (AdminService).
    pub async fn get_any(&self, id: OrderId) -> Result<Order, AppError> {
        let mut conn = self.pg.acquire().await?;
        orders::get(&mut conn, id).await?.ok_or(AppError::NotFound {
            resource: Resource::Order,
            id: id.get(),
        })
    }

    /// A page of the orders `filter` keeps, newest first, and where the next page starts.
    pub async fn page(
        &self,
        filter: &OrderFilter,
        size: PageSize,
        after: Option<CreatedCursor>,
    ) -> Result<(Vec<Order>, Option<CreatedCursor>), AppError> {
        Ok(order_pages::page(&self.pg, filter, size, after).await?)
    }
}
