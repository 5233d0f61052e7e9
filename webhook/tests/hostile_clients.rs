//! The webhook's memory is bounded by its configuration, not by its clients: 1,000 slow
//! connections (more than the connection limit), an HTTP/2 connection with 100 unfinished, almost
//! 4 MiB streams, clients that declare 4 MiB bodies and send nothing, and request heads beyond the
//! limit — while ordinary reviews keep being answered, and the server process stays below the
//! chart's memory limit.

mod support;

use std::path::Path;
use std::time::Duration;

use support::attack::{self, Webhook};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The chart's memory limit for the webhook container (`webhook.resources.limits.memory` in the
/// chart's values.yaml), in KiB.
fn chart_memory_limit_kib() -> u64 {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../chart/values.yaml");
    let values: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).expect("values.yaml")).expect("values.yaml parses");
    let limit = values["webhook"]["resources"]["limits"]["memory"].as_str().expect("a memory limit").to_owned();
    let nanos = nvidia_webhook::quantity::nanos(&limit).expect("a quantity");
    u64::try_from(nanos / 1_000_000_000 / 1024).expect("fits")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_greedy_clients_do_not_take_memory_or_service_from_others() {
    let dir = tempfile::tempdir().expect("dir");
    let webhook = Webhook::start(
        Path::new(env!("CARGO_BIN_EXE_nvidia-webhook")),
        dir.path(),
        &["--header-timeout", "3s", "--handshake-timeout", "3s", "--body-timeout", "4s"],
    );
    let review = attack::review();
    let mut first = attack::connect(webhook.addr, &webhook.ca).await;
    assert_eq!(attack::post(&mut first, &review).await.0, 200, "the server is up");
    // An ordinary client (the API server) keeps sending reviews on its connection throughout.
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let steady = {
        let (addr, ca, review) = (webhook.addr, webhook.ca.clone(), review.clone());
        tokio::spawn(async move {
            let mut ordinary = attack::connect(addr, &ca).await;
            let mut statuses = Vec::new();
            loop {
                statuses.push(attack::post(&mut ordinary, &review).await.0);
                tokio::select! {
                    _ = stopped.changed() => return statuses,
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        })
    };

    // More slow connections than the server keeps (512): new ones take the places of the oldest
    // that never got a request through, so the server neither grows nor locks anyone out.
    let mut held = attack::slow_connections(webhook.addr, &webhook.ca, 500, 500).await;
    attack::unfinished_h2_streams(webhook.addr, &webhook.ca, 100, (4 << 20) - 64 * 1024, &mut held).await;
    // Clients that declare the largest body and send none of it.
    let declared = attack::declared_but_unsent(webhook.addr, &webhook.ca, 8, 4 << 20).await;
    // Let the greedy streams push what flow control lets them.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Ordinary reviews, on the connection opened before and on fresh ones, are answered.
    for _ in 0..10 {
        let mut fresh = attack::connect(webhook.addr, &webhook.ca).await;
        assert_eq!(attack::post(&mut fresh, &review).await.0, 200);
    }
    // A request head beyond the limit is refused, not buffered.
    let mut oversized = attack::tls(webhook.addr, &webhook.ca, b"http/1.1").await;
    let head = format!("POST /mutate HTTP/1.1\r\nHost: localhost\r\nX-Padding: {}\r\n\r\n", "a".repeat(100 * 1024));
    let _ = oversized.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), oversized.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");

    let _ = stop.send(true);
    let statuses = steady.await.expect("the steady client");
    println!("{} reviews on the steady connection during the attack", statuses.len());
    assert!(statuses.len() >= 10 && statuses.iter().all(|s| *s == 200), "{statuses:?}");

    let (rss, peak) = webhook.rss_kib();
    let limit = chart_memory_limit_kib();
    assert!(limit >= 64 * 1024, "the chart's limit reads as {limit} KiB");
    println!("under attack: RSS {rss} KiB, peak {peak} KiB (chart limit {limit} KiB)");
    assert!(peak < limit, "peak RSS {peak} KiB under attack (now {rss} KiB)");

    // No greedy stream was ever taken as a review: each was refused (503), timed out (408), or
    // held back by the stream limit.
    let mut answered = std::collections::BTreeMap::new();
    for stream in held.streams.drain(..) {
        let status = tokio::time::timeout(Duration::from_secs(6), stream).await.ok().and_then(Result::ok).flatten();
        *answered.entry(status).or_insert(0) += 1;
    }
    println!("greedy streams by answer: {answered:?}");
    assert!(!answered.contains_key(&Some(200)), "{answered:?}");

    // Slow connections are closed by the timeouts (or evicted), and the metrics say so.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let metrics = metrics(&webhook).await;
    let gauge = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    let open = gauge("nvidia_webhook_connections");
    println!("{open} connections open after the timeouts");
    assert!(open < 50.0, "{open} connections still open after the timeouts:\n{metrics}");
    drop((held, declared));
}

async fn metrics(webhook: &Webhook) -> String {
    let mut sender = attack::connect(webhook.addr, &webhook.ca).await;
    sender.ready().await.expect("ready");
    let request = hyper::Request::get("/metrics")
        .header("host", "localhost")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.expect("metrics");
    let body = http_body_util::BodyExt::collect(response.into_body()).await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}
