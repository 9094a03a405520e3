//! What operators rely on: metrics, service authentication, TLS and mTLS, overload protection,
//! deadlines and a graceful shutdown under load.

use std::{path::PathBuf, process::Stdio, time::Duration};

use ecommerce::proto::{
    ChargeBalanceRequest, GetBalanceRequest, balance_service_client::BalanceServiceClient,
};
use futures::future::join_all;
use sqlx::{
    Connection, PgConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::time::Instant;
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{
    ADMIN_TOKEN, BearerToken, TestApp, assert_error, coupons, database_url, eventually,
    metrics::{metrics_text, series_value},
    private, redis_url,
    shop::{self, charge, create_product, lock_product, place},
    spawn_app, spawn_app_with,
};

#[sqlx::test(migrations = false)]
async fn metrics_count_calls_by_method_and_code(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    for _ in 0..3 {
        app.balance()
            .get_balance(GetBalanceRequest { user_id: 1 })
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let _ = app
            .balance()
            .charge_balance(ChargeBalanceRequest {
                user_id: 1,
                amount: -1,
                idempotency_key: String::new(),
            })
            .await;
    }
    let coupon = coupons::create_coupon(&app, 1).await;
    coupons::issue(&app, coupon, 1).await.unwrap();
    let _ = coupons::issue(&app, coupon, 2).await;

    // Other tests in this process share the recorder: counts are at least ours.
    let ok = r#"grpc_server_handled_total{grpc_service="ecommerce.v1.BalanceService",grpc_method="GetBalance",grpc_code="OK"}"#;
    let invalid = r#"grpc_server_handled_total{grpc_service="ecommerce.v1.BalanceService",grpc_method="ChargeBalance",grpc_code="INVALID_ARGUMENT"}"#;
    let counted = eventually(Duration::from_secs(5), || async {
        let text = metrics_text(&app).await;
        series_value(&text, ok).is_some_and(|v| v >= 3.0)
            && series_value(&text, invalid).is_some_and(|v| v >= 2.0)
    })
    .await;
    let text = metrics_text(&app).await;
    assert!(counted, "{text}");
    for series in [
        r#"grpc_server_handling_seconds_bucket{grpc_service="ecommerce.v1.BalanceService",grpc_method="GetBalance",le="0.01"}"#,
        r#"grpc_server_handling_seconds_count{grpc_service="ecommerce.v1.BalanceService",grpc_method="GetBalance"}"#,
        r#"ecommerce_coupon_issue_total{outcome="ok"}"#,
        r#"ecommerce_coupon_issue_total{outcome="COUPON_SOLD_OUT"}"#,
        r#"ecommerce_db_pool_connections{state="idle"}"#,
        r#"ecommerce_dependency_up{dependency="redis"}"#,
        r#"ecommerce_dependency_ping_seconds_count{dependency="postgres"}"#,
    ] {
        assert!(
            series_value(&text, series).is_some(),
            "{series} missing from\n{text}"
        );
    }
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn the_service_token_guards_everything_but_probes(_: PgPoolOptions, db: PgConnectOptions) {
    let token = "service-token-0123456789";
    let app = spawn_app_with(db, |s| {
        s.set("SERVICE_TOKEN", token);
    })
    .await;
    let with = |t: Option<&str>| {
        BalanceServiceClient::with_interceptor(
            app.channel.clone(),
            BearerToken::new(t.map(|t| format!("Bearer {t}"))),
        )
    };
    for presented in [None, Some("wrong-token-0123456789"), Some(ADMIN_TOKEN)] {
        let refused = with(presented)
            .get_balance(GetBalanceRequest { user_id: 1 })
            .await;
        assert_error(refused, Code::Unauthenticated, "UNAUTHENTICATED");
    }
    with(Some(token))
        .get_balance(GetBalanceRequest { user_id: 1 })
        .await
        .expect("the service token opens the service");

    // Probes and reflection need no token; admin calls need the admin token.
    let health = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok());
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let listing = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(app.channel.clone())
        .server_reflection_info(futures::stream::iter([listing]))
        .await
        .expect("reflection without a token")
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    create_product(&app, "admin still works", 1, 1).await;
    app.stop().await;
}

/// A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, as PEM files.
struct Pki {
    dir: PathBuf,
    ca: String,
    client: Identity,
}

impl Pki {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("ecommerce-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();
        let client_key = KeyPair::generate().unwrap();
        let client = CertificateParams::new(vec!["checkout-service".into()])
            .unwrap()
            .signed_by(&client_key, &ca)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
        std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
        Self {
            dir,
            ca: ca.pem(),
            client: Identity::from_pem(client.pem(), client_key.serialize_pem()),
        }
    }

    fn serve(&self, s: &mut crate::support::TestSettings, mutual: bool) {
        s.set("TLS_CERT_PATH", self.dir.join("server.pem").display())
            .set("TLS_KEY_PATH", self.dir.join("server.key").display());
        if mutual {
            s.set("TLS_CLIENT_CA_PATH", self.dir.join("ca.pem").display());
        }
    }

    async fn channel(&self, app: &TestApp, identity: Option<Identity>) -> Result<Channel, String> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .domain_name("localhost");
        if let Some(identity) = identity {
            tls = tls.identity(identity);
        }
        Channel::from_shared(format!("https://{}", app.addr))
            .unwrap()
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| e.to_string())
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn balance_over(channel: Channel) -> Result<i64, tonic::Status> {
    BalanceServiceClient::new(channel)
        .get_balance(GetBalanceRequest { user_id: 1 })
        .await
        .map(|r| r.into_inner().balance)
}

#[sqlx::test(migrations = false)]
async fn tls_serves_tls_clients_and_refuses_plaintext(_: PgPoolOptions, db: PgConnectOptions) {
    let pki = Pki::new();
    let app = spawn_app_with(db, |s| pki.serve(s, false)).await;
    let channel = pki.channel(&app, None).await.expect("TLS handshake");
    assert_eq!(balance_over(channel).await.unwrap(), 0);

    // The harness's plaintext channel fails cleanly, quickly.
    let started = Instant::now();
    let plaintext =
        tokio::time::timeout(Duration::from_secs(10), balance_over(app.channel.clone()))
            .await
            .expect("no hang");
    assert!(plaintext.is_err());
    assert!(started.elapsed() < Duration::from_secs(10));
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn mtls_accepts_known_clients_only(_: PgPoolOptions, db: PgConnectOptions) {
    let pki = Pki::new();
    let app = spawn_app_with(db, |s| pki.serve(s, true)).await;
    let trusted = pki
        .channel(&app, Some(pki.client.clone()))
        .await
        .expect("a client certificate from the CA is accepted");
    assert_eq!(balance_over(trusted).await.unwrap(), 0);

    // Without a client certificate the handshake (or the first call) fails.
    let refused = match pki.channel(&app, None).await {
        Err(_) => true,
        Ok(channel) => balance_over(channel).await.is_err(),
    };
    assert!(refused, "a client without a certificate must be refused");
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn oversized_requests_are_refused(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db, |s| {
        s.set("MAX_MESSAGE_BYTES", 64 * 1024);
    })
    .await;
    let mut client = app.balance().max_encoding_message_size(64 << 20);
    let huge = ChargeBalanceRequest {
        user_id: 1,
        amount: 1,
        idempotency_key: "k".repeat(16 << 20),
    };
    let started = Instant::now();
    let refused = client.charge_balance(huge).await;
    assert_error(refused, Code::ResourceExhausted, "MESSAGE_TOO_LARGE");
    assert!(started.elapsed() < Duration::from_secs(5));
    // A request just under the limit is read normally (and refused for its content).
    let status = client
        .charge_balance(ChargeBalanceRequest {
            user_id: 1,
            amount: 1,
            idempotency_key: "k".repeat(60_000),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    app.stop().await;
}

/// A unary call carrying `grpc-timeout: timeout` and waiting for the server's answer however
/// late, over HTTP/2 directly: tonic's client times a call out by that header itself (its
/// Channel enforces it), and on a loaded machine its timer can fire before the server's answer
/// arrives; these tests are about the server's deadline.
async fn call_with_grpc_timeout(
    app: &TestApp,
    path: &str,
    message: impl prost::Message,
    timeout: &str,
) -> Result<(), tonic::Status> {
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!("http://{}{path}", app.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    let message = message.encode_to_vec();
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    body.send_data(frame.into(), true).unwrap();
    let response = response.await.expect("an answer");
    // A refusal is trailers-only: the status is in the headers; an answer, in the trailers.
    let status = match tonic::Status::from_header_map(response.headers()) {
        Some(status) => status,
        None => {
            let mut body = response.into_body();
            while body.data().await.is_some() {}
            let trailers = body.trailers().await.unwrap().expect("trailers");
            tonic::Status::from_header_map(&trailers).expect("a grpc-status")
        }
    };
    driver.abort();
    if status.code() == Code::Ok {
        Ok(())
    } else {
        Err(status)
    }
}

#[sqlx::test(migrations = false)]
async fn a_caller_deadline_is_honoured(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db.clone()).await;
    let product = create_product(&app, "slow", 1_000, 10).await;
    charge(&app, 1, 10_000).await;
    let lock = lock_product(&db, product).await;

    let request = ecommerce::proto::PlaceOrderRequest {
        user_id: 1,
        items: shop::lines(&[(product, 1)]),
        ..Default::default()
    };
    let started = Instant::now();
    let result = call_with_grpc_timeout(
        &app,
        "/ecommerce.v1.OrderService/PlaceOrder",
        request,
        "50m",
    )
    .await;
    assert_error(result, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
    // The row lock is held for good: without the deadline the call would wait until the end.
    assert!(started.elapsed() < Duration::from_secs(5));

    drop(lock);
    // The abandoned order rolled back.
    assert!(
        eventually(Duration::from_secs(5), || async {
            shop::stock(&app, product).await == 10
        })
        .await
    );
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(orders, 0);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn past_the_concurrency_limit_calls_are_shed(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app_with(db.clone(), |s| {
        s.set("MAX_CONCURRENT_REQUESTS", 4);
    })
    .await;
    let product = create_product(&app, "hot", 0, 1_000).await;
    let lock = lock_product(&db, product).await;

    let one = [(product, 1)];
    let slow = join_all((1..=4).map(|user| place(&app, user, &one)));
    let meanwhile = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let shed = join_all((100..150).map(|user| place(&app, user, &one))).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "refusals are immediate"
        );
        for result in shed {
            assert_error(result, Code::ResourceExhausted, "OVERLOADED");
        }
        // Probes still answer while the server is saturated.
        let health = HealthClient::new(app.channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        assert_eq!(health.into_inner().status(), ServingStatus::Serving);
        drop(lock);
    };
    let (admitted, ()) = tokio::join!(slow, meanwhile);
    assert!(admitted.iter().all(Result::is_ok), "{admitted:?}");
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn sigterm_drains_calls_in_flight_and_exits_zero(_: PgPoolOptions, db: PgConnectOptions) {
    let port = private::free_port();
    let prefix = format!("sigterm-{}:", uuid::Uuid::new_v4().simple());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ecommerce"))
        .env_clear()
        .env("DATABASE_URL", database_url(&db))
        .env("REDIS_URL", redis_url())
        .env("REDIS_KEY_PREFIX", &prefix)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SHUTDOWN_DRAIN_MS", "500")
        .env("DATABASE_MAX_CONNECTIONS", "5")
        .env("DATABASE_ACQUIRE_TIMEOUT_MS", "30000")
        .env("HEALTH_CHECK_INTERVAL_MS", "200")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the server binary starts");

    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_lazy();
    let serving = eventually(Duration::from_secs(30), || async {
        HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
    })
    .await;
    assert!(serving, "the server came up");

    let mut admin = ecommerce::proto::admin_service_client::AdminServiceClient::with_interceptor(
        channel.clone(),
        BearerToken::new(Some(format!("Bearer {ADMIN_TOKEN}"))),
    );
    let product = admin
        .create_product(ecommerce::proto::CreateProductRequest {
            name: "drain test".into(),
            price: 0,
            stock: 1_000,
            status: ecommerce::proto::ProductStatus::Selling.into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .product
        .unwrap()
        .id;
    let lock = lock_product(&db, product).await;

    let in_flight: Vec<_> = (1..=200)
        .map(|user| {
            let mut orders =
                ecommerce::proto::order_service_client::OrderServiceClient::new(channel.clone());
            tokio::spawn(async move {
                orders
                    .place_order(ecommerce::proto::PlaceOrderRequest {
                        user_id: user,
                        items: shop::lines(&[(product, 1)]),
                        ..Default::default()
                    })
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let pid = child.id().expect("running").to_string();
    let signalled = Instant::now();
    let kill = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(kill.success());
    let health = |service: &'static str| {
        let mut client = HealthClient::new(channel.clone());
        async move {
            let request = HealthCheckRequest {
                service: service.into(),
            };
            client
                .check(request)
                .await
                .ok()
                .map(|r| r.into_inner().status())
        }
    };
    // Readiness goes NOT_SERVING at once; liveness stays SERVING: the process is draining, not
    // dead.
    let draining = eventually(Duration::from_secs(2), || async {
        let (ready, alive) = tokio::join!(health(""), health("liveness"));
        (ready, alive)
            == (
                Some(ServingStatus::NotServing),
                Some(ServingStatus::Serving),
            )
    })
    .await;
    assert!(
        draining,
        "readiness goes NOT_SERVING at once, liveness stays"
    );

    // After the drain period the listener is closed: a new client is refused.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let fresh = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await;
    assert!(
        fresh.is_err(),
        "new connections are refused after the drain"
    );

    drop(lock);
    for call in in_flight {
        let result = call.await.unwrap();
        assert!(result.is_ok(), "a call in flight was cut: {result:?}");
    }
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the process exits")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(10));
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&mut PgConnection::connect_with(&db).await.unwrap())
        .await
        .unwrap();
    assert_eq!(orders, 200);
    crate::support::delete_keys_of(&prefix).await;
}
