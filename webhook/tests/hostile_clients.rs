//! The webhook's memory is bounded by its configuration, not by its clients: 1,000 slow
//! connections and an HTTP/2 connection with 100 unfinished, almost 4 MiB streams, while ordinary
//! reviews keep being answered, and the server process stays below the chart's memory limit.

mod support;

use std::path::Path;
use std::time::Duration;

use support::attack::{self, Webhook};

/// The chart's memory limit for the webhook container (`webhook.resources.limits.memory` in the
/// chart's values.yaml), in KiB.
fn chart_memory_limit_kib() -> u64 {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../chart/values.yaml");
    let values: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).expect("values.yaml")).expect("values.yaml parses");
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
        &["--header-timeout", "3s", "--handshake-timeout", "3s"],
    );
    let review = attack::review();
    let mut ordinary = attack::connect(webhook.addr, &webhook.ca).await;
    assert_eq!(attack::post(&mut ordinary, &review).await.0, 200);

    let mut held = attack::slow_connections(webhook.addr, &webhook.ca, 500, 500).await;
    attack::unfinished_h2_streams(webhook.addr, &webhook.ca, 100, (4 << 20) - 64 * 1024, &mut held).await;
    // Let the greedy streams push what flow control lets them.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Ordinary reviews, on a connection opened before and on fresh ones, are answered.
    for _ in 0..50 {
        assert_eq!(attack::post(&mut ordinary, &review).await.0, 200);
    }
    for _ in 0..10 {
        let mut fresh = attack::connect(webhook.addr, &webhook.ca).await;
        assert_eq!(attack::post(&mut fresh, &review).await.0, 200);
    }
    let (rss, peak) = webhook.rss_kib();
    let limit = chart_memory_limit_kib();
    assert!(limit >= 64 * 1024, "the chart's limit reads as {limit} KiB");
    assert!(peak < limit, "peak RSS {peak} KiB under attack (now {rss} KiB)");

    // The greedy streams were refused (503) beyond the connection's budget, not buffered.
    let mut refused = 0;
    for stream in held.streams.drain(..) {
        if let Ok(Ok(Some(503))) = tokio::time::timeout(Duration::from_secs(1), stream).await {
            refused += 1;
        }
    }
    println!("under attack: RSS {rss} KiB, peak {peak} KiB; {refused} of 100 greedy streams refused");
    assert!(refused >= 90, "only {refused} of 100 greedy streams were refused");

    // Slow connections are closed by the handshake and header timeouts.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let metrics = metrics(&webhook, &review).await;
    let open: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nvidia_webhook_connections "))
        .and_then(|v| v.trim().parse().ok())
        .expect("connections gauge");
    println!("{open} connections open after the timeouts");
    assert!(open < 50.0, "{open} connections still open after the timeouts:\n{metrics}");
    drop(held);
}

async fn metrics(webhook: &Webhook, _review: &bytes::Bytes) -> String {
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
