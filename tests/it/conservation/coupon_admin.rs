//! The operator's coupon controls inside the workload: every coupon listed with seats that add
//! up, and totals moved up and down around the fixture's while buyers issue and spend them. A
//! total is set absolutely, so workers moving the same coupon lower each other's raises; a
//! lowering below the coupons issued must be refused, and nothing may ever be issued past the
//! total Postgres has (the rules and the books check that at the end).

use std::collections::HashSet;

use ecommerce::proto::{Coupon, ListCouponsRequest, UpdateCouponRequest};
use rand::{Rng, rngs::StdRng, seq::IndexedRandom};
use tonic::Status;

use super::{record::Shared, shop::Shop};
use crate::support::TestApp;

/// Every coupon, walked page by page.
async fn every_coupon(app: &TestApp, page_size: i32) -> Result<Vec<Coupon>, Status> {
    let mut request = ListCouponsRequest {
        page_size,
        page_token: String::new(),
    };
    let mut coupons = Vec::new();
    loop {
        let page = app
            .admin()
            .list_coupons(request.clone())
            .await?
            .into_inner();
        coupons.extend(page.coupons);
        if page.next_page_token.is_empty() {
            return Ok(coupons);
        }
        request.page_token = page.next_page_token;
    }
}

fn seats_add_up(coupon: &Coupon) -> bool {
    coupon.issued_quantity + coupon.remaining_quantity == coupon.total_quantity
        && (0..=coupon.total_quantity).contains(&coupon.issued_quantity)
}

/// Lists every coupon, or moves one coupon's total to between 3 below and 3 above the
/// fixture's.
pub(super) async fn coupon_admin_op(app: &TestApp, shop: &Shop, shared: &Shared, rng: &mut StdRng) {
    if rng.random_bool(0.5) {
        let listed = every_coupon(app, rng.random_range(1..=5)).await;
        shared.note("list coupons (every page)", &listed, &[]);
        if let Ok(coupons) = listed {
            let ids: HashSet<i64> = coupons.iter().map(|c| c.id).collect();
            if shop.coupon_ids.iter().any(|id| !ids.contains(id)) || ids.len() != coupons.len() {
                shared.violation(format!("ListCoupons listed {ids:?}"));
            }
            for coupon in coupons.iter().filter(|c| !seats_add_up(c)) {
                shared.violation(format!("ListCoupons: seats do not add up: {coupon:?}"));
            }
        }
        return;
    }
    let coupon_id = *shop.coupon_ids.choose(rng).unwrap();
    let (_, _, fixture_total) = shop.coupons[&coupon_id];
    let total = (fixture_total + rng.random_range(-3..=3)).max(1);
    let updated = app
        .admin()
        .update_coupon(UpdateCouponRequest {
            coupon_id,
            total_quantity: Some(total),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().coupon.expect("coupon"));
    shared.note(
        "update coupon total",
        &updated,
        &["COUPON_QUANTITY_BELOW_ISSUED"],
    );
    if let Ok(coupon) = updated
        && (coupon.total_quantity != total || !seats_add_up(&coupon))
    {
        shared.violation(format!("UpdateCoupon to {total} answered {coupon:?}"));
    }
}
