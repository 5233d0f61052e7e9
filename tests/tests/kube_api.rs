//! What the binaries ask of the Kubernetes API, checked request by request against the loopback
//! API endpoint (`integration_tests::kube`): `nvidia-webhook certs` keeping the serving
//! certificate Secret and the webhook's caBundle (several replicas, conflicts, renewal, refusals),
//! and `install` labelling its Node and recording Events.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use integration_tests::fixtures::{host_root, publish_sample, workspace_binary};
use integration_tests::kernel::SimKernel;
use integration_tests::kube::{ApiRequest, ApiServer};
use integration_tests::s3::S3Server;
use nvidia_certs::Lifetimes;
use serde_json::{Value, json};

const NAMESPACE: &str = "kube-system";
const SECRET: &str = "nvidia-installer-webhook-tls";
const SERVICE: &str = "nvidia-installer-webhook";
const CONFIG: &str = "nvidia-installer-webhook";
const SECRET_PATH: &str = "/api/v1/namespaces/kube-system/secrets/nvidia-installer-webhook-tls";
const CONFIG_PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/nvidia-installer-webhook";

/// The MutatingWebhookConfiguration as the chart renders it: no caBundle yet.
fn webhook_config(service: &str, ca_bundle: Option<&str>) -> Value {
    let mut client_config =
        json!({"service": {"name": service, "namespace": NAMESPACE, "path": "/mutate", "port": 443}});
    if let Some(ca) = ca_bundle {
        client_config["caBundle"] = json!(base64::engine::general_purpose::STANDARD.encode(ca));
    }
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": CONFIG},
        "webhooks": [{
            "name": "gpu-pods.nvidia-installer.gardenlinux.io",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "clientConfig": client_config,
        }],
    })
}

/// `nvidia-webhook certs` as the chart's webhook runs it, against `api`.
fn certs(kubeconfig: &Path) -> Command {
    let mut command = Command::new(workspace_binary("nvidia-webhook"));
    command
        .args(["certs", "--namespace", NAMESPACE, "--secret", SECRET, "--service", SERVICE, "--webhook-config", CONFIG])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST");
    command
}

fn ok(output: Output) -> Output {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    output
}

fn decoded(value: &Value) -> String {
    let text = value.as_str().expect("base64 string");
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(text).expect("base64")).expect("utf8")
}

/// The Secret's bundle and the caBundle in the webhook configuration.
fn stored(api: &ApiServer) -> (nvidia_certs::Bundle, String) {
    let secret = api.object(SECRET_PATH).expect("the Secret exists");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let data = &secret["data"];
    let bundle = nvidia_certs::Bundle {
        ca_cert: decoded(&data["ca.crt"]),
        ca_key: decoded(&data["ca.key"]),
        cert: decoded(&data["tls.crt"]),
        key: decoded(&data["tls.key"]),
    };
    let config = api.object(CONFIG_PATH).expect("the webhook configuration");
    (bundle, decoded(&config["webhooks"][0]["clientConfig"]["caBundle"]))
}

fn calls(requests: &[ApiRequest]) -> Vec<(String, String, u16)> {
    requests.iter().map(|r| (r.method.clone(), r.path.clone(), r.status)).collect()
}

fn call(method: &str, path: &str, status: u16) -> (String, String, u16) {
    (method.to_owned(), path.to_owned(), status)
}

#[test]
fn certs_creates_the_secret_and_the_ca_bundle_once_then_changes_nothing() {
    let api = ApiServer::start();
    let dir = tempfile::tempdir().expect("dir");
    let kubeconfig = api.kubeconfig(dir.path());
    api.insert(CONFIG_PATH, webhook_config(SERVICE, None));

    ok(certs(&kubeconfig).output().expect("certs"));
    let requests = api.requests();
    assert_eq!(
        calls(&requests),
        vec![
            call("GET", SECRET_PATH, 404),
            call("POST", "/api/v1/namespaces/kube-system/secrets", 201),
            call("GET", CONFIG_PATH, 200),
            call("PATCH", CONFIG_PATH, 200),
        ]
    );
    let patch = &requests[3];
    assert_eq!(patch.content_type.as_deref(), Some("application/json-patch+json"));
    let (bundle, ca_bundle) = stored(&api);
    assert_eq!(
        patch.body,
        json!([{"op": "add", "path": "/webhooks/0/clientConfig/caBundle",
                "value": base64::engine::general_purpose::STANDARD.encode(&bundle.ca_cert)}])
    );
    assert_eq!(ca_bundle, bundle.ca_cert, "the webhook trusts the Secret's CA");
    let names = nvidia_certs::service_dns_names(SERVICE, NAMESPACE);
    let leaf = nvidia_certs::read(&bundle.cert).expect("leaf");
    let mut have = leaf.names.clone();
    have.sort();
    let mut want = names.clone();
    want.sort();
    assert_eq!(have, want, "the serving certificate names the Service");
    assert_eq!(
        nvidia_certs::judge(&bundle, &names, Lifetimes::default(), time::OffsetDateTime::now_utc()),
        nvidia_certs::Verdict::Keep
    );

    // Again: reads only.
    let before = api.requests().len();
    ok(certs(&kubeconfig).output().expect("certs again"));
    assert_eq!(calls(&api.requests()[before..]), vec![call("GET", SECRET_PATH, 200), call("GET", CONFIG_PATH, 200)]);
    assert_eq!(stored(&api).0, bundle);
}

#[test]
fn replicas_started_together_agree_on_one_ca() {
    let api = ApiServer::start();
    let dir = tempfile::tempdir().expect("dir");
    let kubeconfig = api.kubeconfig(dir.path());
    api.insert(CONFIG_PATH, webhook_config(SERVICE, None));
    let replicas: Vec<_> = (0..4)
        .map(|_| certs(&kubeconfig).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("replica"))
        .collect();
    for replica in replicas {
        ok(replica.wait_with_output().expect("replica"));
    }
    let created: Vec<_> =
        api.writes().into_iter().filter(|r| r.method == "POST" || r.method == "PUT").map(|r| r.status).collect();
    assert_eq!(created.iter().filter(|s| **s < 300).count(), 1, "one Secret write wins: {created:?}");
    let (bundle, ca_bundle) = stored(&api);
    assert_eq!(ca_bundle, bundle.ca_cert, "the caBundle is the one CA in the Secret");
}

#[test]
fn a_leaf_near_expiry_is_renewed_under_the_same_ca_through_a_conflict() {
    let api = ApiServer::start();
    let dir = tempfile::tempdir().expect("dir");
    let kubeconfig = api.kubeconfig(dir.path());
    let names = nvidia_certs::service_dns_names(SERVICE, NAMESPACE);
    let short = Lifetimes { leaf: std::time::Duration::from_secs(10 * 24 * 3600), ..Lifetimes::default() };
    let old = nvidia_certs::generate(&names, short).expect("old bundle");
    let target = nvidia_certs::store::Target {
        namespace: NAMESPACE.into(),
        secret: SECRET.into(),
        service: SERVICE.into(),
        webhook_config: CONFIG.into(),
        lifetimes: Lifetimes::default(),
    };
    api.insert(SECRET_PATH, serde_json::to_value(nvidia_certs::store::to_secret(&target, &old, None)).expect("json"));
    api.insert(CONFIG_PATH, webhook_config(SERVICE, Some(&old.ca_cert)));
    // Another writer changes the Secret between our read and our write.
    api.fail_next("PUT", SECRET_PATH, 409);

    ok(certs(&kubeconfig).output().expect("certs"));
    assert_eq!(
        calls(&api.requests()),
        vec![
            call("GET", SECRET_PATH, 200),
            call("PUT", SECRET_PATH, 409),
            call("GET", SECRET_PATH, 200),
            call("PUT", SECRET_PATH, 200),
            call("GET", CONFIG_PATH, 200),
        ],
        "read again after the conflict; the caBundle already trusts the CA, so no patch"
    );
    let (bundle, ca_bundle) = stored(&api);
    assert_eq!(bundle.ca_cert, old.ca_cert, "renewal keeps the CA");
    assert_eq!(ca_bundle, old.ca_cert);
    assert_ne!(bundle.cert, old.cert, "a new leaf");
    let leaf = nvidia_certs::read(&bundle.cert).expect("leaf");
    assert!(leaf.not_after > time::OffsetDateTime::now_utc() + time::Duration::days(300), "{:?}", leaf.not_after);
}

#[test]
fn a_refusal_names_the_object_and_writes_nothing() {
    let api = ApiServer::start();
    let dir = tempfile::tempdir().expect("dir");
    let kubeconfig = api.kubeconfig(dir.path());
    api.insert(CONFIG_PATH, webhook_config(SERVICE, None));
    api.fail_next("GET", SECRET_PATH, 403);
    let output = certs(&kubeconfig).output().expect("certs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("reading Secret {NAMESPACE}/{SECRET}")), "{stderr}");
    assert!(api.writes().is_empty(), "{:?}", api.writes());
}

// ---- the installer's Node labels and Events ----

const NODE: &str = "gpu-node-1";
const NODE_PATH: &str = "/api/v1/nodes/gpu-node-1";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
const KERNEL: &str = "6.1.0-47-amd64";
const DRIVER: &str = "535.261.03";
const BUCKET: &str = "drivers";
const P: &str = "nvidia-installer.gardenlinux.io/";
/// errno of a module load on a machine without the GPU.
const ENODEV: i32 = 19;

async fn kube_client(kubeconfig: &Path) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .expect("config");
    kube::Client::try_from(config).expect("client")
}

/// A GPU node: its Node object in the API, a host root, and a bucket holding the driver bundle.
struct GpuNode {
    api: ApiServer,
    _dir: tempfile::TempDir,
    _server: S3Server,
    request: nvidia_installer::node::install::InstallRequest,
    host: PathBuf,
    layout: nvidia_contract::layout::Layout,
    reporter: nvidia_installer::node::api::Reporter,
}

impl GpuNode {
    async fn start() -> Self {
        let api = ApiServer::start();
        let dir = tempfile::tempdir().expect("dir");
        let kubeconfig = api.kubeconfig(dir.path());
        api.insert(NODE_PATH, node_object());
        let (server, request, host) = node_with_bundle(dir.path()).await;
        let layout = nvidia_contract::layout::Layout::new(&host, "/opt/nvidia-installer");
        let reporter = nvidia_installer::node::api::Reporter::Kube {
            client: kube_client(&kubeconfig).await,
            node: NODE.to_owned(),
        };
        Self { api, _dir: dir, _server: server, request, host, layout, reporter }
    }
}

/// A host root and a bucket holding the driver bundle.
async fn node_with_bundle(work: &Path) -> (S3Server, nvidia_installer::node::install::InstallRequest, PathBuf) {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let info = nvidia_installer::bundle::pack::BundleInfo {
        driver_version: DRIVER.into(),
        kernel_release: KERNEL.into(),
        flavor: "open".into(),
        gardenlinux_version: Some("1877.3".into()),
    };
    let s3 = publish_sample(&server, BUCKET, work, &info, 4096).await;
    let host = work.join("host");
    host_root(&host, KERNEL).expect("host root");
    let request = nvidia_installer::node::install::InstallRequest {
        stage: nvidia_installer::node::stage::StageRequest {
            gardenlinux_version: "1877.3".into(),
            kernel_release: KERNEL.into(),
            driver_version: DRIVER.into(),
            s3,
            transfer: Default::default(),
            limits: Default::default(),
            flavors: None,
            trust: None,
        },
        modules: vec!["nvidia".into(), "nvidia-uvm".into(), "nvidia-modeset".into()],
        compile: None,
        upgrade: Default::default(),
    };
    (server, request, host)
}

fn node_object() -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": {"node.kubernetes.io/instance-type": "p5.48xlarge"}}})
}

#[tokio::test]
async fn install_labels_its_node_and_records_events_through_the_api() {
    let GpuNode { api, _dir, _server, request, host, layout, reporter } = GpuNode::start().await;

    // A node without a GPU: the install fails, and the node says so.
    let mut kernel = SimKernel::new(&host);
    kernel.fail = Some(("nvidia".into(), ENODEV));
    nvidia_installer::node::install::install(&layout, &request, &kernel, &reporter).await.expect_err("no GPU");
    let writes = api.writes();
    assert_eq!(calls(&writes), vec![call("PATCH", NODE_PATH, 200), call("POST", EVENTS, 201)]);
    assert_eq!(writes[0].content_type.as_deref(), Some("application/merge-patch+json"));
    assert_eq!(
        writes[0].body,
        json!({"metadata": {"labels": {format!("{P}driver-ready"): "false", format!("{P}driver-version"): DRIVER}}})
    );
    let event = &writes[1].body;
    assert_eq!(event["regarding"], json!({"apiVersion": "v1", "kind": "Node", "name": NODE}));
    assert_eq!((&event["type"], &event["reason"]), (&json!("Warning"), &json!("DriverInstallFailed")));
    assert!(event["note"].as_str().expect("note").contains("no NVIDIA GPU"), "{event}");
    assert_eq!(event["reportingController"], "gardenlinux.io/nvidia-installer");
    assert!(event["metadata"]["generateName"].as_str().expect("generateName").starts_with(NODE));
    assert!(event["eventTime"].is_string(), "{event}");

    // With the GPU: ready, and the node's own labels are kept.
    let kernel = SimKernel::new(&host);
    nvidia_installer::node::install::install(&layout, &request, &kernel, &reporter).await.expect("install");
    let node = api.object(NODE_PATH).expect("node");
    assert_eq!(
        node["metadata"]["labels"],
        json!({"node.kubernetes.io/instance-type": "p5.48xlarge", format!("{P}driver-ready"): "true", format!("{P}driver-version"): DRIVER})
    );
    let events = api.objects(&format!("{EVENTS}/"));
    assert_eq!(events.len(), 2);
    let ready = events.iter().find(|e| e["reason"] == "DriverReady").expect("DriverReady event");
    assert_eq!(ready["type"], "Normal");
    assert_eq!(ready["note"], format!("NVIDIA driver {DRIVER} ready for kernel {KERNEL}"));
}

#[tokio::test]
async fn an_api_refusal_does_not_fail_a_working_install() {
    let GpuNode { api, _dir, _server, request, host, layout, reporter } = GpuNode::start().await;
    api.fail_next("PATCH", NODE_PATH, 403);
    let kernel = SimKernel::new(&host);
    let marker =
        nvidia_installer::node::install::install(&layout, &request, &kernel, &reporter).await.expect("install");
    assert_eq!(marker.driver_version, DRIVER);
    assert!(layout.ready().is_file(), "the host state is what pods wait on");
    assert_eq!(calls(&api.writes()), vec![call("PATCH", NODE_PATH, 403)], "no Event after the refused patch");
}

#[tokio::test]
async fn transient_api_errors_are_retried() {
    let GpuNode { api, _dir, _server, request, host, layout, reporter } = GpuNode::start().await;
    // 503 is retried by kube's client, 500 and 502 by the installer.
    api.fail_next("PATCH", NODE_PATH, 503);
    api.fail_next("PATCH", NODE_PATH, 500);
    api.fail_next("POST", EVENTS, 502);
    let kernel = SimKernel::new(&host);
    nvidia_installer::node::install::install(&layout, &request, &kernel, &reporter).await.expect("install");
    assert_eq!(
        calls(&api.writes()),
        vec![
            call("PATCH", NODE_PATH, 503),
            call("PATCH", NODE_PATH, 500),
            call("PATCH", NODE_PATH, 200),
            call("POST", EVENTS, 502),
            call("POST", EVENTS, 201),
        ]
    );
    let node = api.object(NODE_PATH).expect("node");
    assert_eq!(node["metadata"]["labels"][format!("{P}driver-ready")], "true");
    assert_eq!(api.objects(EVENTS).len(), 1, "one Event, not one per attempt");
}

/// `nvidia-webhook selftest` (what `helm test` runs) against `api`, in `namespace`.
fn selftest(kubeconfig: &Path, namespace: &str) -> Output {
    Command::new(workspace_binary("nvidia-webhook"))
        .args(["selftest", "--namespace", namespace])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("selftest")
}

/// The API server as it admits pods with the webhook registered: the real mutation applied to
/// every pod created in a labelled namespace, dry runs included.
fn with_webhook(api: &ApiServer) {
    let config = nvidia_webhook::config::InjectConfig::new("registry.example/nvidia-installer:1");
    api.admit(
        "/pods",
        std::sync::Arc::new(move |pod: Value| {
            let parsed = serde_json::from_value(pod.clone()).expect("a pod");
            let mutation = nvidia_webhook::mutate::mutate(&parsed, &config).expect("mutates");
            let mut patched = pod;
            json_patch::patch(&mut patched, &mutation.patch).expect("the patch applies");
            patched
        }),
    );
}

#[test]
fn selftest_passes_when_the_api_server_injects_and_stores_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = ApiServer::start();
    with_webhook(&api);
    let output = ok(selftest(&api.kubeconfig(dir.path()), "gpu-selftest"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("injected"), "{stdout}");
    let requests = api.requests();
    assert_eq!(calls(&requests), vec![call("POST", "/api/v1/namespaces/gpu-selftest/pods", 201)]);
    assert!(requests[0].query.as_deref().is_some_and(|q| q.contains("dryRun=All")), "{:?}", requests[0].query);
    assert_eq!(requests[0].body["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"], "1");
    assert!(api.objects("/api/v1/namespaces/gpu-selftest/pods").is_empty(), "a dry run stores nothing");
}

#[test]
fn selftest_fails_naming_what_is_missing_when_nothing_injects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = ApiServer::start();
    let output = selftest(&api.kubeconfig(dir.path()), "gpu-selftest");
    assert!(!output.status.success(), "no webhook, yet it passed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not injected") && stderr.contains("nvidia-driver-wait"), "{stderr}");
    assert!(stderr.contains("gpu-selftest"), "{stderr}");
}

#[test]
fn selftest_waits_for_a_new_namespace_to_take_pods() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = ApiServer::start();
    with_webhook(&api);
    // As the API server answers until the service account controller made `default`.
    api.fail_next_with(
        "POST",
        "/api/v1/namespaces/gpu-selftest/pods",
        403,
        "pods \"x\" is forbidden: error looking up service account gpu-selftest/default: serviceaccount \"default\" not found",
    );
    let output = ok(selftest(&api.kubeconfig(dir.path()), "gpu-selftest"));
    assert!(String::from_utf8_lossy(&output.stdout).contains("injected"));
    assert_eq!(calls(&api.requests()).len(), 2, "asked again once the namespace took pods");
}
