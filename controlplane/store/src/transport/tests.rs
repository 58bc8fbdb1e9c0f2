//! The cluster port's limits, against a real TLS server on loopback: a client that says
//! nothing, one that never finishes its headers, one that goes quiet, and one too many.

use std::time::{Duration, Instant};

use shoal_api::node::NodeRole;
use shoal_ca::{tls::TlsMaterial, NodeIdentity, NodeKey, RootCa};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::*;

fn material() -> TlsMaterial {
    let root = RootCa::generate().unwrap();
    let key = NodeKey::generate().unwrap();
    let identity = NodeIdentity { node_id: "n1".into(), role: NodeRole::Manager, cluster_id: "c".into() };
    TlsMaterial {
        root_pem: root.cert_pem().to_owned(),
        cert_pem: root.issue(&key.csr_pem().unwrap(), &identity, Duration::from_secs(3600)).unwrap(),
        key_pem: key.to_pem().to_string(),
    }
}

/// A server within `limits` answering `GET /` with "ok"; its address.
async fn server(limits: Limits, material: &TlsMaterial) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = shoal_ca::tls::server_config(material).unwrap();
    let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
    tokio::spawn(serve_with(limits, listener, move || tls.clone(), router, std::future::pending()));
    addr
}

async fn tls_client(addr: SocketAddr, material: &TlsMaterial) -> tokio_rustls::client::TlsStream<TcpStream> {
    let config = Arc::new(shoal_ca::tls::client_config(material).unwrap());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::from(addr.ip());
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap()
}

/// How long until the server closes `stream` (bounded by 10 s).
async fn closed_after(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    });
    read.await.expect("the server kept the connection open");
    started.elapsed()
}

fn short() -> Limits {
    Limits {
        connections: 16,
        per_address: 16,
        handshake: Duration::from_millis(300),
        headers: Duration::from_millis(300),
        idle: Duration::from_millis(600),
    }
}

#[tokio::test]
async fn a_client_that_never_shakes_hands_is_dropped() {
    let material = material();
    let addr = server(short(), &material).await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert!(closed_after(&mut silent).await < Duration::from_secs(3));
}

#[tokio::test]
async fn headers_that_never_end_and_silence_after_a_request_are_cut() {
    let material = material();
    let addr = server(short(), &material).await;

    let mut slow = tls_client(addr, &material).await;
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    assert!(closed_after(&mut slow).await < Duration::from_secs(3), "half a header held the connection");

    let mut quiet = tls_client(addr, &material).await;
    quiet.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = [0u8; 512];
    let n = quiet.read(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));
    assert!(closed_after(&mut quiet).await < Duration::from_secs(3), "a silent keep-alive connection stayed");
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_at_once_and_places_come_back() {
    let material = material();
    let limits = Limits { per_address: 2, handshake: Duration::from_secs(30), ..short() };
    let addr = server(limits, &material).await;
    let held = [TcpStream::connect(addr).await.unwrap(), TcpStream::connect(addr).await.unwrap()];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    assert!(closed_after(&mut third).await < Duration::from_secs(1), "a third connection from one address");
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut client = tls_client(addr, &material).await;
    client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = [0u8; 512];
    let n = client.read(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"), "the freed places are usable");
}
