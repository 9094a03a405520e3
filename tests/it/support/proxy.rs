//! A TCP forwarder that a test can cut and restore, to make a dependency "stop answering"
//! without touching the shared Postgres or Redis; hold (nothing more passes, nothing is lost
//! yet: a replication link falling behind); or arm to cut a Postgres connection at its next
//! COMMIT, before the server gets it or after the server answered it.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Mutex,
    task::JoinSet,
};

/// Where an armed proxy cuts a Postgres connection at its next COMMIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitCut {
    /// The COMMIT never reaches the server: the transaction is rolled back.
    Before = 1,
    /// The server gets the COMMIT and commits; its answer never reaches the client.
    After = 2,
}

/// The simple-protocol message sqlx sends to commit a transaction.
const COMMIT: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";

#[derive(Default)]
struct Controls {
    held: AtomicBool,
    /// 0: not armed; else a [`CommitCut`].
    cut: AtomicU8,
    /// Bytes a client must have sent on its connection before its COMMIT is cut there (so a
    /// job's COMMIT on another connection is let through).
    after: std::sync::Mutex<Vec<u8>>,
}

/// The test Redis's address, for a proxy in front of it (a single node: `redis://ip:port`).
pub fn redis_addr() -> SocketAddr {
    let url = super::redis_url();
    let host_port = url.trim_start_matches("redis://").trim_end_matches('/');
    host_port
        .parse()
        .expect("TEST_REDIS_URL is redis://ip:port")
}

pub struct TcpProxy {
    pub addr: SocketAddr,
    target: SocketAddr,
    running: Arc<Mutex<Option<JoinSet<()>>>>,
    accepted: Arc<AtomicUsize>,
    controls: Arc<Controls>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await;
        let addr = listener.local_addr().expect("bound");
        let proxy = Self {
            addr,
            target,
            running: Arc::new(Mutex::new(None)),
            accepted: Arc::default(),
            controls: Arc::default(),
        };
        proxy.serve(listener).await;
        proxy
    }

    /// Closes the listener and every forwarded connection: the dependency looks dead.
    pub async fn cut(&self) {
        if let Some(mut tasks) = self.running.lock().await.take() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }

    /// Stops passing bytes either way on every connection, without closing any: the bytes wait
    /// in the kernel's buffers (and are lost if the proxy is then cut).
    pub fn hold(&self) {
        self.controls.held.store(true, Ordering::SeqCst);
    }

    /// Cuts the next connection that sends a COMMIT, at that COMMIT (once).
    /// Cuts, at its next COMMIT, the connection on which a client sends `marker` (a value
    /// only the call under test sends, such as its idempotency key); once.
    pub fn cut_at_commit_after(&self, marker: &str, cut: CommitCut) {
        *self.controls.after.lock().unwrap() = marker.as_bytes().to_vec();
        self.controls.cut.store(cut as u8, Ordering::SeqCst);
    }

    /// Whether the armed cut has happened.
    pub fn commit_cut_done(&self) -> bool {
        self.controls.cut.load(Ordering::SeqCst) == 0
    }

    /// How many connections clients have opened through the proxy.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Listens again on the same port.
    pub async fn restore(&self) {
        let listener = bind(self.addr).await;
        self.serve(listener).await;
    }

    async fn serve(&self, listener: TcpListener) {
        let mut tasks = JoinSet::new();
        let target = self.target;
        let accepted = self.accepted.clone();
        let controls = self.controls.clone();
        tasks.spawn(async move {
            // Dropping this set (when the accept task is aborted) aborts every forward.
            let mut connections = JoinSet::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                while connections.try_join_next().is_some() {}
                connections.spawn(forward(inbound, target, controls.clone()));
            }
        });
        *self.running.lock().await = Some(tasks);
    }
}

async fn forward(inbound: TcpStream, target: SocketAddr, controls: Arc<Controls>) {
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (mut from_client, mut to_client) = inbound.into_split();
    let (mut from_server, mut to_server) = outbound.into_split();
    // Set once the server got a COMMIT whose answer must not reach the client.
    let mute = AtomicBool::new(false);
    let wait_while_held = || async {
        while controls.held.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let up = async {
        let mut buf = vec![0_u8; 64 * 1024];
        // Whether this connection sent the marker of an armed cut.
        let mut marked = false;
        loop {
            wait_while_held().await;
            let n = from_client.read(&mut buf).await.ok().filter(|n| *n > 0)?;
            let chunk = &buf[..n];
            if controls.cut.load(Ordering::SeqCst) != 0 && !marked {
                let marker = controls.after.lock().unwrap().clone();
                marked = !marker.is_empty() && chunk.windows(marker.len()).any(|w| w == marker);
            }
            if marked && chunk.windows(COMMIT.len()).any(|w| w == COMMIT) {
                marked = false;
                let cut = controls.cut.swap(0, Ordering::SeqCst);
                if cut == CommitCut::Before as u8 {
                    return None::<()>;
                }
                if cut == CommitCut::After as u8 {
                    mute.store(true, Ordering::SeqCst);
                    to_server.write_all(chunk).await.ok()?;
                    // Time for the server to commit before the connection goes.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return None;
                }
            }
            to_server.write_all(chunk).await.ok()?;
        }
    };
    let down = async {
        let mut buf = vec![0_u8; 64 * 1024];
        loop {
            wait_while_held().await;
            let n = from_server.read(&mut buf).await.ok().filter(|n| *n > 0)?;
            if n == usize::MAX {
                return None::<()>;
            }
            if !mute.load(Ordering::SeqCst) {
                to_client.write_all(&buf[..n]).await.ok()?;
            }
        }
    };
    // Either side ending closes both.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

async fn bind(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("reuseaddr");
    socket.bind(addr).expect("bind proxy port");
    socket.listen(128).expect("listen")
}
