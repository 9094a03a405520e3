//! Private Redis, Postgres and NATS servers on free loopback ports, each in its own temporary
//! folder, for tests that kill and restart a dependency. The shared servers are never touched.
//!
//! All come from the distribution's packages (`redis-server`, `/usr/lib/postgresql/*/bin`,
//! `nats-server`), which `scripts/test` makes sure are installed.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use sqlx::postgres::PgConnectOptions;
use tokio::process::Child;

use super::proxy::TcpProxy;

/// A loopback port free a moment ago (a server the test starts binds it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("bound")
        .port()
}

pub fn temp_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ecommerce-{kind}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

async fn wait_for_port(addr: SocketAddr, up: bool) {
    for _ in 0..200 {
        let answered = tokio::net::TcpStream::connect(addr).await.is_ok();
        if answered == up {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr} did not come {}", if up { "up" } else { "down" });
}

/// A server child process on a loopback port of its own, which keeps the port across restarts.
struct Process {
    addr: SocketAddr,
    child: Option<Child>,
}

impl Process {
    fn on_free_port() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            child: None,
        }
    }

    /// SIGKILL: no goodbye to the clients.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        wait_for_port(self.addr, false).await;
    }

    /// Kills the running server, if any, and starts `command` in its place.
    async fn restart(&mut self, command: &mut tokio::process::Command) {
        self.kill().await;
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the server is installed");
        self.child = Some(child);
        wait_for_port(self.addr, true).await;
    }
}

/// A `redis-server` child process without persistence: a restart starts empty, like the
/// production Redis of this project.
pub struct PrivateRedis {
    process: Process,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let mut redis = Self {
            process: Process::on_free_port(),
        };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.process.addr)
    }

    /// SIGKILL: no goodbye to the clients, and every key is gone.
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }

    /// Starts (again) on the same port, empty.
    pub async fn restart(&mut self) {
        let port = self.process.addr.port().to_string();
        self.process
            .restart(
                tokio::process::Command::new("redis-server")
                    .args(["--bind", "127.0.0.1", "--port", &port])
                    .args(["--save", "", "--appendonly", "no", "--daemonize", "no"]),
            )
            .await;
    }
}

/// A Redis primary, a replica that replicates through a [`TcpProxy`] the test can hold (the
/// replica falls behind, as over a slow link), and three Sentinels watching them, all child
/// processes without persistence. The service reaches it by its Sentinel URL.
pub struct PrivateRedisSentinel {
    primary: Process,
    pub replica_addr: SocketAddr,
    _replica: Process,
    /// The replication link.
    pub link: TcpProxy,
    sentinels: Vec<Process>,
    dir: PathBuf,
}

async fn redis_info(addr: SocketAddr, section: &str) -> String {
    let out = tokio::process::Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &addr.port().to_string(),
            "info",
            section,
        ])
        .output()
        .await
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl PrivateRedisSentinel {
    pub async fn start() -> Self {
        let dir = temp_dir("redis-sentinel");
        let mut primary = Process::on_free_port();
        let port = primary.addr.port().to_string();
        primary
            .restart(
                tokio::process::Command::new("redis-server")
                    .args(["--bind", "127.0.0.1", "--port", &port])
                    .args(["--save", "", "--appendonly", "no"])
                    .arg("--dir")
                    .arg(&dir),
            )
            .await;
        let link = TcpProxy::start(primary.addr).await;
        let mut replica = Process::on_free_port();
        let replica_port = replica.addr.port().to_string();
        replica
            .restart(
                tokio::process::Command::new("redis-server")
                    .args(["--bind", "127.0.0.1", "--port", &replica_port])
                    .args(["--save", "", "--appendonly", "no"])
                    // A full sync writes the primary's snapshot to disk even without
                    // persistence: into the test's directory, not the checkout.
                    .arg("--dir")
                    .arg(&dir)
                    .args(["--replicaof", "127.0.0.1", &link.addr.port().to_string()]),
            )
            .await;
        for _ in 0..100 {
            if redis_info(replica.addr, "replication")
                .await
                .contains("master_link_status:up")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let mut sentinel = Process::on_free_port();
            let conf = dir.join(format!("sentinel-{}.conf", sentinel.addr.port()));
            // The replica points at the link, not at the primary: a Sentinel "fixes" such a
            // replica only after failover-timeout, longer than the test.
            std::fs::write(
                &conf,
                format!(
                    "port {}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor shop 127.0.0.1 {port} 2\n\
                     sentinel down-after-milliseconds shop 1000\n\
                     sentinel failover-timeout shop 120000\n",
                    sentinel.addr.port(),
                    dir.display()
                ),
            )
            .expect("sentinel config");
            sentinel
                .restart(
                    tokio::process::Command::new("redis-server")
                        .arg(&conf)
                        .arg("--sentinel"),
                )
                .await;
            sentinels.push(sentinel);
        }
        for _ in 0..100 {
            let out = tokio::process::Command::new("redis-cli")
                .args(["-p", &sentinels[0].addr.port().to_string()])
                .args(["sentinel", "replicas", "shop"])
                .output()
                .await
                .expect("redis-cli runs");
            if String::from_utf8_lossy(&out.stdout).contains(&replica_port) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            primary,
            replica_addr: replica.addr,
            _replica: replica,
            link,
            sentinels,
            dir,
        }
    }

    /// The service's `REDIS_URL`: the Sentinels, and the name of the primary they watch.
    pub fn url(&self) -> String {
        let mut url = format!(
            "redis-sentinel://{}?sentinelServiceName=shop",
            self.sentinels[0].addr
        );
        for sentinel in &self.sentinels[1..] {
            url.push_str(&format!("&node={}", sentinel.addr));
        }
        url
    }

    /// SIGKILL to the primary: everything the replica had not received is gone.
    pub async fn kill_primary(&mut self) {
        self.primary.kill().await;
    }

    /// Whether the replica has been promoted.
    pub async fn replica_promoted(&self) -> bool {
        redis_info(self.replica_addr, "replication")
            .await
            .contains("role:master")
    }
}

impl Drop for PrivateRedisSentinel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `nats-server` child process with JetStream, its store in a folder of its own that a
/// restart keeps (file storage survives, as on a real server).
pub struct PrivateNats {
    process: Process,
    store: PathBuf,
}

impl PrivateNats {
    pub async fn start() -> Self {
        let mut nats = Self {
            process: Process::on_free_port(),
            store: temp_dir("nats"),
        };
        nats.restart().await;
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://{}", self.process.addr)
    }

    /// SIGKILL: the clients lose their connection and the publishes not yet acknowledged.
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }

    /// Starts (again) on the same port and store.
    pub async fn restart(&mut self) {
        let program = if Path::new("/usr/sbin/nats-server").exists() {
            "/usr/sbin/nats-server"
        } else {
            "nats-server"
        };
        let port = self.process.addr.port().to_string();
        self.process
            .restart(
                tokio::process::Command::new(program)
                    .args(["-js", "-a", "127.0.0.1", "-p", &port, "-sd"])
                    .arg(&self.store),
            )
            .await;
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        if let Some(child) = self.process.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// A throwaway Postgres cluster (`initdb` + `pg_ctl`), trust authentication, fsync off.
/// As root, the cluster runs as the `postgres` user (Postgres refuses to run as root).
pub struct PrivatePostgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("Postgres is installed under /usr/lib/postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn as_cluster_owner(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl PrivatePostgres {
    pub async fn start() -> Self {
        let dir = temp_dir("postgres");
        let bin = postgres_bin();
        if is_root() {
            let chown = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(chown.success());
        }
        let data = dir.join("data");
        let status = as_cluster_owner(&bin.join("initdb"))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("initdb runs");
        assert!(status.success(), "initdb failed");
        let postgres = Self {
            port: free_port(),
            dir,
            bin,
        };
        postgres.pg_ctl(&["start", "-w"]).await;
        postgres
    }

    pub fn options(&self) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username("postgres")
            .database("postgres")
    }

    async fn pg_ctl(&self, args: &[&str]) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=60",
            self.port,
            self.dir.display()
        );
        let mut command = as_cluster_owner(&self.bin.join("pg_ctl"));
        command
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-o", &options, "-l"])
            .arg(self.dir.join("log"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let status = tokio::task::spawn_blocking(move || command.status())
            .await
            .expect("pg_ctl task")
            .expect("pg_ctl runs");
        if !status.success() {
            let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            panic!("pg_ctl {args:?} failed; the server log ends with {tail:#?}");
        }
    }

    /// An immediate shutdown: connections are cut, transactions in flight are lost, as in a
    /// crash; the restart recovers from the WAL.
    pub async fn crash(&self) {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"]).await;
    }

    /// SIGKILL to the postmaster and every process it started: no shutdown at all, as when the
    /// machine's OOM killer strikes; the restart recovers from the WAL.
    pub async fn sigkill(&self) {
        let pid_file = self.dir.join("data").join("postmaster.pid");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .expect("postmaster.pid")
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("a postmaster pid");
        // Stopped first, so that it forks no backend between the listing and the kill.
        // SAFETY: kill has no memory-safety preconditions; the pids are this cluster's.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let children = children_of(pid);
        // SAFETY: as above.
        unsafe {
            for child in &children {
                libc::kill(*child, libc::SIGKILL);
            }
            libc::kill(pid, libc::SIGKILL);
        }
        for _ in 0..200 {
            let alive = std::iter::once(pid)
                .chain(children.iter().copied())
                .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists() && !is_zombie(p));
            if !alive {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A killed postmaster may stay a zombie (nobody reaps it in a container), and
        // Postgres takes a live pid in its lock files for a running server: remove them, as
        // an operator would once the process is known dead.
        let _ = std::fs::remove_file(pid_file);
        for file in [
            format!(".s.PGSQL.{}.lock", self.port),
            format!(".s.PGSQL.{}", self.port),
        ] {
            let _ = std::fs::remove_file(self.dir.join(file));
        }
    }

    pub async fn start_again(&self) {
        self.pg_ctl(&["start", "-w"]).await;
    }

    /// A streaming standby of this cluster (`pg_basebackup -R`), started on a port of its own.
    pub async fn standby(&self) -> PrivatePostgres {
        let dir = temp_dir("postgres-standby");
        if is_root() {
            let chown = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(chown.success());
        }
        let mut command = as_cluster_owner(&self.bin.join("pg_basebackup"));
        command
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-X", "stream", "-R", "--no-sync", "-D"])
            .arg(dir.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let status = tokio::task::spawn_blocking(move || command.status())
            .await
            .expect("pg_basebackup task")
            .expect("pg_basebackup runs");
        assert!(status.success(), "pg_basebackup failed");
        let standby = PrivatePostgres {
            port: free_port(),
            dir,
            bin: self.bin.clone(),
        };
        standby.pg_ctl(&["start", "-w"]).await;
        standby
    }

    /// Promotes a standby: it takes writes from then on.
    pub async fn promote(&self) {
        self.pg_ctl(&["promote", "-w"]).await;
    }
}

/// The processes whose parent is `pid`, from /proc.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| parent_of(p) == Some(pid))
        .collect()
}

/// Fields of /proc/<pid>/stat after the command (which may hold spaces), from the state on.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split(' ').map(str::to_owned).collect())
}

fn parent_of(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

fn is_zombie(pid: i32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s == "Z"))
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = as_cluster_owner(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-m", "immediate"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
