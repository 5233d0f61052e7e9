//! Webhook benchmark: `nvidia-webhook serve` against a baseline server that does only the
//! irreducible work (TLS, HTTP, reading the body, parsing it as generic JSON, answering `allowed`
//! with its uid), side by side in one run, over keep-alive HTTPS on loopback.
//!
//! Run: `cargo bench -p nvidia-webhook --bench admission` (add `-- --quick` for a short run).
//! The same executable serves the baseline when started with `--baseline-server`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};

#[path = "../tests/support/attack.rs"]
mod attack;

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--baseline-server") {
        let addr: SocketAddr = args[at + 1].parse().expect("address");
        baseline_server(addr, Path::new(&args[at + 2]), Path::new(&args[at + 3]));
        return;
    }
    if args.iter().any(|a| a == "--stages") {
        stages();
        return;
    }
    if args.iter().any(|a| a == "--bench") || args.len() <= 1 || args.iter().any(|a| a == "--quick") {
        let quick = args.iter().any(|a| a == "--quick");
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        runtime.block_on(run(quick));
    }
}

/// The baseline: rustls + HTTP + body + generic JSON + `allowed` with the uid.
fn baseline_server(addr: SocketAddr, cert: &Path, key: &Path) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let files = nvidia_webhook::tls::TlsFiles { cert: cert.to_owned(), key: key.to_owned() };
        let config = axum_server::tls_rustls::RustlsConfig::from_config(files.load().expect("certificate").config);
        let app = axum::Router::new().route(
            "/mutate",
            axum::routing::post(|body: axum::body::Bytes| async move {
                let review: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                axum::Json(json!({
                    "apiVersion": review["apiVersion"],
                    "kind": review["kind"],
                    "response": {"uid": review["request"]["uid"], "allowed": true}
                }))
            }),
        );
        axum_server::bind_rustls(addr, config).serve(app.into_make_service()).await.expect("baseline server");
    });
}

struct Server {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Peak resident memory of the server process.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr")
}

fn start_servers(dir: &Path) -> (Server, Server) {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    let webhook_addr = free_addr();
    let webhook = Command::new(env!("CARGO_BIN_EXE_nvidia-webhook"))
        .args([
            "serve",
            "--listen",
            &webhook_addr.to_string(),
            "--installer-image",
            "ghcr.io/gardenlinux/nvidia-installer:0.1.0",
        ])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start nvidia-webhook");
    let baseline_addr = free_addr();
    let baseline = Command::new(std::env::current_exe().expect("exe"))
        .arg("--baseline-server")
        .arg(baseline_addr.to_string())
        .arg(&cert)
        .arg(&key)
        .spawn()
        .expect("start baseline");
    (
        Server { name: "nvidia-webhook", child: webhook, addr: webhook_addr },
        Server { name: "baseline", child: baseline, addr: baseline_addr },
    )
}

async fn post(sender: &mut Sender, body: &Bytes) -> Duration {
    sender.ready().await.expect("connection ready");
    let started = Instant::now();
    let request = hyper::Request::post("/mutate")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    assert!(bytes.starts_with(b"{"), "JSON answer");
    started.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Closed loop: `connections` clients send back to back for `duration`.
async fn throughput(
    addr: SocketAddr,
    ca: &str,
    body: &Bytes,
    connections: usize,
    duration: Duration,
) -> (f64, Duration, Duration) {
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut sender = attack::connect(addr, ca).await;
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                post(&mut sender, &body).await;
            }
            let started = Instant::now();
            let mut latencies = Vec::new();
            while started.elapsed() < duration {
                latencies.push(post(&mut sender, &body).await);
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("client"));
    }
    all.sort();
    (all.len() as f64 / duration.as_secs_f64(), percentile(&all, 0.5), percentile(&all, 0.99))
}

/// Open loop at a fixed rate over several connections with staggered schedules. A request's
/// latency runs from its send or, when the previous response on its connection came back after
/// the request was due, from the time it was due: a server falling behind is charged for the
/// wait (no coordinated omission), the load generator's own timer (tokio's, 1 ms ticks) firing
/// late is not. Returns p50, p99 and how many requests found their connection still busy.
async fn fixed_rate(
    addr: SocketAddr,
    ca: &str,
    body: &Bytes,
    rate: u32,
    duration: Duration,
) -> (Duration, Duration, usize) {
    let connections = 8u32;
    let interval = Duration::from_secs_f64(connections as f64 / rate as f64);
    let mut tasks = Vec::new();
    for i in 0..connections {
        let mut sender = attack::connect(addr, ca).await;
        post(&mut sender, body).await;
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let start = Instant::now() + interval * i / connections;
            let mut latencies = Vec::new();
            let mut behind = 0usize;
            let mut previous_done = Instant::now();
            let mut n = 0u32;
            while start.elapsed() < duration {
                let due = start + interval * n;
                tokio::time::sleep_until(due.into()).await;
                let from = if previous_done > due {
                    behind += 1;
                    due
                } else {
                    Instant::now()
                };
                post(&mut sender, &body).await;
                previous_done = Instant::now();
                latencies.push(previous_done - from);
                n += 1;
            }
            (latencies, behind)
        }));
    }
    let mut all = Vec::new();
    let mut behind = 0;
    for task in tasks {
        let (latencies, late) = task.await.expect("client");
        all.extend(latencies);
        behind += late;
    }
    all.sort();
    (percentile(&all, 0.5), percentile(&all, 0.99), behind)
}

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/gpu-pod-typical.review.json");
    serde_json::from_slice(&std::fs::read(path).expect("fixture")).expect("json")
}

/// A review of a GPU pod of about 1 MiB: thousands of environment variables.
fn huge_review() -> Bytes {
    let mut review = fixture();
    let env: Vec<Value> = (0..14_000)
        .map(|i| json!({"name": format!("SETTING_{i:05}"), "value": format!("value-{i:05}-{}", "x".repeat(40))}))
        .collect();
    review["request"]["object"]["spec"]["containers"][0]["env"] = Value::Array(env);
    Bytes::from(serde_json::to_vec(&review).expect("json"))
}

async fn run(quick: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = nvidia_certs::generate(&["localhost".to_owned()], nvidia_certs::Lifetimes::default()).expect("cert");
    std::fs::write(dir.path().join("tls.crt"), &bundle.cert).expect("cert");
    std::fs::write(dir.path().join("tls.key"), &bundle.key).expect("key");
    std::fs::write(dir.path().join("ca.crt"), &bundle.ca_cert).expect("ca");
    let (webhook, baseline) = start_servers(dir.path());
    let body = Bytes::from(serde_json::to_vec(&fixture()).expect("json"));
    let huge = huge_review();
    let duration = if quick { Duration::from_secs(2) } else { Duration::from_secs(8) };
    let connections = 16;

    println!(
        "# webhook benchmark: {} byte review, {connections} keep-alive HTTPS connections, {}s per run",
        body.len(),
        duration.as_secs()
    );
    let mut rows = Vec::new();
    for server in [&baseline, &webhook, &baseline, &webhook] {
        let (rps, p50, p99) = throughput(server.addr, &bundle.ca_cert, &body, connections, duration).await;
        println!("{:15} closed loop: {rps:8.0} req/s  p50 {:6.3} ms  p99 {:6.3} ms", server.name, ms(p50), ms(p99));
        rows.push((server.name, rps));
    }
    let best = |name: &str| rows.iter().filter(|r| r.0 == name).map(|r| r.1).fold(0.0, f64::max);
    let ratio = best("nvidia-webhook") / best("baseline");
    println!("throughput ratio nvidia-webhook / baseline: {ratio:.3}");
    for server in [&baseline, &webhook, &baseline, &webhook] {
        let (p50, p99, behind) = fixed_rate(server.addr, &bundle.ca_cert, &body, 1000, duration).await;
        println!(
            "{:15} at 1000 req/s: p50 {:6.3} ms  p99 {:6.3} ms  ({behind} requests waited for the previous response)",
            server.name,
            ms(p50),
            ms(p99)
        );
    }
    for server in [&baseline, &webhook] {
        let mut sender = attack::connect(server.addr, &bundle.ca_cert).await;
        let mut times = Vec::new();
        for _ in 0..if quick { 5 } else { 25 } {
            times.push(post(&mut sender, &huge).await);
        }
        times.sort();
        println!(
            "{:15} {} byte pod: median {:6.3} ms  max {:6.3} ms",
            server.name,
            huge.len(),
            ms(percentile(&times, 0.5)),
            ms(*times.last().unwrap_or(&Duration::ZERO))
        );
    }
    for server in [&baseline, &webhook] {
        println!("{:15} peak RSS {:.1} MiB", server.name, server.peak_rss_kib() as f64 / 1024.0);
    }
    drop((webhook, baseline));
    under_attack(dir.path(), &body, quick).await;
}

/// Ordinary reviews at a fixed rate while 1,000 slow connections (500 that never finish the TLS
/// handshake, 500 that never finish a request head) and one HTTP/2 connection with 100 streams of
/// almost 4 MiB that never finish are held open: p99 of the ordinary reviews and the server's
/// RSS, for the baseline (no limits) and nvidia-webhook (default limits), each in a fresh process.
async fn under_attack(dir: &Path, body: &Bytes, quick: bool) {
    println!("# under attack: 1000 slow connections + 1 HTTP/2 connection with 100 unfinished ~4 MiB streams");
    let duration = if quick { Duration::from_secs(2) } else { Duration::from_secs(6) };
    for name in ["baseline", "nvidia-webhook"] {
        let (server, ca) = if name == "baseline" {
            let (webhook, baseline) = start_servers(dir);
            drop(webhook);
            let ca = std::fs::read_to_string(dir.join("ca.crt")).expect("ca");
            (baseline, ca)
        } else {
            let (webhook, baseline) = start_servers(dir);
            drop(baseline);
            let ca = std::fs::read_to_string(dir.join("ca.crt")).expect("ca");
            (webhook, ca)
        };
        let mut warm = attack::connect(server.addr, &ca).await;
        post(&mut warm, body).await;
        let mut held = attack::slow_connections(server.addr, &ca, 500, 500).await;
        attack::unfinished_h2_streams(server.addr, &ca, 100, (4 << 20) - 64 * 1024, &mut held).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (p50, p99, behind) = fixed_rate(server.addr, &ca, body, 200, duration).await;
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap_or_default();
        let rss = |field: &str| -> f64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0
        };
        println!(
            "{name:15} ordinary reviews at 200 req/s: p50 {:6.3} ms  p99 {:6.3} ms ({behind} waited); RSS {:.1} MiB, peak {:.1} MiB",
            ms(p50),
            ms(p99),
            rss("VmRSS:"),
            rss("VmHWM:")
        );
        drop(held);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Where a request's time goes, in process (`-- --stages`).
fn stages() {
    use k8s_openapi::api::core::v1::Pod;
    let body = serde_json::to_vec(&fixture()).expect("json");
    let n = 20_000;
    let only = std::env::var("NVIDIA_BENCH_STAGE").ok();
    let time = |name: &str, f: &mut dyn FnMut()| {
        if only.as_deref().is_some_and(|only| name != only) {
            return;
        }
        let started = Instant::now();
        for _ in 0..n {
            f();
        }
        println!("{name:40} {:8.2} µs", started.elapsed().as_secs_f64() * 1e6 / n as f64);
    };
    time("parse as serde_json::Value", &mut || {
        std::hint::black_box(serde_json::from_slice::<Value>(&body).expect("value"));
    });
    time("parse as kube AdmissionReview<Pod>", &mut || {
        std::hint::black_box(
            serde_json::from_slice::<kube::core::admission::AdmissionReview<Pod>>(&body).expect("review"),
        );
    });
    let pod: Pod = serde_json::from_value(fixture()["request"]["object"].clone()).expect("pod");
    let config = nvidia_webhook::InjectConfig::new("img");
    time("mutate", &mut || {
        std::hint::black_box(nvidia_webhook::mutate(&pod, &config).expect("mutate"));
    });
    time("the wait container as JSON (once per settings)", &mut || {
        let wait = nvidia_webhook::mutate::wait_container(&config, None, false);
        std::hint::black_box(serde_json::to_value(&wait).expect("json"));
    });
    time("parse as the webhook's review (pod view)", &mut || {
        std::hint::black_box(nvidia_webhook::admission::parse_review(&body).expect("review"));
    });
    let (types, request) = nvidia_webhook::admission::parse_review(&body).expect("review");
    let request = request.expect("request");
    let state = nvidia_webhook::admission::AppState::new(config.clone());
    time("admit (mutate + patch encoding)", &mut || {
        std::hint::black_box(nvidia_webhook::admission::admit(&state, &request, types.clone()));
    });
    let response = nvidia_webhook::admission::admit(&state, &request, types.clone());
    time("encode the response", &mut || {
        std::hint::black_box(nvidia_webhook::admission::encode(response.clone()).expect("encode"));
    });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let bytes = Bytes::from(body.clone());
    let router = nvidia_webhook::admission::router(state.clone());
    time("router: POST /mutate end to end", &mut || {
        runtime.block_on(async {
            use tower::ServiceExt;
            let request = hyper::Request::post("/mutate").body(axum::body::Body::from(bytes.clone())).expect("request");
            let response = router.clone().oneshot(request).await.expect("response");
            std::hint::black_box(response.into_body().collect().await.expect("body"));
        })
    });
}
