//! A TCP forwarder that a test can cut and restore, to make a dependency "stop answering"
//! without touching the shared Postgres or Redis.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Mutex,
    task::JoinSet,
};

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
        tasks.spawn(async move {
            // Dropping this set (when the accept task is aborted) aborts every forward.
            let mut connections = JoinSet::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                while connections.try_join_next().is_some() {}
                connections.spawn(forward(inbound, target));
            }
        });
        *self.running.lock().await = Some(tasks);
    }
}

async fn forward(mut inbound: TcpStream, target: SocketAddr) {
    if let Ok(mut outbound) = TcpStream::connect(target).await {
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
    }
}

async fn bind(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("reuseaddr");
    socket.bind(addr).expect("bind proxy port");
    socket.listen(128).expect("listen")
}
