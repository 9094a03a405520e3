//! Serving the gRPC port: accepting connections, TLS, HTTP/2, connection age, and the stop.
//!
//! We serve connections ourselves because tonic 0.14's server cannot age them the way
//! Kubernetes needs. Its `max_connection_age` is one fixed age for every connection, so
//! connections opened together (after a pod restart, say) all reconnect together again at every
//! age; and its `max_connection_age_grace` sends no GOAWAY at the age at all: it only drops the
//! connection at age + grace, killing the calls in flight. The model is grpc-go's
//! MaxConnectionAge / MaxConnectionAgeGrace.
//!
//! Invariants:
//! - with an age, each connection gets GOAWAY at the age ±10% (drawn per connection); its calls
//!   in flight go on and the client opens a new connection (through the Service, so to any
//!   replica) for new calls; the connection closes when its calls are done, and at the latest
//!   one grace after the GOAWAY, under whatever still runs (a long stream, a stuck call);
//! - on stop, the listener closes at once (new clients are refused, not left hanging), every
//!   connection gets GOAWAY, and [`serve`] returns when their calls in flight have finished;
//! - nothing is added per call: the work here is per connection (one task, one timer, one
//!   random draw), and calls go straight to hyper and the service. (tonic's server also boxed
//!   each request body and attached its connection info; nothing here reads
//!   `Request::remote_addr` or `peer_certs`, so calls carry neither.)

use std::{convert::Infallible, future::Future, pin::Pin, sync::Arc, time::Duration};

use anyhow::Context as _;
use http::{Request, Response};
use hyper::{body::Incoming, server::conn::http2};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use rand::Rng as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        RootCertStore, ServerConfig,
        crypto::ring,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
        server::WebPkiClientVerifier,
    },
    server::TlsStream,
};
use tokio_util::{either::Either, sync::CancellationToken, task::TaskTracker};
use tower::Service;

use crate::{
    config::TlsFiles,
    metrics::{self, ConnectionClosed},
};

/// A client that opens a connection and never finishes the handshake holds a task and a
/// socket; it gets this long.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// When connections are told to go away, and how long their calls get after that.
#[derive(Clone, Copy, Debug)]
pub struct Ageing {
    pub max_age: Duration,
    pub grace: Duration,
}

impl Ageing {
    /// The age of one connection: ±10%, so that connections opened together do not all
    /// reconnect together.
    fn draw(&self) -> Duration {
        self.max_age.mul_f64(rand::rng().random_range(0.9..=1.1))
    }
}

/// Builds the TLS acceptor (HTTP/2 by ALPN; client certificates from the CA when one is given).
pub fn tls_acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))
    };
    let chain = CertificateDer::pem_slice_iter(&read(&files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing the certificates in {}", files.cert.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .with_context(|| format!("parsing the private key in {}", files.key.display()))?;
    // Named rather than the process default, which would be ambiguous (a panic at start-up) if
    // another dependency ever enabled a second provider.
    let provider = Arc::new(ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&read(ca)?) {
                roots
                    .add(cert.with_context(|| format!("parsing {}", ca.display()))?)
                    .with_context(|| format!("adding the client CA in {}", ca.display()))?;
            }
            builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .context("building the client certificate verifier")?,
            )
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not form an identity")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `service` on every connection `listener` accepts until `stop`, then drains.
pub async fn serve<S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: S,
    ageing: Option<Ageing>,
    max_pending_resets: usize,
    stop: CancellationToken,
) where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut http = http2::Builder::new(TokioExecutor::new());
    // As tonic configures it: no cap on streams per connection (ShedLayer bounds the calls of the
    // whole server), and a timer for hyper's HTTP/2 timeouts.
    http.timer(TokioTimer::new()).max_concurrent_streams(None);
    // Callers with short deadlines reset many streams before the server takes them up; h2's
    // default (20 pending resets) would then close the whole connection, failing every other
    // call on it. Allow as many as the server admits calls at once.
    http.max_pending_accept_reset_streams(Some(max_pending_resets));
    let http = Arc::new(http);
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors, typically: retrying at once would spin.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (tls, service, http, stop) = (tls.clone(), service.clone(), http.clone(), stop.clone());
        connections.spawn(async move {
            let Some(io) = secured(tcp, tls, &stop).await else {
                return;
            };
            metrics::connection_opened();
            let conn = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
            let conn = std::pin::pin!(conn);
            let closed = until_closed(conn, |conn| conn.graceful_shutdown(), ageing, &stop).await;
            metrics::connection_closed(closed);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// The accepted connection, after the TLS handshake when there is TLS; `None` when the
/// handshake fails, takes too long, or the server stops meanwhile.
async fn secured(
    tcp: TcpStream,
    tls: Option<TlsAcceptor>,
    stop: &CancellationToken,
) -> Option<Either<TcpStream, TlsStream<TcpStream>>> {
    // gRPC messages are small and latency matters more than packet count.
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Some(Either::Left(tcp));
    };
    let handshake = tokio::select! {
        _ = stop.cancelled() => return None,
        handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(tcp)) => handshake,
    };
    match handshake {
        Ok(Ok(stream)) => Some(Either::Right(stream)),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

/// Drives a connection to its end and says why it ended. `goaway` starts its graceful
/// shutdown: hyper sends GOAWAY (twice, around a PING, so no call the client sent before the
/// first is lost), and the connection resolves when its calls in flight are done.
async fn until_closed<C>(
    mut conn: Pin<&mut C>,
    goaway: impl Fn(Pin<&mut C>),
    ageing: Option<Ageing>,
    stop: &CancellationToken,
) -> ConnectionClosed
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    let age_reached = async {
        match ageing {
            Some(ageing) => tokio::time::sleep(ageing.draw()).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        ended = conn.as_mut() => {
            log_error(ended);
            ConnectionClosed::Peer
        }
        _ = stop.cancelled() => {
            goaway(conn.as_mut());
            log_error(conn.await);
            ConnectionClosed::Shutdown
        }
        () = age_reached => {
            goaway(conn.as_mut());
            let grace = ageing.map_or(Duration::ZERO, |ageing| ageing.grace);
            match tokio::time::timeout(grace, conn).await {
                Ok(ended) => {
                    log_error(ended);
                    ConnectionClosed::MaxAge
                }
                // The caller then drops the connection: its socket closes under the calls left.
                Err(_) => ConnectionClosed::MaxAgeGrace,
            }
        }
    }
}

fn log_error(ended: Result<(), hyper::Error>) {
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_drawn_within_ten_percent_and_spread() {
        let ageing = Ageing {
            max_age: Duration::from_secs(300),
            grace: Duration::from_secs(30),
        };
        let ages: Vec<Duration> = (0..1000).map(|_| ageing.draw()).collect();
        for age in &ages {
            assert!(
                (Duration::from_secs(270)..=Duration::from_secs(330)).contains(age),
                "{age:?}"
            );
        }
        let (min, max) = (ages.iter().min().unwrap(), ages.iter().max().unwrap());
        assert!(
            *max - *min > Duration::from_secs(50),
            "not spread: {min:?}..{max:?}"
        );
    }
}
