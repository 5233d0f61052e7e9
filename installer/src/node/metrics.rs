//! The node's metrics in the Prometheus text format: from the host's state (the ready marker, the
//! cache, the loaded module) and the record `install` leaves of its last run. `status --watch`
//! serves them over HTTP (`--metrics-listen`) and/or writes them for node-exporter's textfile
//! collector (`--metrics-textfile`); both read the same files, so a restarted `status` container
//! loses nothing.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::durable::write_atomic;
use crate::node::ready::MAX_STATE_BYTES;
use crate::node::status::Status;
use crate::s3::ThrottleStats;
use crate::{Error, Result};
use nvidia_contract::layout::Layout;

/// What the last `install` did, and running totals over every run on this host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    pub success: bool,
    /// Unix seconds.
    pub finished_at: u64,
    pub duration_seconds: f64,
    pub driver_version: String,
    pub kernel_release: String,
    /// Bytes downloaded from the bucket by that run (0: the cache had the bundle).
    pub downloaded_bytes: u64,
    pub retries: u64,
    pub throttled: u64,
    /// The stage step's part of `duration_seconds` (absent: the run failed before staging ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_duration_seconds: Option<f64>,
    /// The node's driver upgrade as the run saw it: the state it recorded on the Node last, or
    /// else the order it read there (none: no upgrade state on the Node, or none read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<UpgradeSeen>,
    #[serde(default)]
    pub totals: Totals,
}

/// An upgrade state and the driver version it moves to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeSeen {
    pub state: String,
    pub target: String,
}

/// Counters over every run since the record was first written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub succeeded: u64,
    pub failed: u64,
    pub downloaded_bytes: u64,
    pub retries: u64,
    pub throttled: u64,
}

pub fn read_record(layout: &Layout) -> Option<RunRecord> {
    let bytes = crate::durable::read_regular(&layout.last_run(), MAX_STATE_BYTES).ok()??;
    serde_json::from_slice(&bytes).ok()
}

/// Record a finished `install` run: its figures, added to the totals of the runs before (its own
/// `totals` and `finished_at` are filled in here).
pub fn record_run(layout: &Layout, mut record: RunRecord) -> Result<RunRecord> {
    let mut totals = read_record(layout).map(|r| r.totals).unwrap_or_default();
    if record.success {
        totals.succeeded += 1;
    } else {
        totals.failed += 1;
    }
    totals.downloaded_bytes += record.downloaded_bytes;
    totals.retries += record.retries;
    totals.throttled += record.throttled;
    record.totals = totals;
    record.finished_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let bytes = serde_json::to_vec_pretty(&record)
        .map_err(|e| Error::Encode { what: "the run record", reason: e.to_string() })?;
    write_atomic(&layout.last_run(), &bytes)?;
    Ok(record)
}

/// The figures of one run, before [`record_run`] adds them up.
pub fn run_record(
    success: bool,
    duration: Duration,
    (driver_version, kernel_release): (&str, &str),
    s3: ThrottleStats,
) -> RunRecord {
    RunRecord {
        success,
        duration_seconds: duration.as_secs_f64(),
        driver_version: driver_version.to_owned(),
        kernel_release: kernel_release.to_owned(),
        downloaded_bytes: s3.received_bytes,
        retries: s3.retries,
        throttled: s3.throttled,
        ..RunRecord::default()
    }
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub(crate) struct Text(pub(crate) String);

impl Text {
    /// The text, opened with `nvidia_installer_build_info`.
    pub(crate) fn with_build_info() -> Self {
        let mut text = Self(String::new());
        text.metric(
            "nvidia_installer_build_info",
            "gauge",
            "The nvidia-installer that reports, as a label",
            &[(labels(&[("version", env!("CARGO_PKG_VERSION"))]), 1.0)],
        );
        text
    }

    pub(crate) fn metric(&mut self, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(self.0, "{name}{labels} {value}");
        }
    }
}

pub(crate) fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    format!("{{{}}}", inner.join(","))
}

/// The metrics of `status` (the node's state now) and `record` (the last install run).
pub fn render(status: &Status, record: Option<&RunRecord>) -> String {
    let mut text = Text::with_build_info();
    let plain = |v: f64| vec![(String::new(), v)];
    text.metric(
        "nvidia_installer_driver_ready",
        "gauge",
        "1 when the node's driver is ready for GPU pods (modules loaded, devices, nvidia-smi, marker of this boot)",
        &plain(if status.ready { 1.0 } else { 0.0 }),
    );
    let driver: Vec<(String, f64)> = status
        .marker
        .iter()
        .map(|m| {
            let flavor = status
                .staged
                .iter()
                .find(|b| b.driver_version == m.driver_version && b.kernel_release == m.kernel_release)
                .map_or("", |b| b.flavor.as_str());
            let pairs = [
                ("driver_version", m.driver_version.as_str()),
                ("kernel_release", m.kernel_release.as_str()),
                ("flavor", flavor),
            ];
            (labels(&pairs), 1.0)
        })
        .collect();
    text.metric(
        "nvidia_installer_driver_info",
        "gauge",
        "The driver the ready marker names, with its kernel and module flavor",
        &driver,
    );
    let loaded: Vec<(String, f64)> =
        status.loaded_module_version.iter().map(|v| (labels(&[("version", v)]), 1.0)).collect();
    text.metric("nvidia_installer_loaded_module_info", "gauge", "The version of the loaded nvidia module", &loaded);
    text.metric(
        "nvidia_installer_cached_bundles",
        "gauge",
        "Driver bundles in the node's cache",
        &plain(status.staged.len() as f64),
    );
    text.metric(
        "nvidia_installer_last_error_info",
        "gauge",
        "1 while the last install's failure is recorded on the node, with its driver version",
        &status
            .last_error
            .iter()
            .map(|e| (labels(&[("driver_version", e.driver_version.as_str())]), 1.0))
            .collect::<Vec<_>>(),
    );
    if let Some(record) = record {
        text.metric(
            "nvidia_installer_last_install_success",
            "gauge",
            "1 when the last install run succeeded",
            &plain(if record.success { 1.0 } else { 0.0 }),
        );
        text.metric(
            "nvidia_installer_last_install_timestamp_seconds",
            "gauge",
            "When the last install run finished (Unix time)",
            &plain(record.finished_at as f64),
        );
        text.metric(
            "nvidia_installer_last_install_duration_seconds",
            "gauge",
            "How long the last install run took: stage (download, verify, extract) and load",
            &plain(record.duration_seconds),
        );
        text.metric(
            "nvidia_installer_last_stage_duration_seconds",
            "gauge",
            "How long the last install run's stage step took (download, verify, extract; a cache hit is quick)",
            &record.stage_duration_seconds.map(plain).unwrap_or_default(),
        );
        let upgrade: Vec<(String, f64)> = record
            .upgrade
            .iter()
            .map(|u| (labels(&[("state", u.state.as_str()), ("target", u.target.as_str())]), 1.0))
            .collect();
        text.metric(
            "nvidia_installer_upgrade_state_info",
            "gauge",
            "The node's driver upgrade as the last install run saw it (the state it recorded last, or the order it read), with the target version",
            &upgrade,
        );
        text.metric(
            "nvidia_installer_last_install_downloaded_bytes",
            "gauge",
            "Bytes the last install run downloaded from the bucket (0: a cache hit)",
            &plain(record.downloaded_bytes as f64),
        );
        let totals = &record.totals;
        text.metric(
            "nvidia_installer_installs_total",
            "counter",
            "Install runs on this node, by outcome",
            &[
                (labels(&[("outcome", "success")]), totals.succeeded as f64),
                (labels(&[("outcome", "failure")]), totals.failed as f64),
            ],
        );
        text.metric(
            "nvidia_installer_s3_downloaded_bytes_total",
            "counter",
            "Bytes downloaded from the bucket by install runs on this node",
            &plain(totals.downloaded_bytes as f64),
        );
        text.metric(
            "nvidia_installer_s3_retries_total",
            "counter",
            "S3 requests repeated after a failure or throttling",
            &plain(totals.retries as f64),
        );
        text.metric(
            "nvidia_installer_s3_throttled_total",
            "counter",
            "S3 answers that asked to slow down (503 SlowDown, 429)",
            &plain(totals.throttled as f64),
        );
    }
    text.0
}

/// The metrics of the host now.
pub fn current(layout: &Layout, pin: Option<&str>) -> String {
    render(&crate::node::status::status(layout, pin), read_record(layout).as_ref())
}

/// Write the metrics for node-exporter's textfile collector (atomically: it never reads half).
pub fn write_textfile(path: &Path, text: &str) -> Result<()> {
    write_atomic(path, text.as_bytes())
}

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;
/// The longest a connection may stay (a scrape takes milliseconds).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve `GET /metrics` (and `/healthz`) over plain HTTP on `listen` until the process ends.
pub async fn serve(listen: SocketAddr, layout: Layout, pin: Option<String>) -> Result<()> {
    serve_rendered(bind(listen).await?, move || current(&layout, pin.as_deref())).await
}

/// Listen for metrics scrapes on `listen`.
pub async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::io("listening for metrics on", Path::new(&listen.to_string()), e))?;
    info!(%listen, "serving metrics at /metrics");
    Ok(listener)
}

/// Serve what `render` returns at `GET /metrics` (and `/healthz`). A connection that sends no
/// whole request head within 5 s is closed, and none stays longer than 10 s, so idle or slow
/// clients hold a slot only that long; a scrape queued behind them in the kernel's backlog is
/// answered next.
pub async fn serve_rendered(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
) -> Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let render = Arc::new(render);
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { return Ok(()) };
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "accepting a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let render = Arc::clone(&render);
                async move { Ok::<_, std::convert::Infallible>(answer(&request, render.as_ref())) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
            drop(slot);
        });
    }
}

fn answer(request: &Request<hyper::body::Incoming>, render: &(impl Fn() -> String + ?Sized)) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", render()),
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found: GET /metrics or /healthz\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::node::ready::ReadyMarker;

    fn status(ready: bool) -> Status {
        Status {
            driver_root: "/opt/nvidia-installer".into(),
            ready,
            reason: (!ready).then(|| "no ready marker".to_owned()),
            marker: ready.then(|| ReadyMarker {
                driver_version: "550.54.14".into(),
                kernel_release: "6.12.1\"evil\n".into(),
                sha256: String::new(),
                ready_at: String::new(),
                boot_id: None,
                bundle: String::new(),
                signed_by: None,
            }),
            current: None,
            staged: Vec::new(),
            loaded_module_version: Some("550.54.14".into()),
            last_error: None,
        }
    }

    #[test]
    fn ready_and_info_follow_the_state_and_labels_are_escaped() {
        let text = render(&status(true), None);
        assert!(text.contains("\nnvidia_installer_driver_ready 1\n"), "{text}");
        assert!(
            text.contains(
                "nvidia_installer_driver_info{driver_version=\"550.54.14\",kernel_release=\"6.12.1\\\"evil\\n\",flavor=\"\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("nvidia_installer_loaded_module_info{version=\"550.54.14\"} 1"));
        assert!(!text.contains("nvidia_installer_installs_total"), "no record, no run metrics");
        let text = render(&status(false), None);
        assert!(text.contains("\nnvidia_installer_driver_ready 0\n"), "{text}");
        assert!(!text.contains("nvidia_installer_driver_info{"), "{text}");
    }

    #[test]
    fn runs_add_up_in_the_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(dir.path(), "/opt/nvidia-installer");
        std::fs::create_dir_all(layout.root()).expect("root");
        let s3 = ThrottleStats { retries: 2, throttled: 1, limit: 4, received_bytes: 1000 };
        record_run(&layout, run_record(false, Duration::from_secs(3), ("1.0", "6.1"), s3)).expect("first");
        let mut second = run_record(true, Duration::from_millis(1500), ("1.0", "6.1"), ThrottleStats::default());
        second.stage_duration_seconds = Some(0.25);
        second.upgrade = Some(UpgradeSeen { state: "failed".into(), target: "1.0\"}".into() });
        let record = record_run(&layout, second).expect("second");
        assert_eq!(read_record(&layout), Some(record.clone()));
        assert_eq!(record.totals, Totals { succeeded: 1, failed: 1, downloaded_bytes: 1000, retries: 2, throttled: 1 });
        let text = render(&status(true), Some(&record));
        assert!(text.contains("nvidia_installer_last_stage_duration_seconds 0.25\n"), "{text}");
        assert!(
            text.contains("nvidia_installer_upgrade_state_info{state=\"failed\",target=\"1.0\\\"}\"} 1\n"),
            "the target is escaped: {text}"
        );
        // A run that saw no upgrade state and did not stage: no samples, the families still declared.
        let empty = render(&status(true), Some(&run_record(false, Duration::ZERO, ("1.0", "6.1"), s3)));
        assert!(!empty.contains("\nnvidia_installer_upgrade_state_info{"), "{empty}");
        assert!(!empty.contains("\nnvidia_installer_last_stage_duration_seconds "), "{empty}");
        assert!(empty.contains("# TYPE nvidia_installer_upgrade_state_info gauge\n"), "{empty}");
        assert!(text.contains("nvidia_installer_installs_total{outcome=\"success\"} 1\n"), "{text}");
        assert!(text.contains("nvidia_installer_installs_total{outcome=\"failure\"} 1\n"), "{text}");
        assert!(text.contains("nvidia_installer_s3_downloaded_bytes_total 1000\n"), "{text}");
        assert!(text.contains("nvidia_installer_last_install_duration_seconds 1.5\n"), "{text}");
        assert!(text.contains("# TYPE nvidia_installer_s3_retries_total counter\n"), "{text}");
    }

    /// The metric names docs/operations.md lists in its section `heading`.
    pub(crate) fn documented(heading: &str) -> std::collections::BTreeSet<String> {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md"))
            .expect("docs/operations.md");
        let section = doc.split(heading).nth(1).expect("the section").split("\n#").next().unwrap_or_default();
        section
            .lines()
            .filter_map(|line| line.strip_prefix("| `nvidia_installer_"))
            .map(|rest| format!("nvidia_installer_{}", rest.split(['`', '{']).next().unwrap_or_default()))
            .collect()
    }

    /// The metric names a text exposes samples of.
    pub(crate) fn exposed(text: &str) -> std::collections::BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect()
    }

    /// docs/operations.md lists exactly the metrics `render` exposes.
    #[test]
    fn the_documented_node_metrics_are_the_exposed_ones() {
        let documented = documented("### The node");
        let mut state = status(true);
        state.last_error =
            Some(crate::node::ready::LastError { reason: "r".into(), driver_version: "1".into(), at: String::new() });
        let record = RunRecord {
            stage_duration_seconds: Some(1.0),
            upgrade: Some(UpgradeSeen { state: "done".into(), target: "1".into() }),
            ..RunRecord::default()
        };
        assert_eq!(documented, exposed(&render(&state, Some(&record))));
    }

    /// Every slot held by a client that sends nothing: a scrape still gets its answer once the
    /// idle ones are cut, and they are.
    #[tokio::test]
    async fn idle_clients_cannot_keep_a_scrape_out() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(dir.path(), "/opt/nvidia-installer");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(serve_rendered(listener, move || current(&layout, None)));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(address).await.expect("connect"));
        }
        let scrape = async {
            let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
            stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n").await.expect("ask");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.expect("answer");
            answer
        };
        // Generous: the idle clients are cut after 5 s.
        let answer = tokio::time::timeout(Duration::from_secs(30), scrape).await.expect("the scrape was answered");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("\nnvidia_installer_driver_ready 0\n"), "{answer}");
        for mut stream in idle {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut byte)).await;
            assert!(matches!(read, Ok(Ok(0) | Err(_))), "the server closed the idle connection: {read:?}");
        }
    }
}
