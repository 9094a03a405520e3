//! AdminService: every call is authenticated by [`AdminAuth`] before it reaches a handler.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status, service::Interceptor};

use super::convert;
use crate::{
    app::{Catalog, Coupons, Outbox, RefundCommand, Refunds},
    domain::{
        DisplayName, IdempotencyKey, IssueWindow, NewCoupon, NewProduct, OrderId, PageSize,
        PageToken, ProductChanges, ProductId, RedriveSelection, RefundReason, RefundSelection,
        ValidDays, ValidationError, Won, parse_stock, parse_total_quantity,
    },
    error::AppError,
    proto::{
        AdjustStockRequest, AdjustStockResponse, CreateCouponRequest, CreateCouponResponse,
        CreateProductRequest, CreateProductResponse, ListParkedEventsRequest,
        ListParkedEventsResponse, RedriveEventsRequest, RedriveEventsResponse, RefundOrderRequest,
        RefundOrderResponse, UpdateProductRequest, UpdateProductResponse,
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
        let product = self.catalog.create(new).await?;
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
        let product = self.catalog.adjust_stock(id, req.delta).await?;
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
        let stock = self.coupons.create(new).await?;
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
}
