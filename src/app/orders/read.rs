//! Reading orders. Invariant: a buyer reads only their own orders (PERMISSION_DENIED
//! otherwise). Reads take no locks; dropping the call at its await leaves nothing behind.

use super::Orders;
use crate::{
    domain::{Order, OrderId, UserId},
    error::{AppError, Resource},
    store::postgres::orders,
};

impl Orders {
    pub async fn get(&self, id: OrderId, user_id: UserId) -> Result<Order, AppError> {
        let mut conn = self.pg.acquire().await?;
        let order = orders::get(&mut conn, id)
            .await?
            .ok_or(AppError::NotFound {
                resource: Resource::Order,
                id: id.get(),
            })?;
        if order.user_id != user_id {
            return Err(AppError::NotOrderOwner);
        }
        Ok(order)
    }
}
