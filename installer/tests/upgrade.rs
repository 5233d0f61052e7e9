//! The node's side of a live upgrade, through the kernel seam: driver A loaded and serving, B
//! asked for. Without an order, B is staged beside A and the node asks for an upgrade; with the
//! controller's order, A is unloaded only when nothing holds it, B is loaded and validated, and a
//! B that fails leaves A loaded again from the cache.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use integration_tests::kube::ApiServer;
use integration_tests::s3::S3Server;
use nvidia_contract::{DRIVER_READY_LABEL, DRIVER_VERSION_LABEL, UPGRADE_STATE_LABEL, UPGRADE_TARGET_ANNOTATION};
use nvidia_installer::node::api::{Report, Reporter};
use nvidia_installer::node::install::{InstallRequest, Upgrade, install};
use nvidia_installer::node::metrics;
use nvidia_installer::node::ready::{self, Readiness};
use nvidia_installer::upgrade::State;
use serde_json::{Value, json};

const NEW: &str = "550.163.01";
const MODULES: [&str; 3] = ["nvidia", "nvidia-uvm", "nvidia-modeset"];

/// A host serving driver A ([`DRIVER`]), with B ([`NEW`]) published too.
async fn serving_a() -> (S3Server, tempfile::TempDir, tempfile::TempDir, nvidia_contract::layout::Layout) {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    publish_bundle(&server, work.path(), KERNEL, DRIVER, 4096).await;
    publish_bundle(&server, work.path(), KERNEL, NEW, 4096).await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let kernel = SimKernel::new(host_dir.path());
    install(&layout, &request_for(&server, DRIVER, Upgrade::Manual), &kernel, &Reporter::Log).await.expect("install A");
    (server, work, host_dir, layout)
}

fn request_for(server: &S3Server, driver: &str, upgrade: Upgrade) -> InstallRequest {
    InstallRequest {
        stage: request(server, KERNEL, driver),
        modules: MODULES.iter().map(|m| (*m).to_owned()).collect(),
        compile: None,
        upgrade,
    }
}

fn ordered(state: State, wait: Duration) -> Upgrade {
    ordered_to(state, NEW, wait)
}

/// The controller's order `state`, towards `target`, as read from the Node.
fn ordered_to(state: State, target: &str, wait: Duration) -> Upgrade {
    Upgrade::Controller { order: Some((state, Some(target.to_owned()))), unload_wait: wait, recheck: true }
}

/// The upgrade states reported, each with the driver version it names.
fn moves(reports: &Arc<Mutex<Vec<Report>>>) -> Vec<(String, String)> {
    reports
        .lock()
        .expect("reports")
        .iter()
        .filter_map(|r| Some((r.reason.strip_prefix("upgrade:")?.to_owned(), r.driver_version.clone())))
        .collect()
}

fn states(reports: &Arc<Mutex<Vec<Report>>>) -> Vec<String> {
    moves(reports).into_iter().map(|(state, _)| state).collect()
}

fn loaded_version(host: &Path) -> Option<String> {
    std::fs::read_to_string(host.join("sys/module/nvidia/version")).ok().map(|v| v.trim().to_owned())
}

#[tokio::test]
async fn without_an_order_b_is_staged_beside_a_and_an_upgrade_is_asked_for() {
    let (server, _work, host_dir, layout) = serving_a().await;
    let kernel = SimKernel::new(host_dir.path());
    let reports = Arc::new(Mutex::new(Vec::new()));
    let request =
        request_for(&server, NEW, Upgrade::Controller { order: None, unload_wait: Duration::ZERO, recheck: true });
    let marker = install(&layout, &request, &kernel, &Reporter::Record(reports.clone())).await.expect("keeps A");
    assert_eq!(marker.driver_version, DRIVER, "A keeps serving");
    assert!(kernel.calls().is_empty(), "nothing asked of the kernel: {:?}", kernel.calls());
    assert!(layout.bundle(KERNEL, NEW).join("manifest.json").is_file(), "B is staged in the cache");
    assert_eq!(states(&reports), ["upgrade-required"]);
    assert_eq!(upgrade_seen(&layout), Some(("upgrade-required".to_owned(), NEW.to_owned())));
    assert!(matches!(ready::check(&layout, Some(DRIVER)), Readiness::Ready(_)));
    // Asked again while the controller works on it, the node does not start over.
    let request = request_for(&server, NEW, ordered(State::Draining, Duration::ZERO));
    let reports = Arc::new(Mutex::new(Vec::new()));
    install(&layout, &request, &kernel, &Reporter::Record(reports.clone())).await.expect("keeps A");
    assert!(states(&reports).is_empty(), "{:?}", states(&reports));
    assert_eq!(
        upgrade_seen(&layout),
        Some(("draining".to_owned(), NEW.to_owned())),
        "the node's metrics show the order it read"
    );
}

/// The upgrade state and target the last run recorded for the node's metrics.
fn upgrade_seen(layout: &nvidia_contract::layout::Layout) -> Option<(String, String)> {
    metrics::read_record(layout).and_then(|r| r.upgrade).map(|u| (u.state, u.target))
}

#[tokio::test]
async fn the_ordered_switch_unloads_a_loads_b_from_the_cache_and_reports_done() {
    let (server, _work, host_dir, layout) = serving_a().await;
    // B staged earlier (as the unordered run did); the switch needs no bucket.
    let stage =
        request_for(&server, NEW, Upgrade::Controller { order: None, unload_wait: Duration::ZERO, recheck: true });
    install(&layout, &stage, &SimKernel::new(host_dir.path()), &Reporter::Log).await.expect("stage B");
    server.log().clear();
    let kernel = SimKernel::new(host_dir.path());
    let reports = Arc::new(Mutex::new(Vec::new()));
    let request = request_for(&server, NEW, ordered(State::Unloading, Duration::from_secs(5)));
    let marker = install(&layout, &request, &kernel, &Reporter::Record(reports.clone())).await.expect("switch");
    assert_eq!(marker.driver_version, NEW);
    assert_eq!(loaded_version(host_dir.path()).as_deref(), Some(NEW));
    let calls = kernel.calls();
    let unloads: Vec<_> =
        calls.iter().filter_map(|c| if let Call::Unload(m) = c { Some(m.as_str()) } else { None }).collect();
    assert_eq!(unloads.last(), Some(&"nvidia"), "users first, nvidia last: {unloads:?}");
    assert_eq!(unloads.len(), 3);
    let first_load = calls.iter().position(|c| matches!(c, Call::Load(_))).expect("loads");
    let last_unload = calls.iter().rposition(|c| matches!(c, Call::Unload(_))).expect("unloads");
    assert!(last_unload < first_load, "B loads only after A is gone: {calls:?}");
    assert_eq!(states(&reports), ["installing", "validating", "done"]);
    assert_eq!(std::fs::read_link(layout.current()).expect("current"), Path::new("cache").join(KERNEL).join(NEW));
    assert!(layout.bundle(KERNEL, DRIVER).join("manifest.json").is_file(), "A stays in the cache for a rollback");
    assert_eq!(server.log().len(), 0, "the switch came from the cache: no request to the bucket");
    let record = metrics::read_record(&layout).expect("the run is recorded");
    assert_eq!(upgrade_seen(&layout), Some(("done".to_owned(), NEW.to_owned())));
    assert!(record.success);
    assert_eq!(record.downloaded_bytes, 0);
    let stage = record.stage_duration_seconds.expect("the stage step's time");
    assert!(stage <= record.duration_seconds, "staging is part of the run: {stage} > {}", record.duration_seconds);
}

#[tokio::test]
async fn a_process_holding_the_device_blocks_the_unload_and_is_named() {
    let (server, _work, host_dir, layout) = serving_a().await;
    let process = host_dir.path().join("proc/31337");
    std::fs::create_dir_all(process.join("fd")).expect("fd");
    std::fs::write(process.join("comm"), "train.py\n").expect("comm");
    std::os::unix::fs::symlink("/dev/nvidia0", process.join("fd/12")).expect("fd");
    let kernel = SimKernel::new(host_dir.path());
    let reports = Arc::new(Mutex::new(Vec::new()));
    let request = request_for(&server, NEW, ordered(State::Unloading, Duration::from_millis(300)));
    let marker = install(&layout, &request, &kernel, &Reporter::Record(reports.clone())).await.expect("keeps A");
    assert_eq!(marker.driver_version, DRIVER);
    assert!(kernel.calls().is_empty(), "nothing unloaded while in use: {:?}", kernel.calls());
    let failed =
        reports.lock().expect("reports").iter().find(|r| r.reason == "upgrade:failed").cloned().expect("failed");
    assert!(failed.message.contains("process 31337 (train.py) has /dev/nvidia0 open"), "{}", failed.message);
    assert!(matches!(ready::check(&layout, Some(DRIVER)), Readiness::Ready(_)), "A still serves");
    assert_eq!(loaded_version(host_dir.path()).as_deref(), Some(DRIVER));
}

#[tokio::test]
async fn a_b_that_fails_to_load_leaves_a_loaded_again_and_the_node_usable() {
    let (server, _work, host_dir, layout) = serving_a().await;
    let mut kernel = SimKernel::new(host_dir.path());
    kernel.fail_version = Some(NEW.to_owned());
    let reports = Arc::new(Mutex::new(Vec::new()));
    let request = request_for(&server, NEW, ordered(State::Unloading, Duration::from_secs(5)));
    let marker = install(&layout, &request, &kernel, &Reporter::Record(reports.clone())).await.expect("A again");
    assert_eq!(marker.driver_version, DRIVER);
    assert_eq!(loaded_version(host_dir.path()).as_deref(), Some(DRIVER));
    assert!(matches!(ready::check(&layout, Some(DRIVER)), Readiness::Ready(_)), "the node serves A again");
    assert_eq!(
        std::fs::read_link(layout.current()).expect("current"),
        Path::new("cache").join(KERNEL).join(DRIVER),
        "current points at A again"
    );
    let recorded = reports.lock().expect("reports").clone();
    let failed = recorded.iter().find(|r| r.reason == "upgrade:failed").expect("failed");
    assert!(failed.message.contains(&format!("driver {NEW} failed")), "{}", failed.message);
    assert!(failed.message.contains(&format!("driver {DRIVER} is loaded again")), "{}", failed.message);
    assert_eq!(upgrade_seen(&layout), Some(("failed".to_owned(), NEW.to_owned())));
    // The failed upgrade is not tried again by itself.
    let again = request_for(&server, NEW, ordered(State::Failed, Duration::from_secs(5)));
    let reports = Arc::new(Mutex::new(Vec::new()));
    let kernel = SimKernel::new(host_dir.path());
    install(&layout, &again, &kernel, &Reporter::Record(reports.clone())).await.expect("keeps A");
    assert!(kernel.calls().is_empty());
    assert!(states(&reports).is_empty());
}

/// A release rolled back while the node was being drained for B: A, still loaded, is what is
/// wanted again, so the upgrade is over and the controller may uncordon the node.
#[tokio::test]
async fn a_rollback_to_the_loaded_driver_ends_the_upgrade() {
    let (server, _work, host_dir, layout) = serving_a().await;
    let kernel = SimKernel::new(host_dir.path());
    let reports = Arc::new(Mutex::new(Vec::new()));
    let request = request_for(&server, DRIVER, ordered(State::Draining, Duration::from_secs(5)));
    let marker = install(&layout, &request, &kernel, &Reporter::Record(reports.clone())).await.expect("A");
    assert_eq!(marker.driver_version, DRIVER);
    assert_eq!(states(&reports), ["done"]);
    assert!(!kernel.calls().iter().any(|c| matches!(c, Call::Unload(_))), "A stays loaded");
}

/// A second `helm upgrade` while the controller drains the node for B: the node keeps its state
/// (and its place in the rollout) and moves the target, instead of asking again from the start.
#[tokio::test]
async fn a_new_target_mid_rollout_keeps_the_controllers_state() {
    let (server, _work, host_dir, layout) = serving_a().await;
    let kernel = SimKernel::new(host_dir.path());
    let reports = Arc::new(Mutex::new(Vec::new()));
    let order = ordered_to(State::Draining, "560.35.03", Duration::from_secs(1));
    let marker = install(&layout, &request_for(&server, NEW, order), &kernel, &Reporter::Record(reports.clone()))
        .await
        .expect("A");
    assert_eq!(marker.driver_version, DRIVER);
    let moved = moves(&reports);
    let moved = moved.first().expect("a state");
    assert_eq!((moved.0.as_str(), moved.1.as_str()), ("draining", NEW));
    assert!(kernel.calls().is_empty());
}

/// A second `helm upgrade` after the node was drained and ordered to switch for another version:
/// the node switches to the version wanted now, without being drained again.
#[tokio::test]
async fn an_ordered_switch_goes_to_the_target_wanted_now() {
    let (server, _work, host_dir, layout) = serving_a().await;
    let kernel = SimKernel::new(host_dir.path());
    let reports = Arc::new(Mutex::new(Vec::new()));
    let order = ordered_to(State::Unloading, "560.35.03", Duration::from_secs(5));
    let marker = install(&layout, &request_for(&server, NEW, order), &kernel, &Reporter::Record(reports.clone()))
        .await
        .expect("switch");
    assert_eq!(marker.driver_version, NEW);
    assert_eq!(loaded_version(host_dir.path()).as_deref(), Some(NEW));
    let moved = moves(&reports);
    let moved: Vec<(&str, &str)> = moved.iter().map(|(s, v)| (s.as_str(), v.as_str())).collect();
    assert_eq!(moved, [("installing", NEW), ("validating", NEW), ("done", NEW)]);
}

/// When neither the new driver nor the old one loads again, the node has no working driver: it is
/// not marked `failed` (which would uncordon it) but keeps its state with the reason, and the run
/// fails so that the kubelet runs it again.
#[tokio::test]
async fn no_working_driver_keeps_the_node_cordoned() {
    let (server, _work, host_dir, layout) = serving_a().await;
    let mut kernel = SimKernel::new(host_dir.path());
    kernel.fail = Some(("nvidia-smi".to_owned(), 9));
    let reports = Arc::new(Mutex::new(Vec::new()));
    let request = request_for(&server, NEW, ordered(State::Unloading, Duration::from_secs(5)));
    let error = install(&layout, &request, &kernel, &Reporter::Record(reports.clone())).await.expect_err("no driver");
    assert!(error.to_string().contains("failed too"), "{error}");
    let states = states(&reports);
    assert!(!states.iter().any(|s| s == "failed" || s == "done"), "{states:?}");
    assert_eq!(states.last().map(String::as_str), Some("installing"), "{states:?}");
    assert!(matches!(ready::check(&layout, None), Readiness::NotReady(_)));
}

const NODE: &str = "gpu-0";
const NODE_PATH: &str = "/api/v1/nodes/gpu-0";

/// The node's Node in the loopback API, in upgrade state `state` towards [`NEW`], and a reporter
/// that talks to it as the installer pod's does.
async fn node_in_api(dir: &Path, state: &str) -> (ApiServer, Reporter) {
    let api = ApiServer::start();
    api.insert(
        NODE_PATH,
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": NODE, "labels": {UPGRADE_STATE_LABEL: state}, "annotations": {UPGRADE_TARGET_ANNOTATION: NEW}},
               "spec": {"unschedulable": true}}),
    );
    let kubeconfig = kube::config::Kubeconfig::read_from(api.kubeconfig(dir)).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .expect("config");
    let client = kube::Client::try_from(config).expect("client");
    (api, Reporter::Kube { client, node: NODE.to_owned() })
}

fn node_state(api: &ApiServer) -> Option<String> {
    api.object(NODE_PATH).and_then(|n| n["metadata"]["labels"][UPGRADE_STATE_LABEL].as_str().map(str::to_owned))
}

/// The upgrade states the node side wrote, with the answer each write got.
fn state_writes(api: &ApiServer) -> Vec<(String, u16)> {
    api.writes()
        .iter()
        .filter(|w| w.method == "PATCH" && w.path == NODE_PATH)
        .filter_map(|w| Some((w.body["metadata"]["labels"][UPGRADE_STATE_LABEL].as_str()?.to_owned(), w.status)))
        .collect()
}

/// The controller gave the node up (`failed`: it was NotReady past the switch timeout) after this
/// run read its order: read again just before unloading, the order no longer stands, and A stays.
#[tokio::test]
async fn an_order_withdrawn_before_the_unload_is_not_carried_out() {
    let (server, _work, host_dir, layout) = serving_a().await;
    let (api, reporter) = node_in_api(host_dir.path(), "failed").await;
    let kernel = SimKernel::new(host_dir.path());
    let request = request_for(&server, NEW, ordered(State::Unloading, Duration::from_secs(5)));
    let marker = install(&layout, &request, &kernel, &reporter).await.expect("A keeps serving");
    assert_eq!(marker.driver_version, DRIVER);
    assert!(kernel.calls().is_empty(), "nothing unloaded: {:?}", kernel.calls());
    assert_eq!(loaded_version(host_dir.path()).as_deref(), Some(DRIVER));
    assert_eq!(node_state(&api).as_deref(), Some("failed"), "the controller's state stands");
    assert!(state_writes(&api).is_empty(), "no state written: {:?}", state_writes(&api));
    assert_eq!(upgrade_seen(&layout), Some(("failed".to_owned(), NEW.to_owned())));
}

/// The Node changed between the order's read and the write of `installing` (409 Conflict on the
/// write, which carries the version read): it is read again, the order still stands, the switch
/// goes on.
#[tokio::test]
async fn a_node_changed_meanwhile_is_read_again_before_the_unload() {
    let (server, _work, host_dir, layout) = serving_a().await;
    let (api, reporter) = node_in_api(host_dir.path(), "unloading").await;
    // Another writer (the kubelet, say) changes the Node right after the node side reads it.
    api.change_after_next("GET", NODE_PATH, NODE_PATH, |node| {
        node["metadata"]["labels"]["example.com/other"] = json!("changed");
    });
    let kernel = SimKernel::new(host_dir.path());
    let request = request_for(&server, NEW, ordered(State::Unloading, Duration::from_secs(5)));
    let marker = install(&layout, &request, &kernel, &reporter).await.expect("switch");
    assert_eq!(marker.driver_version, NEW);
    assert_eq!(
        state_writes(&api),
        [
            ("installing".to_owned(), 409),
            ("installing".to_owned(), 200),
            ("validating".to_owned(), 200),
            ("done".to_owned(), 200)
        ]
    );
    let versions: Vec<Value> = api
        .writes()
        .into_iter()
        .filter(|w| w.method == "PATCH" && !w.body["metadata"]["labels"][UPGRADE_STATE_LABEL].is_null())
        .take(2)
        .map(|w| w.body["metadata"]["resourceVersion"].clone())
        .collect();
    assert!(versions.iter().all(Value::is_string), "both writes are conditional: {versions:?}");
    assert_ne!(versions[0], versions[1], "the second carries the version read again");
    assert_eq!(node_state(&api).as_deref(), Some("done"));
}

/// The controller gives the node up (`failed`) between the node side's read of its order and its
/// write of `installing`: the write is refused, the order read again is gone, and A stays.
#[tokio::test]
async fn a_give_up_between_the_read_and_the_write_keeps_a() {
    let (server, _work, host_dir, layout) = serving_a().await;
    let (api, reporter) = node_in_api(host_dir.path(), "unloading").await;
    api.change_after_next("GET", NODE_PATH, NODE_PATH, |node| {
        node["metadata"]["labels"][UPGRADE_STATE_LABEL] = json!("failed");
        node["spec"]["unschedulable"] = json!(false);
    });
    let kernel = SimKernel::new(host_dir.path());
    let request = request_for(&server, NEW, ordered(State::Unloading, Duration::from_secs(5)));
    let marker = install(&layout, &request, &kernel, &reporter).await.expect("A keeps serving");
    assert_eq!(marker.driver_version, DRIVER);
    assert!(kernel.calls().is_empty(), "nothing unloaded: {:?}", kernel.calls());
    assert_eq!(state_writes(&api), [("installing".to_owned(), 409)], "refused, and not tried again");
    assert_eq!(node_state(&api).as_deref(), Some("failed"), "the controller's state stands");
    assert!(matches!(ready::check(&layout, Some(DRIVER)), Readiness::Ready(_)));
}

/// The new driver cannot be staged (not in the bucket) while the controller drains the node: A
/// keeps serving with its marker, the controller's state is not written over, and the run fails
/// (the kubelet runs it again).
#[tokio::test]
async fn a_new_driver_that_cannot_be_staged_leaves_a_serving_and_the_state_alone() {
    let (server, _work, host_dir, layout) = serving_a().await;
    let kernel = SimKernel::new(host_dir.path());
    let reports = Arc::new(Mutex::new(Vec::new()));
    let missing = "560.35.03";
    let order = ordered_to(State::Draining, missing, Duration::from_secs(1));
    let error = install(&layout, &request_for(&server, missing, order), &kernel, &Reporter::Record(reports.clone()))
        .await
        .expect_err("nothing to stage");
    assert!(error.to_string().contains(missing), "{error}");
    assert!(kernel.calls().is_empty());
    assert!(states(&reports).is_empty(), "{:?}", states(&reports));
    assert!(matches!(ready::check(&layout, Some(DRIVER)), Readiness::Ready(_)), "A's marker stays");
    let reported = reports.lock().expect("reports").last().cloned().expect("a report");
    assert!(reported.ready && reported.driver_version == DRIVER, "{reported:?}");
    // The same without the controller (the manual way): A and its marker stay.
    install(&layout, &request_for(&server, missing, Upgrade::Manual), &kernel, &Reporter::Log)
        .await
        .expect_err("nothing to stage");
    assert!(matches!(ready::check(&layout, Some(DRIVER)), Readiness::Ready(_)), "A's marker stays");
    assert!(kernel.calls().is_empty());
}

/// The Node cannot be read again before the unload: nothing is unloaded, A's ready marker and the
/// controller's state stay, the node reports A ready, and the run fails (the kubelet runs it again).
#[tokio::test]
async fn an_order_that_cannot_be_read_again_leaves_a_serving() {
    let (server, _work, host_dir, layout) = serving_a().await;
    let (api, reporter) = node_in_api(host_dir.path(), "unloading").await;
    api.fail_next("GET", NODE_PATH, 403);
    let kernel = SimKernel::new(host_dir.path());
    let request = request_for(&server, NEW, ordered(State::Unloading, Duration::from_secs(5)));
    let error = install(&layout, &request, &kernel, &reporter).await.expect_err("the run fails");
    assert!(error.to_string().contains("403") || error.to_string().contains("reading"), "{error}");
    assert!(kernel.calls().is_empty(), "nothing unloaded: {:?}", kernel.calls());
    assert!(matches!(ready::check(&layout, Some(DRIVER)), Readiness::Ready(_)), "A's marker stays");
    assert_eq!(node_state(&api).as_deref(), Some("unloading"));
    assert!(state_writes(&api).is_empty(), "{:?}", state_writes(&api));
    let node = api.object(NODE_PATH).expect("node");
    assert_eq!(node["metadata"]["labels"][DRIVER_READY_LABEL], json!("true"), "{node}");
    assert_eq!(node["metadata"]["labels"][DRIVER_VERSION_LABEL], json!(DRIVER), "{node}");
}
