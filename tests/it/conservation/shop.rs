//! The shop the workload trades in: ten products of limited stock, one the admin only adjusts,
//! four coupon kinds, and the
//! contract's pricing rule written again, independently of the server's, so that the record can
//! check the price of every order placed.

use std::collections::HashMap;

use ecommerce::proto::{
    CreateCouponRequest, Discount, FixedDiscount, PercentDiscount, ProductStatus, discount,
};

use crate::support::{
    TestApp,
    coupons::{coupon_request, create_coupon_with},
    shop::create_product_with_status,
};

/// (name, unit price, initial stock): limited, so that some orders find a product sold out.
const PRODUCTS: [(&str, i64, i64); 10] = [
    ("keyboard", 39_000, 200),
    ("mouse", 12_000, 300),
    ("monitor", 189_000, 40),
    ("webcam", 59_000, 120),
    ("headset", 45_000, 150),
    ("usb cable", 3_000, 600),
    ("desk lamp", 27_000, 180),
    ("chair", 149_000, 30),
    ("mouse pad", 5_000, 400),
    ("speaker", 68_000, 100),
];

/// The coupon kinds: (discount, min order amount, total quantity).
#[derive(Clone, Copy, Debug)]
pub(super) enum Kind {
    Fixed(i64),
    Percent { percent: i64, max: i64 },
}

const COUPONS: [(Kind, i64, i64); 4] = [
    (Kind::Fixed(3_000), 0, 30),
    (Kind::Fixed(10_000), 30_000, 10),
    (
        Kind::Percent {
            percent: 10,
            max: 5_000,
        },
        0,
        40,
    ),
    (
        Kind::Percent {
            percent: 50,
            max: 0,
        },
        0,
        5,
    ),
];

impl Kind {
    fn discount(self) -> Discount {
        let kind = match self {
            Kind::Fixed(amount) => discount::Kind::Fixed(FixedDiscount { amount }),
            Kind::Percent { percent, max } => discount::Kind::Percent(PercentDiscount {
                percent: percent as i32,
                max_discount: max,
            }),
        };
        Discount { kind: Some(kind) }
    }

    /// The contract's pricing rule, written again independently of the server's.
    pub(super) fn apply(self, total: i64, min_order_amount: i64) -> Option<i64> {
        if total < min_order_amount {
            return None;
        }
        Some(match self {
            Kind::Fixed(amount) => amount.min(total),
            Kind::Percent { percent, max } => {
                let raw = total * percent / 100;
                if max > 0 { raw.min(max) } else { raw }
            }
        })
    }
}

/// What the fixture created: ids, and the coupon behind each coupon id.
pub(super) struct Shop {
    /// (id, price, initial stock)
    pub(super) products: Vec<(i64, i64, i64)>,
    /// id -> (kind, min order amount, total quantity)
    pub(super) coupons: HashMap<i64, (Kind, i64, i64)>,
    pub(super) coupon_ids: Vec<i64>,
    /// A product no order can buy (STOPPED), whose stock only keyed AdjustStock calls move.
    pub(super) adjusted: i64,
    pub(super) adjusted_stock: i64,
}

impl Shop {
    pub(super) fn price(&self, product: i64) -> i64 {
        self.products.iter().find(|p| p.0 == product).unwrap().1
    }
}

/// `stock_scale` multiplies the stock, so that a long run still has something to sell after its
/// first minute.
pub(super) async fn open_shop(app: &TestApp, stock_scale: i64) -> Shop {
    let mut products = Vec::new();
    for (name, price, stock) in PRODUCTS {
        let stock = stock * stock_scale;
        let id = create_product_with_status(app, name, price, stock, ProductStatus::Selling).await;
        products.push((id, price, stock));
    }
    let mut coupons = HashMap::new();
    for (i, (kind, min_order_amount, total)) in COUPONS.into_iter().enumerate() {
        let id = create_coupon_with(
            app,
            CreateCouponRequest {
                name: format!("conservation coupon {i}"),
                discount: Some(kind.discount()),
                min_order_amount,
                ..coupon_request(total)
            },
        )
        .await;
        coupons.insert(id, (kind, min_order_amount, total));
    }
    let coupon_ids = coupons.keys().copied().collect();
    let adjusted_stock = 1_000;
    let adjusted = create_product_with_status(
        app,
        "stockroom",
        1_000,
        adjusted_stock,
        ProductStatus::Stopped,
    )
    .await;
    Shop {
        products,
        coupons,
        coupon_ids,
        adjusted,
        adjusted_stock,
    }
}
