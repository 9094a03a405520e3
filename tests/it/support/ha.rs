//! A highly available Postgres (three nodes under Patroni behind HAProxy) and Redis (a primary,
//! a replica and three Sentinels), started by `scripts/ha` in a folder and on ports of the
//! test's own, so the failover tests run exactly what an operator runs. Dropping the handle
//! stops everything (`scripts/ha down`), also when the test fails.
//!
//! Only one such cluster runs at a time ([`HaCluster::up`] waits for the previous one to be
//! dropped): each takes a good part of the two cores, and Patroni's timings must see the load
//! of a test, not of two.

use std::{
    collections::HashMap,
    path::PathBuf,
    process::Command,
    str::FromStr,
    sync::{Mutex, MutexGuard, PoisonError},
};

use sqlx::postgres::PgConnectOptions;

use super::private::temp_dir;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub struct HaCluster {
    dir: PathBuf,
    pub env: HashMap<String, String>,
    _turn: MutexGuard<'static, ()>,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/ha")
}

impl HaCluster {
    /// Starts a cluster; `synchronous: false` is the control set-up (asynchronous replication).
    pub async fn up(synchronous: bool) -> Self {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
        let dir = temp_dir("ha");
        // scripts/ha creates it (and hands it to the postgres user).
        std::fs::remove_dir_all(&dir).expect("empty temp dir");
        // Below the kernel's ephemeral ports, where outgoing connections would take them.
        let from = 20_000 + 16 * (rand_block() % 700);
        let mut cluster = Self {
            dir,
            env: HashMap::new(),
            _turn: turn,
        };
        let out = cluster.run_with(
            &["up"],
            &[
                ("HA_PORT_FROM", from.to_string()),
                ("HA_SYNC", if synchronous { "on" } else { "off" }.into()),
            ],
        );
        cluster.env = out
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        cluster
    }

    fn run_with(&self, args: &[&str], vars: &[(&str, String)]) -> String {
        let mut command = Command::new(script());
        command.args(args).env("HA_DIR", &self.dir);
        for (k, v) in vars {
            command.env(k, v);
        }
        let out = command.output().expect("scripts/ha runs");
        assert!(
            out.status.success(),
            "scripts/ha {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs `scripts/ha ARGS` on this cluster and returns what it printed.
    pub async fn run(&self, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(script())
                .args(&args)
                .env("HA_DIR", &dir)
                .output()
                .expect("scripts/ha runs");
            assert!(
                out.status.success(),
                "scripts/ha {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
        .await
        .expect("scripts/ha task")
    }

    pub fn var(&self, name: &str) -> &str {
        self.env
            .get(name)
            .unwrap_or_else(|| panic!("scripts/ha printed no {name}"))
    }

    /// The service's database, through HAProxy's primary port.
    pub fn primary(&self) -> PgConnectOptions {
        PgConnectOptions::from_str(self.var("DATABASE_URL")).expect("a Postgres URL")
    }

    /// One node, directly (`node1`, `node2`, `node3`).
    pub fn node(&self, name: &str) -> PgConnectOptions {
        let index: usize = name
            .trim_start_matches("node")
            .parse::<usize>()
            .expect("nodeN")
            - 1;
        let port: u16 = self
            .var("HA_PG_PORTS")
            .split(' ')
            .nth(index)
            .unwrap()
            .parse()
            .unwrap();
        self.primary().port(port)
    }

    pub fn redis_url(&self) -> &str {
        self.var("REDIS_URL")
    }

    pub async fn leader(&self) -> Option<String> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(script())
                .arg("leader")
                .env("HA_DIR", &dir)
                .output()
                .ok()?;
            let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (out.status.success() && !name.is_empty()).then_some(name)
        })
        .await
        .expect("scripts/ha task")
    }

    /// The timeline `scripts/ha status` shows for a member: a former leader that rejoined the
    /// cluster's new history is on the new timeline, one that kept its own is not.
    pub async fn timeline(&self, node: &str) -> Option<u64> {
        let status = self.run(&["status"]).await;
        let line = status
            .lines()
            .find(|l| l.split_whitespace().next() == Some(node))?;
        let mut words = line.split_whitespace();
        words.find(|w| *w == "timeline")?;
        words.next()?.parse().ok()
    }

    /// Waits until the cluster has a leader, a synchronous standby (in synchronous mode) and
    /// a third member running: a leader lost before it named its synchronous standby leaves no
    /// member Patroni may promote, by design (it cannot know which one has every commit).
    pub async fn wait_whole(&self) {
        self.run(&["wait-whole", "120"]).await;
    }
}

fn rand_block() -> u32 {
    uuid::Uuid::new_v4().as_u128() as u32
}

impl Drop for HaCluster {
    fn drop(&mut self) {
        let mut down = Command::new(script());
        down.arg("down").env("HA_DIR", &self.dir);
        if std::thread::panicking() {
            let logs = std::env::temp_dir().join("ecommerce-ha-failed-logs");
            eprintln!("the cluster's logs are in {}", logs.display());
            down.env("HA_KEEP_LOGS", logs);
        }
        let _ = down.output();
    }
}
