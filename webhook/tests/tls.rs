//! `serve` over real TLS on loopback: an AdmissionReview round trip, a certificate swap seen by new
//! connections while an open connection keeps working, and a graceful shutdown.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use nvidia_certs::{Bundle, Lifetimes, generate, service_dns_names};
use nvidia_webhook::InjectConfig;
use nvidia_webhook::admission::AppState;
use nvidia_webhook::server::{ServeOptions, serve_on};
use nvidia_webhook::tls::TlsFiles;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::TcpStream;

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

fn names() -> Vec<String> {
    let mut names = service_dns_names("nvidia-webhook", "kube-system");
    names.push("localhost".to_owned());
    names
}

fn write_pair(dir: &Path, bundle: &Bundle) {
    // Write beside and rename, as the kubelet swaps a Secret volume.
    for (name, text) in [("tls.crt", &bundle.cert), ("tls.key", &bundle.key)] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    }
}

/// A TLS connection trusting only `ca_pem`, with HTTP/1.1 on top.
async fn connect(addr: SocketAddr, ca_pem: &str) -> Result<Sender, String> {
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
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("nvidia-webhook.kube-system.svc").expect("name");
    let tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn send(sender: &mut Sender, method: &str, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "nvidia-webhook.kube-system.svc")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    (status, response.into_body().collect().await.expect("body").to_bytes().to_vec())
}

fn review() -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/gpu-pod-typical.review.json"))
        .expect("fixture")
}

#[tokio::test]
async fn round_trip_certificate_swap_and_graceful_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = generate(&names(), Lifetimes::default()).expect("certificate");
    write_pair(dir.path(), &first);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let options = ServeOptions {
        listen: addr,
        tls: TlsFiles { cert: dir.path().join("tls.crt"), key: dir.path().join("tls.key") },
        reload_interval: Duration::from_millis(50),
        shutdown_delay: Duration::from_millis(300),
        drain_timeout: Duration::from_secs(5),
    };
    let state = AppState::new(InjectConfig::new("ghcr.io/gardenlinux/nvidia-installer:0.1.0"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_on(listener, options, state.clone(), async move {
        let _ = stopped.await;
    }));

    // A review over TLS, answered with the request's uid and a patch.
    let mut sender = {
        let mut attempt = 0;
        loop {
            match connect(addr, &first.ca_cert).await {
                Ok(sender) => break sender,
                Err(error) if attempt < 100 => {
                    attempt += 1;
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => panic!("server never accepted TLS: {error}"),
            }
        }
    };
    let (status, body) = send(&mut sender, "POST", "/mutate", review()).await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(answer["response"]["uid"], "c0ffee00-0000-4000-8000-000000000001");
    assert!(answer["response"]["patch"].is_string());
    let (status, _) = send(&mut sender, "GET", "/healthz", Vec::new()).await;
    assert_eq!(status, 200);

    // Swap to a certificate from a different CA; new connections must see it.
    let second = generate(&names(), Lifetimes::default()).expect("certificate");
    write_pair(dir.path(), &second);
    let mut fresh = None;
    for _ in 0..200 {
        if let Ok(sender) = connect(addr, &second.ca_cert).await {
            fresh = Some(sender);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut fresh = fresh.expect("the new certificate is served without a restart");
    assert!(connect(addr, &first.ca_cert).await.is_err(), "new handshakes no longer get the old certificate");
    let (status, _) = send(&mut fresh, "POST", "/mutate", review()).await;
    assert_eq!(status, 200);
    // The connection opened before the swap still works.
    let (status, _) = send(&mut sender, "POST", "/mutate", review()).await;
    assert_eq!(status, 200, "open connections survive a certificate swap");

    // A broken pair is ignored: the last good certificate keeps serving.
    std::fs::write(dir.path().join("tls.key"), "not a key").expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(connect(addr, &second.ca_cert).await.is_ok(), "a broken pair does not replace a good one");

    // SIGTERM path: readiness fails first, requests still answered, then the server stops.
    stop.send(()).expect("stop");
    let mut not_ready = false;
    for _ in 0..50 {
        let (status, _) = send(&mut fresh, "GET", "/readyz", Vec::new()).await;
        if status == 503 {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(not_ready, "/readyz fails once shutdown starts");
    let (status, _) = send(&mut fresh, "POST", "/mutate", review()).await;
    assert_eq!(status, 200, "requests during the shutdown delay are still answered");
    let result = tokio::time::timeout(Duration::from_secs(10), server).await.expect("server stops").expect("join");
    assert!(result.is_ok(), "{result:?}");
    let metrics = state.metrics.encode();
    assert!(metrics.contains("nvidia_webhook_injected_total 4"), "{metrics}");
}
