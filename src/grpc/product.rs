//! ProductService: decode, validate, call the use case, encode.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use crate::{
    app::{Catalog, Popular, PopularDays, PopularLimit},
    domain::{PageSize, PageToken, ProductId},
    proto::{
        GetPopularProductsRequest, GetPopularProductsResponse, GetProductRequest,
        GetProductResponse, ListProductsRequest, ListProductsResponse,
        product_service_server::ProductService,
    },
};

pub struct ProductHandler {
    pub catalog: Arc<Catalog>,
    pub popular: Arc<Popular>,
}

#[tonic::async_trait]
impl ProductService for ProductHandler {
    async fn list_products(
        &self,
        request: Request<ListProductsRequest>,
    ) -> Result<Response<ListProductsResponse>, Status> {
        let req = request.into_inner();
        let page_size = PageSize::parse(req.page_size)?;
        let after = PageToken::parse(&req.page_token)?;
        let (products, next) = self.catalog.selling(page_size, after).await?;
        Ok(Response::new(ListProductsResponse {
            products: products.into_iter().map(convert::product).collect(),
            next_page_token: next.map(PageToken::encode).unwrap_or_default(),
        }))
    }

    async fn get_product(
        &self,
        request: Request<GetProductRequest>,
    ) -> Result<Response<GetProductResponse>, Status> {
        let id = ProductId::parse(request.into_inner().product_id, "product_id")?;
        let product = self.catalog.product(id).await?;
        Ok(Response::new(GetProductResponse {
            product: Some(convert::product(product)),
        }))
    }

    async fn get_popular_products(
        &self,
        request: Request<GetPopularProductsRequest>,
    ) -> Result<Response<GetPopularProductsResponse>, Status> {
        let req = request.into_inner();
        let days = PopularDays::parse(req.days)?;
        let limit = PopularLimit::parse(req.limit)?;
        let items = self.popular.top(days, limit).await?;
        Ok(Response::new(GetPopularProductsResponse {
            items: items.into_iter().map(convert::popular_product).collect(),
        }))
    }
}
