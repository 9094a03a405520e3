//! The server binary, run as the Kubernetes manifests run it: every setting of
//! `deploy/k8s/configmap.yaml` (JSON logs, the per-user rate limit, connection ages, group
//! commit, ...), with the test's own database, Redis key prefix and loopback ports. A process of
//! its own also has its own metrics recorder and tracing set-up, which the test then owns.

use std::{net::SocketAddr, path::PathBuf, process::Stdio, time::Duration};

use sqlx::postgres::PgConnectOptions;
use tokio::process::Child;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::{
    ADMIN_TOKEN, database_url, delete_keys_of, eventually,
    private::{free_port, temp_dir},
    redis_url,
};

const CONFIGMAP: &str = include_str!("../../../deploy/k8s/configmap.yaml");

pub struct ServerProcess {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub channel: Channel,
    log: PathBuf,
    prefix: String,
    child: Child,
}

impl ServerProcess {
    /// Starts the binary with the ConfigMap's settings, then `overrides`, and waits until it is
    /// SERVING. Its stdout and stderr go to a log file ([`Self::log`]).
    pub async fn start(db: &PgConnectOptions, overrides: &[(&str, String)]) -> Self {
        let configmap: serde_yaml::Value = serde_yaml::from_str(CONFIGMAP).expect("valid YAML");
        let settings = configmap["data"]
            .as_mapping()
            .expect("the ConfigMap's data");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let prefix = format!("binary-{}:", uuid::Uuid::new_v4().simple());
        let log = temp_dir("binary").join("server.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ecommerce"));
        command.env_clear();
        for (key, value) in settings {
            command.env(key.as_str().unwrap(), value.as_str().unwrap());
        }
        command
            // The Secret's part.
            .env("DATABASE_URL", database_url(db))
            .env("REDIS_URL", redis_url())
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            // This machine's part: loopback ports, a key prefix of its own, a share of the
            // Postgres every test uses, no drain for a test's stop.
            .env("LISTEN_ADDR", addr.to_string())
            .env("METRICS_ADDR", metrics_addr.to_string())
            .env("REDIS_KEY_PREFIX", &prefix)
            .env("DATABASE_MAX_CONNECTIONS", "5")
            .env("SHUTDOWN_DRAIN_MS", "0");
        for (key, value) in overrides {
            command.env(key, value);
        }
        let child = command
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the server binary starts");
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let serving = eventually(Duration::from_secs(60), || async {
            HealthClient::new(channel.clone())
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
        })
        .await;
        let server = Self {
            addr,
            metrics_addr,
            channel,
            log,
            prefix,
            child,
        };
        assert!(serving, "the server did not serve:\n{}", server.log());
        server
    }

    /// Everything the server wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics_addr))
            .await
            .expect("metrics endpoint answers")
            .text()
            .await
            .unwrap()
    }

    /// SIGTERM, then waits for a clean exit (its calls drained) and deletes its Redis keys.
    pub async fn stop(mut self) -> String {
        let pid = self.child.id().expect("running").to_string();
        let signalled = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(signalled.success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the server exits after SIGTERM")
            .unwrap();
        let log = self.log();
        assert!(status.success(), "exit status {status:?}:\n{log}");
        delete_keys_of(&self.prefix).await;
        let _ = std::fs::remove_dir_all(self.log.parent().unwrap());
        log
    }
}
