//! The gRPC edge: thin handlers that decode and validate requests into domain values, call the
//! use case, and encode the answer. Errors become statuses in one place (`crate::error`).

pub mod access;
mod admin;
mod balance;
mod cart;
mod convert;
mod coupon;
pub mod middleware;
mod order;
mod payment;
mod product;

use std::sync::Arc;

use tonic::service::Routes;

use crate::{
    app::{Balances, Carts, Catalog, Coupons, Orders, Outbox, Payments, Popular, Refunds},
    proto::{
        FILE_DESCRIPTOR_SET, admin_service_server::AdminServiceServer,
        balance_service_server::BalanceServiceServer, cart_service_server::CartServiceServer,
        coupon_service_server::CouponServiceServer, order_service_server::OrderServiceServer,
        payment_service_server::PaymentServiceServer, product_service_server::ProductServiceServer,
    },
};

pub use admin::AdminAuth;

/// Limits applied to every service.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Larger requests are refused (RESOURCE_EXHAUSTED) before they are decoded.
    pub max_message_bytes: usize,
}

/// The use cases the handlers call; each handler gets only the ones it needs.
pub struct Services {
    pub balances: Arc<Balances>,
    pub carts: Arc<Carts>,
    pub catalog: Arc<Catalog>,
    pub coupons: Arc<Coupons>,
    pub orders: Arc<Orders>,
    pub payments: Arc<Payments>,
    pub popular: Arc<Popular>,
    pub outbox: Arc<Outbox>,
    pub refunds: Arc<Refunds>,
}

/// The `ecommerce.v1` services and server reflection (v1 and v1alpha: grpcurl 1.8 asks for the
/// latter).
pub fn routes(services: Services, admin_auth: AdminAuth, limits: Limits) -> Routes {
    let Services {
        balances,
        carts,
        catalog,
        coupons,
        orders,
        payments,
        popular,
        outbox,
        refunds,
    } = services;
    let max = limits.max_message_bytes;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Lets grpcurl decode the google.rpc.ErrorInfo details of our errors.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let mut routes = Routes::default();
    routes = routes
        .add_service(
            BalanceServiceServer::new(balance::BalanceHandler(balances))
                .max_decoding_message_size(max),
        )
        .add_service(
            ProductServiceServer::new(product::ProductHandler {
                catalog: catalog.clone(),
                popular,
            })
            .max_decoding_message_size(max),
        )
        .add_service(
            CouponServiceServer::new(coupon::CouponHandler(coupons.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            OrderServiceServer::new(order::OrderHandler(orders.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            CartServiceServer::new(cart::CartHandler(carts)).max_decoding_message_size(max),
        )
        .add_service(
            PaymentServiceServer::new(payment::PaymentHandler(payments))
                .max_decoding_message_size(max),
        )
        .add_service(tonic::service::interceptor::InterceptedService::new(
            AdminServiceServer::new(admin::AdminHandler {
                catalog,
                coupons,
                outbox,
                refunds,
                orders,
            })
            .max_decoding_message_size(max),
            admin_auth,
        ))
        .add_service(
            reflection()
                .build_v1()
                .expect("the embedded descriptor set is valid"),
        )
        .add_service(
            reflection()
                .build_v1alpha()
                .expect("the embedded descriptor set is valid"),
        );
    routes
}
