//! The node's HTTP API on its unix socket: the Docker Engine API subset (`/_ping`,
//! `/version`, ... with or without a `/v1.NN` prefix) and the agent's own `/shoal/v1/...`.

mod dataplane;
mod error;
pub mod system;

use std::sync::Arc;

use axum::{
    extract::{DefaultBodyLimit, Request},
    middleware::{self, Next},
    response::Response,
    routing::get,
    Router,
};
use shoal_store::transport::{serve_with, Limits};
use tokio::{
    net::{TcpListener, UnixListener},
    sync::Mutex,
};
use tower::Layer;

pub use error::ApiError;

use shoal_manager::Swarm;

use crate::net::Dataplane;

/// What the handlers share.
pub struct Node {
    pub dataplane: Mutex<Dataplane>,
    /// This node's swarm membership (and, on managers, the control plane).
    pub swarm: Arc<Swarm>,
    /// What `/info` reports about the daemon.
    pub daemon: system::DaemonInfo,
}

/// Serves the API on `listener`, and over mutual TLS on `tcp` if given, until `shutdown`
/// completes.
pub async fn serve(
    listener: UnixListener,
    tcp: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    node: Arc<Node>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let routes = Router::new()
        .route("/_ping", get(system::ping).head(system::ping))
        .route("/version", get(system::version))
        .route("/info", get(system::info))
        .route(
            "/shoal/v1/dataplane",
            get(dataplane::show).put(dataplane::replace).layer(DefaultBodyLimit::max(dataplane::BODY_LIMIT)),
        )
        .route(
            "/shoal/v1/dataplane/changes",
            axum::routing::post(dataplane::change).layer(DefaultBodyLimit::max(dataplane::BODY_LIMIT)),
        )
        .route("/shoal/v1/dataplane/sequence", get(dataplane::sequence))
        .route("/shoal/v1/dataplane/stats", get(dataplane::stats))
        .with_state(node.clone())
        .merge(shoal_manager::engine_api::routes(node.swarm.clone()))
        .fallback(error::not_found);
    // Outside the router, so the version prefix is gone before routing.
    let app = middleware::from_fn(strip_version_prefix).layer(routes);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tls_server = tcp.map(|(listener, tls)| {
        let router = Router::new().fallback_service(app.clone());
        let mut stopped = stopped.clone();
        // Followed logs and event streams may stay silent for long: an hour, not minutes.
        let limits = Limits { idle: std::time::Duration::from_secs(3600), ..Limits::default() };
        tokio::spawn(serve_with(limits, listener, move || tls.clone(), router, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }))
    });
    let served = axum::serve(listener, tower::make::Shared::new(app)).with_graceful_shutdown(shutdown).await;
    let _ = stop.send(true);
    if let Some(task) = tls_server {
        let _ = task.await;
    }
    served
}

/// Docker clients prefix every path with the API version they speak (`/v1.51/version`); answer
/// any version we support and refuse the rest as dockerd does.
async fn strip_version_prefix(mut req: Request, next: Next) -> Result<Response, ApiError> {
    let path = req.uri().path();
    let Some(rest) = path.strip_prefix("/v") else {
        return Ok(next.run(req).await);
    };
    let (version, tail) = rest.split_once('/').map_or((rest, ""), |(v, t)| (v, t));
    let Some(requested) = parse_api_version(version) else {
        return Ok(next.run(req).await);
    };
    let newest = parse_api_version(shoal_api::system::API_VERSION).unwrap_or_default();
    let oldest = parse_api_version(shoal_api::system::MIN_API_VERSION).unwrap_or_default();
    if requested > newest {
        return Err(ApiError::BadRequest(format!(
            "client version {version} is too new. Maximum supported API version is {}",
            shoal_api::system::API_VERSION
        )));
    }
    if requested < oldest {
        return Err(ApiError::BadRequest(format!(
            "client version {version} is too old. Minimum supported API version is {}, please upgrade your client to a newer version",
            shoal_api::system::MIN_API_VERSION
        )));
    }
    let new_path = format!("/{tail}");
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    if let Ok(uri) = axum::http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    Ok(next.run(req).await)
}

/// `1.51` -> (1, 51); anything else is not a version prefix.
fn parse_api_version(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::parse_api_version;

    #[test]
    fn parses_versions_and_orders_them_numerically() {
        assert_eq!(parse_api_version("1.51"), Some((1, 51)));
        assert!(parse_api_version("1.9") < parse_api_version("1.24"));
        assert_eq!(parse_api_version("shoal"), None);
        assert_eq!(parse_api_version("1"), None);
    }
}
