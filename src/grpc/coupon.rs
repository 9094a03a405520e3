//! CouponService: decode, validate, call the use case, encode.

use std::sync::Arc;

use chrono::Utc;
use tonic::{Request, Response, Status};

use super::convert;
use crate::{
    app::Coupons,
    domain::{CouponId, PageSize, PageToken, UserId},
    proto::{
        GetCouponRequest, GetCouponResponse, IssueCouponRequest, IssueCouponResponse,
        ListUserCouponsRequest, ListUserCouponsResponse, coupon_service_server::CouponService,
    },
};

pub struct CouponHandler(pub Arc<Coupons>);

#[tonic::async_trait]
impl CouponService for CouponHandler {
    async fn issue_coupon(
        &self,
        request: Request<IssueCouponRequest>,
    ) -> Result<Response<IssueCouponResponse>, Status> {
        let req = request.into_inner();
        let user_id = UserId::parse(req.user_id, "user_id")?;
        let coupon_id = CouponId::parse(req.coupon_id, "coupon_id")?;
        let issued = self.0.issue(coupon_id, user_id).await?;
        Ok(Response::new(IssueCouponResponse {
            user_coupon: Some(convert::user_coupon(issued, Utc::now())),
        }))
    }

    async fn get_coupon(
        &self,
        request: Request<GetCouponRequest>,
    ) -> Result<Response<GetCouponResponse>, Status> {
        let id = CouponId::parse(request.into_inner().coupon_id, "coupon_id")?;
        let stock = self.0.stock(id).await?;
        Ok(Response::new(GetCouponResponse {
            coupon: Some(convert::coupon(stock)),
        }))
    }

    async fn list_user_coupons(
        &self,
        request: Request<ListUserCouponsRequest>,
    ) -> Result<Response<ListUserCouponsResponse>, Status> {
        let req = request.into_inner();
        let user_id = UserId::parse(req.user_id, "user_id")?;
        let page_size = PageSize::parse(req.page_size)?;
        let after = PageToken::parse(&req.page_token)?;
        let (coupons, next) = self.0.user_coupons(user_id, page_size, after).await?;
        let now = Utc::now();
        Ok(Response::new(ListUserCouponsResponse {
            user_coupons: coupons
                .into_iter()
                .map(|c| convert::user_coupon(c, now))
                .collect(),
            next_page_token: next.map(PageToken::encode).unwrap_or_default(),
        }))
    }
}
