//! AdminService: every call is authenticated by [`AdminAuth`] before it reaches a handler.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status, service::Interceptor};

use super::convert;
use crate::{
    app::{Catalog, Coupons, Orders, Outbox, RefundCommand, Refunds},
    domain::{
        CouponChanges, CouponId, CreatedCursor, CreatedRange, DisplayName, IdempotencyKey,
        IssueWindow, NewCoupon, NewProduct, OrderFilter, OrderId, PageSize, PageToken,
        ProductChanges, ProductId, RedriveSelection, RefundReason, RefundSelection, UserId,
        ValidDays, ValidationError, Won, parse_stock, parse_total_quantity,
    },
    error::AppError,
    proto::{
        AdjustStockRequest, AdjustStockResponse, AdminServiceGetOrderRequest,
        AdminServiceGetOrderResponse, AdminServiceListOrdersRequest,
        AdminServiceListOrdersResponse, AdminServiceListProductsRequest,
        AdminServiceListProductsResponse, CreateCouponRequest, CreateCouponResponse,
        CreateProductRequest, CreateProductResponse, ListCouponsRequest, ListCouponsResponse,
        ListParkedEventsRequest, ListParkedEventsResponse, RedriveEventsRequest,
        RedriveEventsResponse, RefundOrderRequest, RefundOrderResponse, UpdateCouponRequest,
        UpdateCouponResponse, UpdateProductRequest, UpdateProductResponse,
        admin_service_server::AdminService,
    },
};

/// Checks `authorization: Bearer <token>` in constant time (for a given length), so the
/// comparison does not leak how much of a guess was right.
#[derive(Clone)]
pub struct AdminAuth {
    expected: Arc<[u8]>,
}

impl AdminAuth {
    pub fn new(token: &str) -> Self {
        Self {
            expected: format!("Bearer {token}").into_bytes().into(),
        }
    }
}

impl Interceptor for AdminAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .map(|value| value.as_bytes());
        match presented {
            Some(value) if bool::from(value.ct_eq(&self.expected)) => Ok(request),
            _ => Err(AppError::Unauthenticated.into()),
        }
    }
}

pub struct AdminHandler {
    pub catalog: Arc<Catalog>,
    pub coupons: Arc<Coupons>,
    pub outbox: Arc<Outbox>,
    pub refunds: Arc<Refunds>,
    pub orders: Arc<Orders>,
}

#[tonic::async_trait]
impl AdminService for AdminHandler {
    async fn create_product(
        &self,
        request: Request<CreateProductRequest>,
    ) -> Result<Response<CreateProductResponse>, Status> {
        let req = request.into_inner();
        let new = NewProduct {
            name: DisplayName::parse(req.name, "name")?,
            price: Won::parse_non_negative(req.price, "price")?,
            stock: parse_stock(req.stock, "stock")?,
            status: convert::parse_product_status(req.status, "status")?,
        };
        let key = IdempotencyKey::parse(req.idempotency_key)?;
        let product = self.catalog.create(new, key.as_ref()).await?;
        Ok(Response::new(CreateProductResponse {
            product: Some(convert::product(product)),
        }))
    }

    async fn update_product(
        &self,
        request: Request<UpdateProductRequest>,
    ) -> Result<Response<UpdateProductResponse>, Status> {
        let req = request.into_inner();
        let id = ProductId::parse(req.product_id, "product_id")?;
        let changes = ProductChanges {
            name: req
                .name
                .map(|n| DisplayName::parse(n, "name"))
                .transpose()?,
            price: req
                .price
                .map(|p| Won::parse_non_negative(p, "price"))
                .transpose()?,
            stock: req.stock.map(|s| parse_stock(s, "stock")).transpose()?,
            status: req
                .status
                .map(|s| convert::parse_product_status(s, "status"))
                .transpose()?,
            expected_stock: req
                .expected_stock
                .map(|s| parse_stock(s, "expected_stock"))
                .transpose()?,
        };
        let product = self.catalog.update(id, changes).await?;
        Ok(Response::new(UpdateProductResponse {
            product: Some(convert::product(product)),
        }))
    }

    async fn adjust_stock(
        &self,
        request: Request<AdjustStockRequest>,
    ) -> Result<Response<AdjustStockResponse>, Status> {
        let req = request.into_inner();
        let id = ProductId::parse(req.product_id, "product_id")?;
        if req.delta == 0 {
            return Err(ValidationError::new("delta", "must not be 0").into());
        }
        let key = IdempotencyKey::parse(req.idempotency_key)?;
        let product = self
            .catalog
            .adjust_stock(id, req.delta, key.as_ref())
            .await?;
        Ok(Response::new(AdjustStockResponse {
            product: Some(convert::product(product)),
        }))
    }

    async fn create_coupon(
        &self,
        request: Request<CreateCouponRequest>,
    ) -> Result<Response<CreateCouponResponse>, Status> {
        let req = request.into_inner();
        let new = NewCoupon {
            name: DisplayName::parse(req.name, "name")?,
            discount: convert::parse_discount(req.discount)?,
            min_order_amount: Won::parse_non_negative(req.min_order_amount, "min_order_amount")?,
            total_quantity: parse_total_quantity(req.total_quantity)?,
            window: IssueWindow::parse(
                convert::parse_timestamp(req.issue_starts_at, "issue_starts_at")?,
                convert::parse_timestamp(req.issue_ends_at, "issue_ends_at")?,
            )?,
            valid_days: ValidDays::parse(req.valid_days)?,
        };
        let key = IdempotencyKey::parse(req.idempotency_key)?;
        let stock = self.coupons.create(new, key.as_ref()).await?;
        Ok(Response::new(CreateCouponResponse {
            coupon: Some(convert::coupon(stock)),
        }))
    }

    async fn list_parked_events(
        &self,
        request: Request<ListParkedEventsRequest>,
    ) -> Result<Response<ListParkedEventsResponse>, Status> {
        let req = request.into_inner();
        let page_size = PageSize::parse(req.page_size)?;
        let after = PageToken::parse(&req.page_token)?;
        let (events, next) = self.outbox.parked(page_size, after).await?;
        Ok(Response::new(ListParkedEventsResponse {
            events: events.into_iter().map(convert::parked_event).collect(),
            next_page_token: next.map(PageToken::encode).unwrap_or_default(),
        }))
    }

    async fn redrive_events(
        &self,
        request: Request<RedriveEventsRequest>,
    ) -> Result<Response<RedriveEventsResponse>, Status> {
        let req = request.into_inner();
        let selection = RedriveSelection::parse(req.event_ids, req.all)?;
        let redriven = self.outbox.redrive(selection).await?;
        Ok(Response::new(RedriveEventsResponse {
            redriven: redriven as i64,
        }))
    }

    async fn refund_order(
        &self,
        request: Request<RefundOrderRequest>,
    ) -> Result<Response<RefundOrderResponse>, Status> {
        let req = request.into_inner();
        let cmd = RefundCommand {
            order_id: OrderId::parse(req.order_id, "order_id")?,
            selection: RefundSelection::parse(
                req.lines.iter().map(|l| (l.product_id, l.quantity)),
            )?,
            restock: req.restock,
            reason: RefundReason::parse(req.reason)?,
            idempotency_key: IdempotencyKey::parse(req.idempotency_key)?
                .ok_or_else(|| ValidationError::new("idempotency_key", "is required"))?,
        };
        let (order, refund) = self.refunds.refund(cmd).await?;
        Ok(Response::new(RefundOrderResponse {
            order: Some(convert::order(order)),
            refund: Some(convert::refund(refund)),
        }))
    }

    async fn get_order(
        &self,
        request: Request<AdminServiceGetOrderRequest>,
    ) -> Result<Response<AdminServiceGetOrderResponse>, Status> {
        let id = OrderId::parse(request.into_inner().order_id, "order_id")?;
        let order = self.orders.get_any(id).await?;
        Ok(Response::new(AdminServiceGetOrderResponse {
            order: Some(convert::order(order)),
        }))
    }

    async fn list_orders(
        &self,
        request: Request<AdminServiceListOrdersRequest>,
    ) -> Result<Response<AdminServiceListOrdersResponse>, Status> {
        let req = request.into_inner();
        let filter = OrderFilter {
            user: optional_id(req.user_id, "user_id", UserId::parse)?,
            statuses: convert::parse_order_statuses(&req.statuses, "statuses")?,
            product: optional_id(req.product_id, "product_id", ProductId::parse)?,
            created: CreatedRange::parse(
                convert::parse_optional_timestamp(req.created_after, "created_after")?,
                convert::parse_optional_timestamp(req.created_before, "created_before")?,
            )?,
        };
        let size = PageSize::parse(req.page_size)?;
        let after = CreatedCursor::parse(&req.page_token)?;
        let (orders, next) = self.orders.page(&filter, size, after).await?;
        Ok(Response::new(AdminServiceListOrdersResponse {
            orders: orders.into_iter().map(convert::order).collect(),
            next_page_token: next.map(CreatedCursor::encode).unwrap_or_default(),
        }))
    }

    async fn list_products(
        &self,
        request: Request<AdminServiceListProductsRequest>,
    ) -> Result<Response<AdminServiceListProductsResponse>, Status> {
        let req = request.into_inner();
        let statuses = convert::parse_product_statuses(&req.statuses, "statuses")?;
        let size = PageSize::parse(req.page_size)?;
        let after = PageToken::parse(&req.page_token)?;
        let (products, next) = self.catalog.page(&statuses, size, after).await?;
        Ok(Response::new(AdminServiceListProductsResponse {
            products: products.into_iter().map(convert::product).collect(),
            next_page_token: next.map(PageToken::encode).unwrap_or_default(),
        }))
    }

    async fn list_coupons(
        &self,
        request: Request<ListCouponsRequest>,
    ) -> Result<Response<ListCouponsResponse>, Status> {
        let req = request.into_inner();
        let size = PageSize::parse(req.page_size)?;
        let after = PageToken::parse(&req.page_token)?;
        let (coupons, next) = self.coupons.page(size, after).await?;
        Ok(Response::new(ListCouponsResponse {
            coupons: coupons.into_iter().map(convert::coupon).collect(),
            next_page_token: next.map(PageToken::encode).unwrap_or_default(),
        }))
    }

    async fn update_coupon(
        &self,
        request: Request<UpdateCouponRequest>,
    ) -> Result<Response<UpdateCouponResponse>, Status> {
        let req = request.into_inner();
        let id = CouponId::parse(req.coupon_id, "coupon_id")?;
        let changes = CouponChanges {
            name: req
                .name
                .map(|n| DisplayName::parse(n, "name"))
                .transpose()?,
            issue_ends_at: convert::parse_optional_timestamp(req.issue_ends_at, "issue_ends_at")?,
            total_quantity: req.total_quantity.map(parse_total_quantity).transpose()?,
        };
        let key = IdempotencyKey::parse(req.idempotency_key)?;
        let stock = self.coupons.update(id, changes, key).await?;
        Ok(Response::new(UpdateCouponResponse {
            coupon: Some(convert::coupon(stock)),
        }))
    }
}

/// A filter by id: 0 means any; otherwise a valid id.
fn optional_id<T>(
    raw: i64,
    field: &'static str,
    parse: fn(i64, &'static str) -> Result<T, ValidationError>,
) -> Result<Option<T>, ValidationError> {
    match raw {
        0 => Ok(None),
        id => parse(id, field).map(Some),
    }
}
