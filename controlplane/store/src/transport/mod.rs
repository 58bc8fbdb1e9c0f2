//! Mutual TLS between nodes on the cluster port (2377): an HTTP server that knows who is
//! calling, and HTTP clients that dial managers.
//!
//! Every connection's client certificate (verified by rustls against the cluster root) is
//! turned into a `Peer` request extension, so handlers authorize by node ID and role without
//! touching TLS. Plain TCP never gets past the handshake. `limits` bounds what one client
//! can hold: connections, handshake and header time, silence.

mod limits;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use shoal_ca::{tls::TlsMaterial, CaError, JoinToken, NodeIdentity};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tracing::debug;

pub use self::limits::Limits;
use self::limits::{Admission, Idle};

/// Who is on the other end of a cluster connection: the identity in its certificate, or
/// `None` for a node that has none yet (it may only join).
#[derive(Debug, Clone)]
pub struct Peer(pub Option<NodeIdentity>);

/// The certificate chain the peer presented (verified by the handshake), leaf first.
#[derive(Debug, Clone, Default)]
pub struct PeerChain(pub Arc<Vec<rustls::pki_types::CertificateDer<'static>>>);

/// Serves `router` over mutual TLS on `listener` until `shutdown` completes, within the
/// default `Limits`. The TLS configuration is read anew for each connection, so certificate
/// renewal needs no restart.
pub async fn serve(
    listener: TcpListener,
    tls: impl Fn() -> Arc<rustls::ServerConfig> + Send + Sync + 'static,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    serve_with(Limits::default(), listener, tls, router, shutdown).await
}

/// `serve` within `limits`.
pub async fn serve_with(
    limits: Limits,
    listener: TcpListener,
    tls: impl Fn() -> Arc<rustls::ServerConfig> + Send + Sync + 'static,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let admission = Arc::new(Admission::default());
    tokio::pin!(shutdown);
    // Connections end with the server: a stopped manager must not keep answering on
    // connections it accepted before (dropping the set aborts them).
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, remote) = tokio::select! {
            _ = &mut shutdown => return,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        // Over the limits: closed at once, before any TLS work.
        let Some(admitted) = admission.admit(remote.ip(), &limits) else {
            debug!(%remote, "connection refused: too many open");
            continue;
        };
        let acceptor = TlsAcceptor::from(tls());
        let router = router.clone();
        connections.spawn(async move {
            let _admitted = admitted;
            if let Err(e) = serve_connection(&limits, acceptor, stream, remote, router).await {
                debug!(%remote, error = %e, "cluster connection ended");
            }
        });
    }
}

async fn serve_connection(
    limits: &Limits,
    acceptor: TlsAcceptor,
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    router: Router,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let tls = tokio::time::timeout(limits.handshake, acceptor.accept(stream)).await??;
    // A verified certificate that names no swarm node (an operator's client certificate on
    // the TCP Engine API) is simply no node identity; node-only endpoints refuse it.
    let chain = PeerChain(Arc::new(tls.get_ref().1.peer_certificates().map(<[_]>::to_vec).unwrap_or_default()));
    let peer = chain.0.first().and_then(|cert| NodeIdentity::from_cert_der(cert).ok());
    debug!(%remote, node = ?peer.as_ref().map(|p| &p.node_id), "cluster connection");
    let service = router.map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(Peer(peer.clone()));
        req.extensions_mut().insert(chain.clone());
        req
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.headers);
    builder.serve_connection(TokioIo::new(Idle::new(tls, limits.idle)), TowerToHyperService::new(service)).await
}

/// Timeout of one request to another node.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP client that dials managers with this node's certificate.
pub fn client(material: &TlsMaterial) -> Result<reqwest::Client, CaError> {
    build(shoal_ca::tls::client_config(material)?)
}

/// An HTTP client for joining: no certificate, trusts only the root the token pins.
pub fn join_client(token: &JoinToken) -> Result<reqwest::Client, CaError> {
    build(shoal_ca::tls::join_client_config(token)?)
}

fn build(config: rustls::ClientConfig) -> Result<reqwest::Client, CaError> {
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .connect_timeout(Duration::from_secs(3))
        .timeout(REQUEST_TIMEOUT)
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| CaError::InvalidCertificate(format!("HTTP client: {e}")))
}

#[cfg(test)]
mod tests;
