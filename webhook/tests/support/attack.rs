//! Hostile clients of the webhook, shared by the hostile-clients test and the benchmark: slow
//! connections that never finish a handshake or a request head, and an HTTP/2 connection whose
//! streams send almost 4 MiB each and never finish.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// `nvidia-webhook serve` as a process, with a certificate for `localhost` in `dir`.
pub struct Webhook {
    pub child: Child,
    pub addr: SocketAddr,
    pub ca: String,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Webhook {
    pub fn start(binary: &Path, dir: &Path, extra: &[&str]) -> Self {
        let bundle =
            nvidia_certs::generate(&["localhost".to_owned()], nvidia_certs::Lifetimes::default()).expect("certificate");
        std::fs::write(dir.join("tls.crt"), &bundle.cert).expect("cert");
        std::fs::write(dir.join("tls.key"), &bundle.key).expect("key");
        let addr = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
        let child = Command::new(binary)
            .args(["serve", "--listen", &addr.to_string(), "--installer-image", "registry.example/nvidia-installer:1"])
            .arg("--tls-cert")
            .arg(dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.join("tls.key"))
            .args(extra)
            .env("RUST_LOG", std::env::var("NVIDIA_TEST_WEBHOOK_LOG").unwrap_or_else(|_| "warn".to_owned()))
            .stdout(Stdio::null())
            .spawn()
            .expect("start nvidia-webhook");
        Self { child, addr, ca: bundle.ca_cert }
    }

    /// (`VmRSS`, `VmHWM`) of the server process, in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

fn tls_config(ca_pem: &str, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

pub async fn tls(addr: SocketAddr, ca: &str, alpn: &[u8]) -> tokio_rustls::client::TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(tls_config(ca, alpn));
    for _ in 0..400 {
        if let Ok(tcp) = TcpStream::connect(addr).await {
            return connector.connect(ServerName::try_from("localhost").expect("name"), tcp).await.expect("tls");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("server at {addr} never came up");
}

/// A keep-alive HTTP/1.1 connection.
pub async fn connect(addr: SocketAddr, ca: &str) -> Sender {
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(tls(addr, ca, b"http/1.1").await)).await.expect("http");
    tokio::spawn(connection);
    sender
}

/// POST a review; the status and how long the answer took.
pub async fn post(sender: &mut Sender, body: &Bytes) -> (u16, Duration) {
    sender.ready().await.expect("connection ready");
    let started = Instant::now();
    let request = hyper::Request::post("/mutate")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    response.into_body().collect().await.expect("body");
    (status, started.elapsed())
}

/// Held open by the attack; dropping it closes everything.
pub struct Held {
    pub raw: Vec<TcpStream>,
    pub half_headers: Vec<tokio_rustls::client::TlsStream<TcpStream>>,
    pub streams: Vec<tokio::task::JoinHandle<Option<u16>>>,
    pub feeders: Vec<tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::convert::Infallible>>>,
}

/// `raw` TCP connections that send three bytes of a TLS record and stop, and `half` TLS
/// connections that send half an HTTP/1.1 request head and stop.
pub async fn slow_connections(addr: SocketAddr, ca: &str, raw: usize, half: usize) -> Held {
    let mut held = Held { raw: Vec::new(), half_headers: Vec::new(), streams: Vec::new(), feeders: Vec::new() };
    for _ in 0..raw {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
        held.raw.push(tcp);
    }
    for _ in 0..half {
        let mut stream = tls(addr, ca, b"http/1.1").await;
        stream.write_all(b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Ty").await.expect("write");
        stream.flush().await.expect("flush");
        held.half_headers.push(stream);
    }
    held
}

/// `connections` TLS connections that each send a request head declaring a `bytes` body, then
/// nothing.
pub async fn declared_but_unsent(
    addr: SocketAddr,
    ca: &str,
    connections: usize,
    bytes: usize,
) -> Vec<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut held = Vec::new();
    for _ in 0..connections {
        let mut stream = tls(addr, ca, b"http/1.1").await;
        let head = format!(
            "POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {bytes}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.expect("write");
        stream.flush().await.expect("flush");
        held.push(stream);
    }
    held
}

/// One HTTP/2 connection with `streams` requests, each sending `bytes` of body (no
/// `Content-Length`) and never finishing. Each stream's task ends with the status it got, if any.
pub async fn unfinished_h2_streams(addr: SocketAddr, ca: &str, streams: usize, bytes: usize, held: &mut Held) {
    let io = TokioIo::new(tls(addr, ca, b"h2").await);
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("h2 handshake");
    tokio::spawn(connection);
    for _ in 0..streams {
        let (feed, frames) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
        let body = StreamBody::new(tokio_stream_from(frames));
        let mut sender = sender.clone();
        held.streams.push(tokio::spawn(async move {
            sender.ready().await.ok()?;
            let request =
                hyper::Request::post("/mutate").header("content-type", "application/json").body(body).expect("request");
            let response = sender.send_request(request).await.ok()?;
            Some(response.status().as_u16())
        }));
        let chunk = Bytes::from(vec![b' '; 64 * 1024]);
        let chunks = bytes / chunk.len();
        let feeder = feed.clone();
        tokio::spawn(async move {
            for _ in 0..chunks {
                if feeder.send(Ok(Frame::data(chunk.clone()))).await.is_err() {
                    return;
                }
            }
        });
        held.feeders.push(feed);
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// A review of a GPU pod (the typical golden fixture).
pub fn review() -> Bytes {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/gpu-pod-typical.review.json");
    Bytes::from(std::fs::read(path).expect("fixture"))
}
