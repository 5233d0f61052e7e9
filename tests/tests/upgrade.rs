//! The upgrade controller against the loopback Kubernetes API: ten GPU nodes waiting for a new
//! driver, pods with and without the driver on them, a PodDisruptionBudget that refuses one
//! eviction with 429 for a while, a node whose new driver fails, a node that goes NotReady once
//! ordered to switch, and the controller killed and started again in the middle. The nodes' side
//! (the installer pod's install step, which the DaemonSet starts again when the controller deletes
//! it) is played by this test through the API.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use integration_tests::fixtures::workspace_binary;
use integration_tests::kube::{ApiServer, now_rfc3339};
use nvidia_contract::{
    DRIVER_READY_LABEL, DRIVER_VERSION_LABEL, INIT_CONTAINER, UPGRADE_CORDONED_ANNOTATION, UPGRADE_REASON_ANNOTATION,
    UPGRADE_SINCE_ANNOTATION, UPGRADE_STATE_LABEL, UPGRADE_TARGET_ANNOTATION,
};
use serde_json::{Value, json};

const NODES: usize = 10;
const MAX_UNAVAILABLE: usize = 3;
const OLD: &str = "550.54.14";
const NEW: &str = "570.172.08";
/// The node whose new driver fails (its install step goes back to the old one).
const FAILING: &str = "gpu-07";
/// The node whose GPU pod a PodDisruptionBudget protects for a while.
const GUARDED: &str = "gpu-03";
/// How many evictions of the guarded pod its PodDisruptionBudget refuses.
const REFUSALS: usize = 24;
/// The node that goes NotReady once ordered to switch: its installer pod never comes back, and
/// the controller gives it up after the switch timeout so that the rollout goes on.
const LOST: &str = "gpu-05";
/// The controllers' lease: a holder acts for two thirds of it after each renewal, which leaves a
/// node's steps (cordon, state, Event) time enough on a loaded machine.
const LEASE_SECONDS: u64 = 3;

fn node_path(name: &str) -> String {
    format!("/api/v1/nodes/{name}")
}

fn pod_path(namespace: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/pods/{name}")
}

fn node_name(i: usize) -> String {
    format!("gpu-{i:02}")
}

/// A pod on `node`; `gpu`: with the injected `wait` init container and a GPU limit.
fn pod(namespace: &str, name: &str, node: &str, gpu: bool, labels: Value) -> Value {
    let mut spec = json!({"nodeName": node, "containers": [{"name": "main", "image": "app"}]});
    if gpu {
        spec["initContainers"] = json!([{"name": INIT_CONTAINER, "image": "installer"}]);
        spec["containers"][0]["resources"] = json!({"limits": {"nvidia.com/gpu": "1"}});
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "labels": labels, "creationTimestamp": "2026-01-01T00:00:00Z"},
           "spec": spec, "status": {"phase": "Running"}})
}

fn installer_pod(node: &str, generation: u32) -> Value {
    let mut pod = pod(
        "kube-system",
        &format!("nvidia-installer-{node}-{generation}"),
        node,
        false,
        json!({"app": "nvidia-installer"}),
    );
    pod["metadata"]["creationTimestamp"] = json!(now_rfc3339());
    pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "nvidia-installer", "uid": "ds-uid", "controller": true}]);
    pod
}

/// Ten nodes on the old driver, each asking for the new one as the install step asks.
fn cluster(api: &ApiServer) {
    for i in 0..NODES {
        let name = node_name(i);
        api.insert(
            &node_path(&name),
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": name, "labels": {DRIVER_READY_LABEL: "true", DRIVER_VERSION_LABEL: OLD, UPGRADE_STATE_LABEL: "upgrade-required"},
                                "annotations": {UPGRADE_TARGET_ANNOTATION: NEW}},
                   "spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        api.insert(
            &pod_path("ml", &format!("train-{name}")),
            pod("ml", &format!("train-{name}"), &name, true, json!({})),
        );
        api.insert(
            &pod_path("web", &format!("web-{name}")),
            pod("web", &format!("web-{name}"), &name, false, json!({})),
        );
        let installer = installer_pod(&name, 0);
        api.insert(&pod_path("kube-system", installer["metadata"]["name"].as_str().expect("name")), installer);
    }
    // A CPU-only node: not a GPU node, never touched.
    api.insert(
        &node_path("cpu-00"),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "cpu-00", "labels": {}}, "spec": {}}),
    );
    api.insert(&pod_path("web", "web-cpu-00"), pod("web", "web-cpu-00", "cpu-00", false, json!({})));
}

fn controller(kubeconfig: &Path, extra: &[&str]) -> Child {
    Command::new(workspace_binary("nvidia-installer"))
        .args(["upgrade-controller", "--namespace", "kube-system", "--installer-labels", "app=nvidia-installer"])
        .args(extra)
        .args(["--max-unavailable", &MAX_UNAVAILABLE.to_string(), "--interval", "150ms", "--drain-timeout", "1h"])
        .args(["--switch-timeout", "2s", "--lease-duration", &format!("{LEASE_SECONDS}s")])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("upgrade-controller")
}

/// A port free on loopback now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// The text at `GET /metrics` on loopback `port` (empty while nothing answers).
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: controller\r\nConnection: close\r\n\r\n");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

fn state(api: &ApiServer, node: &str) -> Option<String> {
    api.object(&node_path(node)).and_then(|n| n["metadata"]["labels"][UPGRADE_STATE_LABEL].as_str().map(str::to_owned))
}

/// The DaemonSet and the nodes' install step: a deleted installer pod comes back, and the new one
/// performs an ordered switch (`unloading` → `installing` → `done`, or `failed` on [`FAILING`]).
fn play_nodes(api: &ApiServer, stop: &AtomicBool) {
    let mut generation = 1;
    while !stop.load(Ordering::SeqCst) {
        for i in 0..NODES {
            let node = node_name(i);
            let present =
                api.objects("/api/v1/namespaces/kube-system/pods").iter().any(|p| p["spec"]["nodeName"] == json!(node));
            if present {
                continue;
            }
            let ordered = state(api, &node).as_deref() == Some("unloading");
            if node == LOST && ordered {
                // The node went away after the order: the kubelet reports nothing, no pod starts.
                if let Some(mut object) = api.object(&node_path(&node))
                    && object["status"]["conditions"][0]["status"] != json!("False")
                {
                    object["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
                    api.insert(&node_path(&node), object);
                }
                continue;
            }
            let pod = installer_pod(&node, generation);
            generation += 1;
            api.insert(&pod_path("kube-system", pod["metadata"]["name"].as_str().expect("name")), pod);
            if ordered {
                let Some(mut object) = api.object(&node_path(&node)) else { continue };
                let failed = node == FAILING;
                object["metadata"]["labels"][UPGRADE_STATE_LABEL] = json!(if failed { "failed" } else { "done" });
                object["metadata"]["annotations"][UPGRADE_SINCE_ANNOTATION] = json!(now_rfc3339());
                if failed {
                    object["metadata"]["annotations"][UPGRADE_REASON_ANNOTATION] = json!(format!(
                        "driver {NEW} failed: nvidia-smi failed; driver {OLD} is loaded again from the cache"
                    ));
                } else {
                    object["metadata"]["labels"][DRIVER_VERSION_LABEL] = json!(NEW);
                }
                api.insert(&node_path(&node), object);
            }
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// The most nodes cordoned at once, replaying every node patch the controller sent, in order.
fn most_cordoned_at_once(api: &ApiServer) -> usize {
    let mut cordoned = BTreeSet::new();
    let mut most = 0;
    for request in api.requests() {
        if request.method != "PATCH" || !request.path.starts_with("/api/v1/nodes/") || request.status >= 300 {
            continue;
        }
        let node = request.path.trim_start_matches("/api/v1/nodes/").to_owned();
        match request.body["spec"]["unschedulable"].as_bool() {
            Some(true) => {
                cordoned.insert(node);
            }
            Some(false) => {
                cordoned.remove(&node);
            }
            None => {}
        }
        most = most.max(cordoned.len());
    }
    most
}

#[test]
fn a_rollout_keeps_to_max_unavailable_through_a_pdb_a_failure_and_a_controller_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = Arc::new(ApiServer::start());
    cluster(&api);
    // The guarded pod's PodDisruptionBudget allows no disruption for its first evictions (more than
    // the API client's own retries of a 429 take).
    for _ in 0..REFUSALS {
        api.fail_next("POST", &format!("{}/eviction", pod_path("ml", &format!("train-{GUARDED}"))), 429);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let nodes = {
        let (api, stop) = (Arc::clone(&api), Arc::clone(&stop));
        std::thread::spawn(move || play_nodes(&api, &stop))
    };
    let kubeconfig = api.kubeconfig(dir.path());

    // The first controller, killed once some nodes are out; a second one carries on.
    let mut first = controller(&kubeconfig, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while (0..NODES).filter(|i| matches!(state(&api, &node_name(*i)).as_deref(), Some("done" | "failed"))).count() < 2 {
        assert!(Instant::now() < deadline, "no node finished within a minute");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The second starts while the first still runs (a pod left on a partitioned node while its
    // replacement starts): it stands by until the first, killed, leaves the lease unrenewed.
    let metrics = free_port();
    let listen = format!("127.0.0.1:{metrics}");
    let mut second = controller(&kubeconfig, &["--metrics-listen", &listen]);
    std::thread::sleep(Duration::from_millis(800));
    first.kill().expect("kill");
    let first_log = first.wait_with_output().expect("first controller");
    let finished = |api: &ApiServer| {
        (0..NODES).all(|i| {
            let node = api.object(&node_path(&node_name(i))).expect("node");
            matches!(state(api, &node_name(i)).as_deref(), Some("done" | "failed"))
                && node["spec"]["unschedulable"] != json!(true)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !finished(&api) {
        if Instant::now() > deadline {
            let _ = second.kill();
            let log = second.wait_with_output().expect("controller");
            let states: Vec<_> = (0..NODES).map(|i| (node_name(i), state(&api, &node_name(i)))).collect();
            panic!("rollout unfinished: {states:?}\n{}", String::from_utf8_lossy(&log.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Where the rollout stands, as the controller's metrics say once its last round has read it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = scrape(metrics);
    while !seen.contains("nvidia_installer_upgrade_nodes{state=\"done\"} 8\n") {
        assert!(Instant::now() < deadline, "the controller's metrics:\n{seen}");
        std::thread::sleep(Duration::from_millis(100));
        seen = scrape(metrics);
    }
    for line in [
        "nvidia_installer_upgrade_nodes{state=\"failed\"} 2\n",
        "nvidia_installer_upgrade_nodes{state=\"none\"} 0\n",
        "nvidia_installer_upgrade_nodes_out_of_service 0\n",
        &format!("nvidia_installer_upgrade_max_unavailable_nodes {MAX_UNAVAILABLE}\n"),
        "nvidia_installer_upgrade_controller_leader 1\n",
    ] {
        assert!(seen.contains(line), "{line}in\n{seen}");
    }
    assert!(seen.contains("nvidia_installer_upgrade_steps_total{action=\"uncordon\",outcome=\"ok\"}"), "{seen}");
    second.kill().expect("kill");
    let second_log = second.wait_with_output().expect("second controller");
    stop.store(true, Ordering::SeqCst);
    nodes.join().expect("nodes");
    let logs = format!("{}{}", String::from_utf8_lossy(&first_log.stderr), String::from_utf8_lossy(&second_log.stderr));
    // One controller acted at a time: the second did nothing before it took the lease over.
    let second_text = String::from_utf8_lossy(&second_log.stderr);
    let standing_by = second_text.find("standing by").unwrap_or_else(|| panic!("the second stood by\n{logs}"));
    let took_over = second_text.find("taking it over").unwrap_or_else(|| panic!("the second took over\n{logs}"));
    assert!(standing_by < took_over);
    for acted in ["cordoning", "upgrade state", "evicted", "deleting", "uncordoning"] {
        assert!(
            second_text.find(acted).is_none_or(|at| at > took_over),
            "the second {acted} while standing by\n{logs}"
        );
    }
    // The takeover came a whole lease duration after the first's last renewal.
    let lease_writes: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/leases") && matches!(r.method.as_str(), "POST" | "PUT") && r.status < 300)
        .collect();
    let takeover = lease_writes
        .windows(2)
        .find(|w| w[0].body["spec"]["holderIdentity"] != w[1].body["spec"]["holderIdentity"])
        .unwrap_or_else(|| panic!("the lease changed hands\n{logs}"));
    let waited = takeover[1].at.duration_since(takeover[0].at);
    assert!(waited >= Duration::from_secs(LEASE_SECONDS), "taken over {waited:?} after the last renewal");
    let lease = api
        .object("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/nvidia-installer-upgrade-controller")
        .expect("the lease");
    assert!(lease["spec"]["leaseTransitions"].as_i64().is_some_and(|n| n >= 1), "{lease}");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], json!(LEASE_SECONDS), "{lease}");

    assert!(
        most_cordoned_at_once(&api) <= MAX_UNAVAILABLE,
        "more than {MAX_UNAVAILABLE} nodes cordoned at once\n{logs}"
    );
    assert!(most_cordoned_at_once(&api) >= 2, "the rollout ran nodes in parallel");
    for i in 0..NODES {
        let name = node_name(i);
        let node = api.object(&node_path(&name)).expect("node");
        let annotations = &node["metadata"]["annotations"];
        if name == FAILING {
            assert_eq!(state(&api, &name).as_deref(), Some("failed"));
            assert!(annotations[UPGRADE_REASON_ANNOTATION].as_str().is_some_and(|r| r.contains("loaded again")));
            assert_eq!(node["metadata"]["labels"][DRIVER_VERSION_LABEL], json!(OLD));
        } else if name == LOST {
            assert_eq!(state(&api, &name).as_deref(), Some("failed"), "given up after the switch timeout");
            let reason = annotations[UPGRADE_REASON_ANNOTATION].as_str().unwrap_or_default();
            assert!(reason.contains("not performed within") && reason.contains("NotReady"), "{reason}");
            assert_eq!(node["metadata"]["labels"][DRIVER_VERSION_LABEL], json!(OLD));
        } else {
            assert_eq!(state(&api, &name).as_deref(), Some("done"), "{name}");
            assert_eq!(node["metadata"]["labels"][DRIVER_VERSION_LABEL], json!(NEW));
        }
        assert!(annotations[UPGRADE_CORDONED_ANNOTATION].is_null(), "{name}: uncordoned and forgotten");
        assert!(api.object(&pod_path("ml", &format!("train-{name}"))).is_none(), "{name}: the GPU pod was evicted");
        assert!(api.object(&pod_path("web", &format!("web-{name}"))).is_some(), "{name}: the CPU-only pod stays");
    }
    let requests = api.requests();
    let touched_cpu_pods = requests.iter().filter(|r| r.path.contains("/namespaces/web/") && r.method != "GET").count();
    assert_eq!(touched_cpu_pods, 0, "no CPU-only pod is evicted or deleted");
    assert!(
        !requests.iter().any(|r| r.path == node_path("cpu-00") && r.method == "PATCH"),
        "the CPU node is left alone"
    );
    let evictions = |status: u16| {
        requests.iter().filter(|r| r.path.ends_with(&format!("train-{GUARDED}/eviction")) && r.status == status).count()
    };
    assert_eq!(evictions(429), REFUSALS, "the PDB refused every time it was asked to");
    assert_eq!(evictions(201), 1, "then the eviction went through");
    let events: Vec<Value> = api.objects("/apis/events.k8s.io/v1/namespaces/default/events");
    let blocked = events
        .iter()
        .find(|e| e["reason"] == json!("EvictionBlocked"))
        .unwrap_or_else(|| panic!("an event names the blocking pod: {events:?}\n{logs}"));
    assert!(blocked["note"].as_str().is_some_and(|n| n.contains(&format!("ml/train-{GUARDED}"))), "{blocked}");
    assert_eq!(blocked["regarding"]["name"], json!(GUARDED));
    let given_up = events
        .iter()
        .find(|e| e["reason"] == json!("DriverUpgradeSkipped"))
        .unwrap_or_else(|| panic!("an event says the lost node was given up: {events:?}\n{logs}"));
    assert_eq!(given_up["regarding"]["name"], json!(LOST));
    assert_eq!(given_up["type"], json!("Warning"));
    assert!(given_up["note"].as_str().is_some_and(|n| n.contains("NotReady")), "{given_up}");
    // Every state the controller wrote was conditional on the Node's version it had read.
    let state_patches: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.starts_with("/api/v1/nodes/"))
        .filter(|r| !r.body["metadata"]["labels"][UPGRADE_STATE_LABEL].is_null())
        .collect();
    assert!(!state_patches.is_empty());
    assert!(state_patches.iter().all(|r| r.body["metadata"]["resourceVersion"].is_string()));
    let started = events.iter().filter(|e| e["reason"] == json!("DriverUpgradeStarted")).count();
    assert!(started >= NODES, "every node's start is recorded ({started})");
}

/// A node NotReady in `unloading` long past the switch timeout, whose Node changes between the
/// controller's list and its give-up (its `failed` is refused with 409 Conflict): nothing else is done on it
/// that round, and the next round gives it up, says so once, and uncordons it.
#[test]
fn a_give_up_the_node_refuses_is_planned_again_from_what_the_node_is_now() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = ApiServer::start();
    let since = "2026-01-01T00:00:00Z";
    api.insert(
        &node_path(LOST),
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": LOST, "labels": {DRIVER_READY_LABEL: "true", DRIVER_VERSION_LABEL: OLD, UPGRADE_STATE_LABEL: "unloading"},
                            "annotations": {UPGRADE_TARGET_ANNOTATION: NEW, UPGRADE_SINCE_ANNOTATION: since, UPGRADE_CORDONED_ANNOTATION: "true"}},
               "spec": {"unschedulable": true}, "status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
    );
    // The node side writes to the Node right after the controller lists it.
    api.change_after_next("GET", "/api/v1/nodes", &node_path(LOST), |node| {
        node["metadata"]["annotations"]["example.com/touched"] = json!("yes");
    });
    let mut controller = controller(&api.kubeconfig(dir.path()), &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.object(&node_path(LOST)).expect("node")["spec"]["unschedulable"] == json!(true) {
        assert!(Instant::now() < deadline, "the node was not given up and uncordoned");
        std::thread::sleep(Duration::from_millis(20));
    }
    controller.kill().expect("kill");
    let log = controller.wait_with_output().expect("controller");
    let patches: Vec<_> = api.requests().into_iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches[0].status, 409, "the first give-up was refused");
    assert_eq!(patches[1].status, 200);
    assert_ne!(patches[0].body["metadata"]["resourceVersion"], patches[1].body["metadata"]["resourceVersion"]);
    assert_eq!(patches[1].body["metadata"]["labels"][UPGRADE_STATE_LABEL], json!("failed"));
    assert_eq!(state(&api, LOST).as_deref(), Some("failed"));
    let events: Vec<Value> = api.objects("/apis/events.k8s.io/v1/namespaces/default/events");
    let given_up = events.iter().filter(|e| e["reason"] == json!("DriverUpgradeSkipped")).count();
    assert_eq!(
        given_up,
        1,
        "said once, after the write went through: {events:?}\n{}",
        String::from_utf8_lossy(&log.stderr)
    );
}
