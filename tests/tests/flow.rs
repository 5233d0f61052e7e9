//! The webhook and the installer together: the init container the webhook injects (image aside:
//! its command, args, env and mounts) is run against a host root the installer prepared, and the
//! mounts it injects are resolved inside that host root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use integration_tests::fixtures::{host_root, publish_sample, workspace_binary};
use integration_tests::kernel::SimKernel;
use integration_tests::s3::S3Server;
use k8s_openapi::api::core::v1::Pod;
use nvidia_contract::layout::Layout;
use nvidia_installer::bundle::pack::BundleInfo;
use nvidia_installer::node::api::Reporter;
use nvidia_installer::node::install::{InstallRequest, install};
use nvidia_installer::node::stage::StageRequest;
use nvidia_installer::s3::{S3Options, Transfer};
use nvidia_webhook::{InjectConfig, mutate};
use serde_json::{Value, json};

const KERNEL: &str = "6.1.0-47-amd64";
const DRIVER: &str = "535.261.03";
const OTHER_DRIVER: &str = "550.163.01";
const GARDENLINUX: &str = "1877.3";
const BUCKET: &str = "drivers";

fn gpu_pod(annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "train-", "annotations": annotations},
        "spec": {"containers": [
            {"name": "cuda", "image": "nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04",
             "resources": {"limits": {"nvidia.com/gpu": "1"}}},
        ]},
    }))
    .expect("pod")
}

/// The pod as the API server stores it after the webhook's patch.
fn injected(pod: &Pod, config: &InjectConfig) -> Value {
    let mutation = mutate(pod, config).expect("mutate");
    let mut value = serde_json::to_value(pod).expect("pod json");
    json_patch::patch(&mut value, &mutation.patch).expect("patch applies");
    value
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().into_iter().flatten().map(|v| v.as_str().expect("string").to_owned()).collect()
}

/// Start the init container's command as the kubelet would, with the container's `/host`
/// mount being the test's host root. Its mounts are checked to be what makes that mapping true.
fn start_init(pod: &Value, host: &Path, driver_root: &str) -> Child {
    let init = &pod["spec"]["initContainers"][0];
    assert_eq!(init["name"], "nvidia-driver-wait");
    let mount = &init["volumeMounts"][0];
    assert_eq!(mount["mountPath"], format!("/host{driver_root}"), "the driver root is mounted under /host");
    assert_eq!(mount["readOnly"], true);
    let volume = pod["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mount's volume");
    assert_eq!(volume["hostPath"]["path"], driver_root);

    let command = strings(&init["command"]);
    assert_eq!(command, vec!["nvidia-installer"]);
    let args: Vec<String> =
        strings(&init["args"]).into_iter().map(|a| if a == "/host" { host.display().to_string() } else { a }).collect();
    let mut env = Vec::new();
    for var in init["env"].as_array().into_iter().flatten() {
        let value = var["value"].as_str().expect("the init container's env has literal values only");
        env.push((var["name"].as_str().expect("name").to_owned(), value.to_owned()));
    }
    // Only what the container is given: nothing of the test's environment leaks in.
    Command::new(workspace_binary("nvidia-installer"))
        .args(args)
        .env_clear()
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the init container's command")
}

fn finish(child: Child, within: Duration) -> Output {
    let started = Instant::now();
    let mut child = child;
    while child.try_wait().expect("poll").is_none() {
        assert!(started.elapsed() < within, "the init container's command did not return within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// A host root with nothing installed, and the driver bundle published to the bucket.
async fn setup(server: &S3Server, work: &Path) -> (S3Options, PathBuf, Layout) {
    server.create_bucket(BUCKET);
    let info = BundleInfo {
        driver_version: DRIVER.into(),
        kernel_release: KERNEL.into(),
        flavor: "open".into(),
        gardenlinux_version: Some(GARDENLINUX.into()),
    };
    let s3 = publish_sample(server, BUCKET, work, &info, 8192).await;
    let host = work.join("host");
    host_root(&host, KERNEL).expect("host root");
    let layout = Layout::new(&host, "/opt/nvidia-installer");
    (s3, host, layout)
}

#[tokio::test]
async fn the_injected_init_container_waits_for_install_and_refuses_another_pinned_version() {
    let server = S3Server::start();
    let work = tempfile::tempdir().expect("work");
    let (s3, host, layout) = setup(&server, work.path()).await;
    let config = InjectConfig::new("ghcr.io/gardenlinux/nvidia-installer:test");

    // Nothing staged yet: the pod waits.
    let pod = injected(&gpu_pod(json!({})), &config);
    let waiting = start_init(&pod, &host, "/opt/nvidia-installer");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut waiting = waiting;
    assert!(waiting.try_wait().expect("poll").is_none(), "wait returned before anything was installed");

    // The installer stages and installs (the kernel seam simulates the kernel); the waiting
    // command returns once the node is marked ready.
    let request = InstallRequest {
        stage: StageRequest {
            gardenlinux_version: GARDENLINUX.into(),
            kernel_release: KERNEL.into(),
            driver_version: DRIVER.into(),
            s3,
            transfer: Transfer::default(),
            limits: Default::default(),
            flavors: None,
            trust: None,
        },
        modules: vec!["nvidia".into(), "nvidia-uvm".into(), "nvidia-modeset".into()],
        compile: None,
        upgrade: Default::default(),
    };
    let kernel = SimKernel::new(&host);
    // Still waiting while staged but not loaded.
    nvidia_installer::node::stage::stage(&layout, &request.stage).await.expect("stage");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(waiting.try_wait().expect("poll").is_none(), "wait returned for a staged but unloaded driver");
    let installed_at = Instant::now();
    install(&layout, &request, &kernel, &Reporter::Log).await.expect("install");
    let output = finish(waiting, Duration::from_secs(10));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(installed_at.elapsed() < Duration::from_secs(5), "wait noticed the marker late");
    assert!(String::from_utf8_lossy(&output.stdout).contains(&format!("NVIDIA driver {DRIVER} is ready")));

    // A pod pinned to the ready version starts at once.
    let pinned = injected(&gpu_pod(json!({"nvidia-installer.gardenlinux.io/driver-version": DRIVER})), &config);
    let output = finish(start_init(&pinned, &host, "/opt/nvidia-installer"), Duration::from_secs(10));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    // A pod pinned to another version is refused: the webhook's wait timeout elapses with a
    // message naming both versions.
    let mut short = config.clone();
    short.wait_timeout = Duration::from_secs(2);
    let other = injected(&gpu_pod(json!({"nvidia-installer.gardenlinux.io/driver-version": OTHER_DRIVER})), &short);
    let output = finish(start_init(&other, &host, "/opt/nvidia-installer"), Duration::from_secs(20));
    assert!(!output.status.success(), "wait accepted driver {DRIVER} for a pod pinned to {OTHER_DRIVER}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(OTHER_DRIVER) && stderr.contains(DRIVER), "{stderr}");
}

#[tokio::test]
async fn the_injected_mounts_resolve_to_the_current_bundle() {
    let server = S3Server::start();
    let work = tempfile::tempdir().expect("work");
    let (s3, host, layout) = setup(&server, work.path()).await;
    let request = StageRequest {
        gardenlinux_version: GARDENLINUX.into(),
        kernel_release: KERNEL.into(),
        driver_version: DRIVER.into(),
        s3,
        transfer: Transfer::default(),
        limits: Default::default(),
        flavors: None,
        trust: None,
    };
    nvidia_installer::node::stage::stage(&layout, &request).await.expect("stage");

    let pod = injected(&gpu_pod(json!({})), &InjectConfig::new("ghcr.io/gardenlinux/nvidia-installer:test"));
    let container = &pod["spec"]["containers"][0];
    let mount = container["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["mountPath"] == "/usr/local/nvidia")
        .expect("/usr/local/nvidia mounted");
    assert_eq!(mount["readOnly"], true);
    let volume = pod["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("volume");
    let host_path = volume["hostPath"]["path"].as_str().expect("hostPath");
    let mounted = host.join(host_path.trim_start_matches('/'));
    let bundle = std::fs::canonicalize(layout.bundle(KERNEL, DRIVER)).expect("bundle");
    assert_eq!(std::fs::canonicalize(&mounted).expect("mount source resolves"), bundle);
    for file in ["bin/nvidia-smi", "lib/libnvidia-ml.so.1", "lib64/libnvidia-ml.so.1"] {
        let seen = mounted.join(file);
        assert!(seen.is_file(), "/usr/local/nvidia/{file} does not resolve ({})", seen.display());
        assert!(std::fs::canonicalize(&seen).expect(file).starts_with(&bundle), "{file} leaves the bundle");
    }
    // What the container runs finds the library where the injected LD_LIBRARY_PATH says.
    let library_path = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "LD_LIBRARY_PATH")
        .and_then(|e| e["value"].as_str())
        .expect("LD_LIBRARY_PATH")
        .to_owned();
    assert!(
        library_path.split(':').any(|dir| {
            dir.strip_prefix("/usr/local/nvidia")
                .is_some_and(|rest| mounted.join(rest.trim_start_matches('/')).join("libnvidia-ml.so.1").is_file())
        }),
        "no LD_LIBRARY_PATH entry reaches libnvidia-ml.so.1: {library_path}"
    );
}
