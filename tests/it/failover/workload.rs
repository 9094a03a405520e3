//! The keyed workload of the failover tests, written as a careful client: every call that
//! changes money, stock or orders carries an idempotency key (IssueCoupon needs none: a user
//! holds a coupon once, and a retry is told ALREADY_EXISTS with its id), and an indeterminate
//! answer (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED) is sent again, same key, until a definite
//! one comes. Every acknowledged write is recorded for the checker, and every answer counted.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ecommerce::proto::{
    ChargeBalanceRequest, CheckoutRequest, IssueCouponRequest, PayRequest, PlaceOrderRequest,
    SetItemRequest,
};
use tokio::time::Instant;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::support::{TestApp, shop::lines};

/// Users 1..=WORKERS, one worker each.
pub const WORKERS: i64 = 12;
/// The client's deadline per attempt.
const ATTEMPT_DEADLINE: Duration = Duration::from_secs(3);
/// A call still indeterminate after this long fails the test: the service never settled it.
const SETTLE_WITHIN: Duration = Duration::from_secs(90);

/// A write the service acknowledged (OK), with what it answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acked {
    Charge {
        user: i64,
        key: String,
        amount: i64,
        history_id: i64,
    },
    Order {
        user: i64,
        key: String,
        items: Vec<(i64, i32)>,
        order_id: i64,
        via_cart: bool,
    },
    Payment {
        user: i64,
        key: String,
        order_id: i64,
        payment_id: i64,
    },
    Coupon {
        user: i64,
        coupon: i64,
        user_coupon_id: i64,
    },
}

/// What the workload saw, shared by its workers.
#[derive(Default)]
pub struct Seen {
    pub acked: Vec<Acked>,
    /// Answers per `method code/reason`, retried ones included.
    pub answers: BTreeMap<String, usize>,
    /// When each successful attempt was sent and answered.
    pub ok_attempts: Vec<(Instant, Instant)>,
}

pub type Shared = Arc<Mutex<Seen>>;

/// The shop the workers trade in.
pub struct Shop {
    pub products: Vec<i64>,
    pub coupons: Vec<i64>,
}

fn indeterminate(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
    )
}

fn label(method: &str, status: &Status) -> String {
    let reason = status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default();
    format!("{method} {:?}/{reason}", status.code())
}

pub fn request<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(ATTEMPT_DEADLINE);
    request
}

/// Sends `call` until its answer is definite; counts every answer.
pub async fn settle<T, F, Fut>(seen: &Shared, method: &str, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let started = Instant::now();
    loop {
        let sent = Instant::now();
        let answer = call().await;
        let key = match &answer {
            Ok(_) => format!("{method} OK"),
            Err(status) => label(method, status),
        };
        {
            let mut seen = seen.lock().unwrap();
            *seen.answers.entry(key).or_default() += 1;
            if answer.is_ok() {
                seen.ok_attempts.push((sent, Instant::now()));
            }
        }
        match answer {
            Err(status) if indeterminate(status.code()) => {
                assert!(
                    started.elapsed() < SETTLE_WITHIN,
                    "{method} still indeterminate after {SETTLE_WITHIN:?}: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            definite => return definite,
        }
    }
}

fn ack(seen: &Shared, acked: Acked) {
    seen.lock().unwrap().acked.push(acked);
}

/// One user's loop: charges, orders and their payments, coupon issues, cart checkouts, until
/// `stop`.
pub async fn worker(app: &TestApp, shop: &Shop, user: i64, seen: Shared, stop: Arc<AtomicBool>) {
    let mut n = 0_usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("{user}-{n}-{}", uuid::Uuid::new_v4().simple());
        let items = vec![
            (shop.products[n % shop.products.len()], 1 + (n % 3) as i32),
            (shop.products[(n + 1) % shop.products.len()], 1),
        ][..1 + n % 2]
            .to_vec();
        match n % 5 {
            0 => charge(app, &seen, user, 5_000 + n as i64, &key).await,
            1 | 4 => {
                if let Some(order_id) = place(app, &seen, user, &items, &key).await {
                    pay(app, &seen, user, order_id, &format!("pay-{key}")).await;
                }
            }
            2 => issue(app, &seen, user, shop.coupons[(n / 5) % shop.coupons.len()]).await,
            _ => checkout(app, &seen, user, &items, &key).await,
        }
    }
}

pub async fn charge(app: &TestApp, seen: &Shared, user: i64, amount: i64, key: &str) {
    let answer = settle(seen, "ChargeBalance", || {
        let mut client = app.balance();
        let message = ChargeBalanceRequest {
            user_id: user,
            amount,
            idempotency_key: key.into(),
        };
        async move { client.charge_balance(request(message)).await }
    })
    .await;
    if let Ok(reply) = answer {
        let history_id = reply.into_inner().history_id;
        ack(
            seen,
            Acked::Charge {
                user,
                key: key.into(),
                amount,
                history_id,
            },
        );
    }
}

async fn place(
    app: &TestApp,
    seen: &Shared,
    user: i64,
    items: &[(i64, i32)],
    key: &str,
) -> Option<i64> {
    let answer = settle(seen, "PlaceOrder", || {
        let mut client = app.orders();
        let message = PlaceOrderRequest {
            user_id: user,
            items: lines(items),
            user_coupon_id: 0,
            idempotency_key: key.into(),
        };
        async move { client.place_order(request(message)).await }
    })
    .await;
    let order_id = answer.ok()?.into_inner().order?.id;
    ack(
        seen,
        Acked::Order {
            user,
            key: key.into(),
            items: items.to_vec(),
            order_id,
            via_cart: false,
        },
    );
    Some(order_id)
}

async fn pay(app: &TestApp, seen: &Shared, user: i64, order_id: i64, key: &str) {
    let answer = settle(seen, "Pay", || {
        let mut client = app.payments();
        let message = PayRequest {
            order_id,
            user_id: user,
            idempotency_key: key.into(),
        };
        async move { client.pay(request(message)).await }
    })
    .await;
    if let Some(payment) = answer.ok().and_then(|r| r.into_inner().payment) {
        ack(
            seen,
            Acked::Payment {
                user,
                key: key.into(),
                order_id,
                payment_id: payment.id,
            },
        );
    }
}

async fn issue(app: &TestApp, seen: &Shared, user: i64, coupon: i64) {
    let answer = settle(seen, "IssueCoupon", || {
        let mut client = app.coupons();
        let message = IssueCouponRequest {
            user_id: user,
            coupon_id: coupon,
        };
        async move { client.issue_coupon(request(message)).await }
    })
    .await;
    if let Some(user_coupon) = answer.ok().and_then(|r| r.into_inner().user_coupon) {
        ack(
            seen,
            Acked::Coupon {
                user,
                coupon,
                user_coupon_id: user_coupon.id,
            },
        );
    }
}

async fn checkout(app: &TestApp, seen: &Shared, user: i64, items: &[(i64, i32)], key: &str) {
    // The cart is set line by line (a retried SetItem sets the same quantity again), then
    // checked out with a key.
    for &(product_id, quantity) in items {
        let set = settle(seen, "SetItem", || {
            let mut client = app.carts();
            let message = SetItemRequest {
                user_id: user,
                product_id,
                quantity,
            };
            async move { client.set_item(request(message)).await }
        })
        .await;
        if set.is_err() {
            return;
        }
    }
    let answer = settle(seen, "Checkout", || {
        let mut client = app.carts();
        let message = CheckoutRequest {
            user_id: user,
            user_coupon_id: 0,
            idempotency_key: key.into(),
        };
        async move { client.checkout(request(message)).await }
    })
    .await;
    if let Some(order) = answer.ok().and_then(|r| r.into_inner().order) {
        ack(
            seen,
            Acked::Order {
                user,
                key: key.into(),
                items: items.to_vec(),
                order_id: order.id,
                via_cart: true,
            },
        );
    }
}

/// Sends every acknowledged write again, same key and request: each must answer what it
/// answered the first time. Returns the ones that did not.
pub async fn replay(app: &TestApp, acked: &[Acked]) -> Vec<String> {
    let seen: Shared = Arc::default();
    let mut wrong = Vec::new();
    for write in acked {
        let same = match write {
            Acked::Charge {
                user,
                key,
                amount,
                history_id,
            } => {
                let reply = settle(&seen, "ChargeBalance", || {
                    let mut client = app.balance();
                    let message = ChargeBalanceRequest {
                        user_id: *user,
                        amount: *amount,
                        idempotency_key: key.clone(),
                    };
                    async move { client.charge_balance(request(message)).await }
                })
                .await;
                reply.map(|r| r.into_inner().history_id == *history_id)
            }
            Acked::Order {
                user,
                key,
                items,
                order_id,
                via_cart: false,
            } => {
                let reply = settle(&seen, "PlaceOrder", || {
                    let mut client = app.orders();
                    let message = PlaceOrderRequest {
                        user_id: *user,
                        items: lines(items),
                        user_coupon_id: 0,
                        idempotency_key: key.clone(),
                    };
                    async move { client.place_order(request(message)).await }
                })
                .await;
                reply.map(|r| r.into_inner().order.map(|o| o.id) == Some(*order_id))
            }
            Acked::Order {
                user,
                key,
                order_id,
                via_cart: true,
                ..
            } => {
                let reply = settle(&seen, "Checkout", || {
                    let mut client = app.carts();
                    let message = CheckoutRequest {
                        user_id: *user,
                        user_coupon_id: 0,
                        idempotency_key: key.clone(),
                    };
                    async move { client.checkout(request(message)).await }
                })
                .await;
                reply.map(|r| r.into_inner().order.map(|o| o.id) == Some(*order_id))
            }
            Acked::Payment {
                user,
                key,
                order_id,
                payment_id,
            } => {
                let reply = settle(&seen, "Pay", || {
                    let mut client = app.payments();
                    let message = PayRequest {
                        order_id: *order_id,
                        user_id: *user,
                        idempotency_key: key.clone(),
                    };
                    async move { client.pay(request(message)).await }
                })
                .await;
                reply.map(|r| r.into_inner().payment.map(|p| p.id) == Some(*payment_id))
            }
            Acked::Coupon {
                user,
                coupon,
                user_coupon_id,
            } => {
                let reply = settle(&seen, "IssueCoupon", || {
                    let mut client = app.coupons();
                    let message = IssueCouponRequest {
                        user_id: *user,
                        coupon_id: *coupon,
                    };
                    async move { client.issue_coupon(request(message)).await }
                })
                .await;
                // A user holds a coupon once: the replay names the one they hold.
                match reply {
                    Err(status) if status.code() == Code::AlreadyExists => Ok(status
                        .get_details_error_info()
                        .and_then(|i| i.metadata.get("user_coupon_id").cloned())
                        == Some(user_coupon_id.to_string())),
                    other => other.map(|_| false),
                }
            }
        };
        if !matches!(same, Ok(true)) {
            wrong.push(format!("{write:?} replayed as {same:?}"));
        }
    }
    wrong
}
