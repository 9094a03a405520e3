//! The catalog: listing what is on sale, reading a product, and the admin's changes.

use super::App;
use crate::{
    domain::{PageSize, PageToken, Product, ProductId},
    error::{AppError, Resource},
    store::postgres::products::{self, NewProduct, ProductChanges},
};

impl App {
    pub async fn selling_products(
        &self,
        page_size: PageSize,
        after: Option<PageToken>,
    ) -> Result<(Vec<Product>, Option<PageToken>), AppError> {
        Ok(products::selling_page(self.pg(), page_size, after).await?)
    }

    pub async fn product(&self, id: ProductId) -> Result<Product, AppError> {
        products::get(self.pg(), id)
            .await?
            .ok_or(AppError::NotFound {
                resource: Resource::Product,
                id: id.get(),
            })
    }

    pub async fn create_product(&self, new: NewProduct) -> Result<Product, AppError> {
        Ok(products::create(self.pg(), new).await?)
    }

    pub async fn update_product(
        &self,
        id: ProductId,
        changes: ProductChanges,
    ) -> Result<Product, AppError> {
        let product =
            products::update(self.pg(), id, changes)
                .await?
                .ok_or(AppError::NotFound {
                    resource: Resource::Product,
                    id: id.get(),
                })?;
        // New stock or a new status: let Postgres decide the next order, not a stale marker.
        self.clear_sold_out(&[id]).await;
        Ok(product)
    }
}
