//! A call to one RPC of the contract, as a value: `cases` draws it, `oracle` judges it by what it
//! is (its RPC, whether it only reads, the admin token it carries, its size on the wire), and the
//! test sends it. Printed cut short, so that a failing 1 MB case reads as one line.

use std::fmt;

use ecommerce::proto::{
    AdjustStockRequest, AdminServiceGetOrderRequest, AdminServiceListOrdersRequest,
    AdminServiceListProductsRequest, CancelOrderRequest, ChargeBalanceRequest, CheckoutRequest,
    ClearRequest, CreateCouponRequest, CreateProductRequest, GetBalanceRequest, GetCartRequest,
    GetCouponRequest, GetOrderRequest, GetPopularProductsRequest, GetProductRequest,
    IssueCouponRequest, ListBalanceHistoryRequest, ListCouponsRequest, ListOrdersRequest,
    ListParkedEventsRequest, ListProductsRequest, ListUserCouponsRequest, PayRequest,
    PlaceOrderRequest, RedriveEventsRequest, RefundOrderRequest, RemoveItemRequest, SetItemRequest,
    UpdateCouponRequest, UpdateProductRequest,
};
use prost::Message;
use tonic::Status;

use crate::support::TestApp;

/// The admin token an admin call carries: the right one, none, or a wrong one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Auth {
    Admin,
    Missing,
    Wrong,
}

#[derive(Clone)]
pub(super) enum Call {
    ChargeBalance(ChargeBalanceRequest),
    GetBalance(GetBalanceRequest),
    ListBalanceHistory(ListBalanceHistoryRequest),
    ListProducts(ListProductsRequest),
    GetProduct(GetProductRequest),
    GetPopularProducts(GetPopularProductsRequest),
    IssueCoupon(IssueCouponRequest),
    GetCoupon(GetCouponRequest),
    ListUserCoupons(ListUserCouponsRequest),
    PlaceOrder(PlaceOrderRequest),
    GetOrder(GetOrderRequest),
    CancelOrder(CancelOrderRequest),
    Pay(PayRequest),
    GetCart(GetCartRequest),
    SetItem(SetItemRequest),
    RemoveItem(RemoveItemRequest),
    Clear(ClearRequest),
    Checkout(CheckoutRequest),
    CreateProduct(Auth, CreateProductRequest),
    UpdateProduct(Auth, UpdateProductRequest),
    AdjustStock(Auth, AdjustStockRequest),
    CreateCoupon(Auth, CreateCouponRequest),
    ListParkedEvents(Auth, ListParkedEventsRequest),
    RedriveEvents(Auth, RedriveEventsRequest),
    RefundOrder(Auth, RefundOrderRequest),
    ListOrders(ListOrdersRequest),
    AdminGetOrder(Auth, AdminServiceGetOrderRequest),
    AdminListOrders(Auth, AdminServiceListOrdersRequest),
    AdminListProducts(Auth, AdminServiceListProductsRequest),
    ListCoupons(Auth, ListCouponsRequest),
    UpdateCoupon(Auth, UpdateCouponRequest),
}

/// Debug output with long strings cut, so a failing 1 MB case prints as one line.
impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = match self {
            Call::ChargeBalance(r) => format!("{r:?}"),
            Call::GetBalance(r) => format!("{r:?}"),
            Call::ListBalanceHistory(r) => format!("{r:?}"),
            Call::ListProducts(r) => format!("{r:?}"),
            Call::GetProduct(r) => format!("{r:?}"),
            Call::GetPopularProducts(r) => format!("{r:?}"),
            Call::IssueCoupon(r) => format!("{r:?}"),
            Call::GetCoupon(r) => format!("{r:?}"),
            Call::ListUserCoupons(r) => format!("{r:?}"),
            Call::PlaceOrder(r) => format!("{r:?}"),
            Call::GetOrder(r) => format!("{r:?}"),
            Call::CancelOrder(r) => format!("{r:?}"),
            Call::Pay(r) => format!("{r:?}"),
            Call::CreateProduct(a, r) => format!("{a:?} {r:?}"),
            Call::UpdateProduct(a, r) => format!("{a:?} {r:?}"),
            Call::AdjustStock(a, r) => format!("{a:?} {r:?}"),
            Call::CreateCoupon(a, r) => format!("{a:?} {r:?}"),
            Call::GetCart(r) => format!("{r:?}"),
            Call::SetItem(r) => format!("{r:?}"),
            Call::RemoveItem(r) => format!("{r:?}"),
            Call::Clear(r) => format!("{r:?}"),
            Call::Checkout(r) => format!("{r:?}"),
            Call::ListParkedEvents(a, r) => format!("{a:?} {r:?}"),
            Call::RedriveEvents(a, r) => format!("{a:?} {r:?}"),
            Call::RefundOrder(a, r) => format!("{a:?} {r:?}"),
            Call::ListOrders(r) => format!("{r:?}"),
            Call::AdminGetOrder(a, r) => format!("{a:?} {r:?}"),
            Call::AdminListOrders(a, r) => format!("{a:?} {r:?}"),
            Call::AdminListProducts(a, r) => format!("{a:?} {r:?}"),
            Call::ListCoupons(a, r) => format!("{a:?} {r:?}"),
            Call::UpdateCoupon(a, r) => format!("{a:?} {r:?}"),
        };
        if full.len() > 600 {
            let cut = full.char_indices().nth(600).map_or(full.len(), |(i, _)| i);
            write!(
                f,
                "{} {}... ({} bytes)",
                self.rpc(),
                &full[..cut],
                full.len()
            )
        } else {
            write!(f, "{} {full}", self.rpc())
        }
    }
}

impl Call {
    pub(super) fn rpc(&self) -> &'static str {
        match self {
            Call::ChargeBalance(_) => "ChargeBalance",
            Call::GetBalance(_) => "GetBalance",
            Call::ListBalanceHistory(_) => "ListBalanceHistory",
            Call::ListProducts(_) => "ListProducts",
            Call::GetProduct(_) => "GetProduct",
            Call::GetPopularProducts(_) => "GetPopularProducts",
            Call::IssueCoupon(_) => "IssueCoupon",
            Call::GetCoupon(_) => "GetCoupon",
            Call::ListUserCoupons(_) => "ListUserCoupons",
            Call::PlaceOrder(_) => "PlaceOrder",
            Call::GetOrder(_) => "GetOrder",
            Call::CancelOrder(_) => "CancelOrder",
            Call::Pay(_) => "Pay",
            Call::GetCart(_) => "GetCart",
            Call::SetItem(_) => "SetItem",
            Call::RemoveItem(_) => "RemoveItem",
            Call::Clear(_) => "Clear",
            Call::Checkout(_) => "Checkout",
            Call::CreateProduct(Auth::Admin, _) => "CreateProduct",
            Call::CreateProduct(..) => "CreateProduct (no token)",
            Call::UpdateProduct(Auth::Admin, _) => "UpdateProduct",
            Call::UpdateProduct(..) => "UpdateProduct (no token)",
            Call::AdjustStock(Auth::Admin, _) => "AdjustStock",
            Call::AdjustStock(..) => "AdjustStock (no token)",
            Call::CreateCoupon(Auth::Admin, _) => "CreateCoupon",
            Call::CreateCoupon(..) => "CreateCoupon (no token)",
            Call::ListParkedEvents(Auth::Admin, _) => "ListParkedEvents",
            Call::ListParkedEvents(..) => "ListParkedEvents (no token)",
            Call::RedriveEvents(Auth::Admin, _) => "RedriveEvents",
            Call::RedriveEvents(..) => "RedriveEvents (no token)",
            Call::RefundOrder(Auth::Admin, _) => "RefundOrder",
            Call::RefundOrder(..) => "RefundOrder (no token)",
            Call::ListOrders(_) => "ListOrders",
            Call::AdminGetOrder(Auth::Admin, _) => "Admin GetOrder",
            Call::AdminGetOrder(..) => "Admin GetOrder (no token)",
            Call::AdminListOrders(Auth::Admin, _) => "Admin ListOrders",
            Call::AdminListOrders(..) => "Admin ListOrders (no token)",
            Call::AdminListProducts(Auth::Admin, _) => "Admin ListProducts",
            Call::AdminListProducts(..) => "Admin ListProducts (no token)",
            Call::ListCoupons(Auth::Admin, _) => "ListCoupons",
            Call::ListCoupons(..) => "ListCoupons (no token)",
            Call::UpdateCoupon(Auth::Admin, _) => "UpdateCoupon",
            Call::UpdateCoupon(..) => "UpdateCoupon (no token)",
        }
    }

    pub(super) fn read_only(&self) -> bool {
        matches!(
            self,
            Call::GetBalance(_)
                | Call::ListBalanceHistory(_)
                | Call::ListProducts(_)
                | Call::GetProduct(_)
                | Call::GetPopularProducts(_)
                | Call::GetCoupon(_)
                | Call::ListUserCoupons(_)
                | Call::GetOrder(_)
                | Call::GetCart(_)
                | Call::ListParkedEvents(..)
                | Call::ListOrders(_)
                | Call::AdminGetOrder(..)
                | Call::AdminListOrders(..)
                | Call::AdminListProducts(..)
                | Call::ListCoupons(..)
        )
    }

    pub(super) fn auth(&self) -> Option<Auth> {
        match self {
            Call::CreateProduct(a, _)
            | Call::UpdateProduct(a, _)
            | Call::AdjustStock(a, _)
            | Call::CreateCoupon(a, _)
            | Call::ListParkedEvents(a, _)
            | Call::RedriveEvents(a, _)
            | Call::RefundOrder(a, _)
            | Call::AdminGetOrder(a, _)
            | Call::AdminListOrders(a, _)
            | Call::AdminListProducts(a, _)
            | Call::ListCoupons(a, _)
            | Call::UpdateCoupon(a, _) => Some(*a),
            _ => None,
        }
    }

    pub(super) fn encoded_len(&self) -> usize {
        match self {
            Call::ChargeBalance(r) => r.encoded_len(),
            Call::GetBalance(r) => r.encoded_len(),
            Call::ListBalanceHistory(r) => r.encoded_len(),
            Call::ListProducts(r) => r.encoded_len(),
            Call::GetProduct(r) => r.encoded_len(),
            Call::GetPopularProducts(r) => r.encoded_len(),
            Call::IssueCoupon(r) => r.encoded_len(),
            Call::GetCoupon(r) => r.encoded_len(),
            Call::ListUserCoupons(r) => r.encoded_len(),
            Call::PlaceOrder(r) => r.encoded_len(),
            Call::GetOrder(r) => r.encoded_len(),
            Call::CancelOrder(r) => r.encoded_len(),
            Call::Pay(r) => r.encoded_len(),
            Call::GetCart(r) => r.encoded_len(),
            Call::SetItem(r) => r.encoded_len(),
            Call::RemoveItem(r) => r.encoded_len(),
            Call::Clear(r) => r.encoded_len(),
            Call::Checkout(r) => r.encoded_len(),
            Call::CreateProduct(_, r) => r.encoded_len(),
            Call::UpdateProduct(_, r) => r.encoded_len(),
            Call::AdjustStock(_, r) => r.encoded_len(),
            Call::CreateCoupon(_, r) => r.encoded_len(),
            Call::ListParkedEvents(_, r) => r.encoded_len(),
            Call::RedriveEvents(_, r) => r.encoded_len(),
            Call::RefundOrder(_, r) => r.encoded_len(),
            Call::ListOrders(r) => r.encoded_len(),
            Call::AdminGetOrder(_, r) => r.encoded_len(),
            Call::AdminListOrders(_, r) => r.encoded_len(),
            Call::AdminListProducts(_, r) => r.encoded_len(),
            Call::ListCoupons(_, r) => r.encoded_len(),
            Call::UpdateCoupon(_, r) => r.encoded_len(),
        }
    }

    /// Sends the call; the response body is dropped (the invariants are about codes and state).
    pub(super) async fn send(self, app: &TestApp) -> Result<(), Status> {
        let admin = |auth: Auth| match auth {
            Auth::Admin => app.admin(),
            Auth::Missing => app.admin_with_token(None),
            Auth::Wrong => app.admin_with_token(Some("test-admin-tokeN")),
        };
        match self {
            Call::ChargeBalance(r) => app.balance().charge_balance(r).await.map(drop),
            Call::GetBalance(r) => app.balance().get_balance(r).await.map(drop),
            Call::ListBalanceHistory(r) => app.balance().list_balance_history(r).await.map(drop),
            Call::ListProducts(r) => app.products().list_products(r).await.map(drop),
            Call::GetProduct(r) => app.products().get_product(r).await.map(drop),
            Call::GetPopularProducts(r) => app.products().get_popular_products(r).await.map(drop),
            Call::IssueCoupon(r) => app.coupons().issue_coupon(r).await.map(drop),
            Call::GetCoupon(r) => app.coupons().get_coupon(r).await.map(drop),
            Call::ListUserCoupons(r) => app.coupons().list_user_coupons(r).await.map(drop),
            Call::PlaceOrder(r) => app.orders().place_order(r).await.map(drop),
            Call::GetOrder(r) => app.orders().get_order(r).await.map(drop),
            Call::CancelOrder(r) => app.orders().cancel_order(r).await.map(drop),
            Call::Pay(r) => app.payments().pay(r).await.map(drop),
            Call::GetCart(r) => app.carts().get_cart(r).await.map(drop),
            Call::SetItem(r) => app.carts().set_item(r).await.map(drop),
            Call::RemoveItem(r) => app.carts().remove_item(r).await.map(drop),
            Call::Clear(r) => app.carts().clear(r).await.map(drop),
            Call::Checkout(r) => app.carts().checkout(r).await.map(drop),
            Call::CreateProduct(a, r) => admin(a).create_product(r).await.map(drop),
            Call::UpdateProduct(a, r) => admin(a).update_product(r).await.map(drop),
            Call::AdjustStock(a, r) => admin(a).adjust_stock(r).await.map(drop),
            Call::CreateCoupon(a, r) => admin(a).create_coupon(r).await.map(drop),
            Call::ListParkedEvents(a, r) => admin(a).list_parked_events(r).await.map(drop),
            Call::RedriveEvents(a, r) => admin(a).redrive_events(r).await.map(drop),
            Call::RefundOrder(a, r) => admin(a).refund_order(r).await.map(drop),
            Call::ListOrders(r) => app.orders().list_orders(r).await.map(drop),
            Call::AdminGetOrder(a, r) => admin(a).get_order(r).await.map(drop),
            Call::AdminListOrders(a, r) => admin(a).list_orders(r).await.map(drop),
            Call::AdminListProducts(a, r) => admin(a).list_products(r).await.map(drop),
            Call::ListCoupons(a, r) => admin(a).list_coupons(r).await.map(drop),
            Call::UpdateCoupon(a, r) => admin(a).update_coupon(r).await.map(drop),
        }
    }
}
