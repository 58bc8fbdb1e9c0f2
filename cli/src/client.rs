//! HTTP/1.1 over the daemon's unix socket, with Docker's error bodies turned into errors.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Method, Request};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};
use shoal_api::{system::API_VERSION, ErrorResponse};
use tokio::net::UnixStream;

pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// `unix:///path` or a bare path; other schemes arrive with TCP + mutual TLS.
    pub fn new(host: &str) -> Result<Self> {
        let path = match host.split_once("://") {
            Some(("unix", path)) => path,
            Some((scheme, _)) => bail!("unsupported host scheme {scheme:?}: use unix://PATH"),
            None => host,
        };
        Ok(Client { socket: PathBuf::from(path) })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(Method::GET, path, Bytes::new()).await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(Method::PUT, path, Bytes::from(serde_json::to_vec(body)?)).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(Method::POST, path, Bytes::from(serde_json::to_vec(body)?)).await
    }

    /// A POST whose answer has no body worth reading.
    pub async fn post_empty<B: Serialize>(&self, path: &str, body: &B) -> Result<()> {
        self.send::<serde::de::IgnoredAny>(Method::POST, path, Bytes::from(serde_json::to_vec(body)?)).await.map(|_| ())
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        self.send::<serde::de::IgnoredAny>(Method::DELETE, path, Bytes::new()).await.map(|_| ())
    }

    async fn send<T: DeserializeOwned>(&self, method: Method, path: &str, body: Bytes) -> Result<T> {
        let stream = UnixStream::connect(&self.socket).await.with_context(|| {
            format!("Cannot connect to the shoal daemon at unix://{}. Is shoald running?", self.socket.display())
        })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(format!("/v{API_VERSION}{path}"))
            .header("host", "shoal")
            .header("content-type", "application/json")
            .body(Full::new(body))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorResponse>(&bytes)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(anyhow!("Error response from daemon: {message}"));
        }
        // Some endpoints answer 200 with no body; read that as JSON `null`.
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(bytes).context("unexpected response from the daemon")
    }
}
