//! Refunds as tests drive them: buy and pay an order, refund it through AdminService, and judge
//! each refund against the contract's allocation rule, written again here independently of the
//! server's: every refunded line within 1 won of its exact share, what was paid never exceeded.

use ecommerce::proto::{Order, Refund, RefundLine, RefundOrderRequest};
use tonic::Status;

use crate::support::{
    TestApp,
    shop::{charge, pay, place_with},
};

pub fn refund_request(
    order_id: i64,
    lines: &[(i64, i32)],
    restock: bool,
    key: &str,
) -> RefundOrderRequest {
    RefundOrderRequest {
        order_id,
        lines: lines
            .iter()
            .map(|&(product_id, quantity)| RefundLine {
                product_id,
                quantity,
            })
            .collect(),
        restock,
        reason: "test refund".into(),
        idempotency_key: key.into(),
    }
}

/// Sends a refund; returns the order after it and the refund.
pub async fn refund_with(
    app: &TestApp,
    request: RefundOrderRequest,
) -> Result<(Order, Refund), Status> {
    app.admin().refund_order(request).await.map(|r| {
        let r = r.into_inner();
        (r.order.expect("order"), r.refund.expect("refund"))
    })
}

pub async fn refund(
    app: &TestApp,
    order_id: i64,
    lines: &[(i64, i32)],
    restock: bool,
    key: &str,
) -> Result<(Order, Refund), Status> {
    refund_with(app, refund_request(order_id, lines, restock, key)).await
}

/// What [`paid_order`] charges the buyer first: enough for any order of 50 lines of 20 units at
/// 1,000,000 won, a thousand times below the default MAX_BALANCE.
pub const FUNDS: i64 = 1_000_000_000;

/// Charges `user` [`FUNDS`], places `items` (with `user_coupon_id`, 0 for none) and pays: the
/// paid order.
pub async fn paid_order(
    app: &TestApp,
    user: i64,
    items: &[(i64, i32)],
    user_coupon_id: i64,
) -> Order {
    charge(app, user, FUNDS).await;
    let order = place_with(
        app,
        ecommerce::proto::PlaceOrderRequest {
            user_id: user,
            items: crate::support::shop::lines(items),
            user_coupon_id,
            idempotency_key: String::new(),
        },
    )
    .await
    .expect("order placed");
    pay(app, user, order.id).await.expect("order paid");
    order
}

/// What is wrong with `refund` of `order` (as placed) by the allocation rule, if anything:
/// each line must give back its exact share `quantity × unit_price × final / total` to within
/// less than 1 won, and the refund's amount must be the sum of its lines.
pub fn misallocated(order: &Order, refund: &Refund) -> Option<String> {
    let total = i128::from(order.total_amount);
    let paid = i128::from(order.final_amount);
    let mut sum = 0;
    for line in &refund.lines {
        let Some(item) = order.items.iter().find(|i| i.product_id == line.product_id) else {
            return Some(format!(
                "refund {} names a product not in the order",
                refund.id
            ));
        };
        let exact = i128::from(line.quantity) * i128::from(item.unit_price) * paid;
        let error = (i128::from(line.amount) * total - exact).abs();
        if line.amount < 0 || (total > 0 && error >= total) || (total == 0 && line.amount != 0) {
            return Some(format!(
                "refund {} line {line:?}: exact share {exact}/{total}, off by {error}/{total}",
                refund.id
            ));
        }
        sum += line.amount;
    }
    (sum != refund.amount).then(|| format!("refund {}: lines add up to {sum}", refund.id))
}
