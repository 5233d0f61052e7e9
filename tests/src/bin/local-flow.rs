//! The whole flow on this machine, with no cluster and no cloud: a loopback S3 server, a driver
//! bundle packed and published by `nvidia-installer`, staged into a temporary host root, the
//! webhook serving with a generated certificate and answering an AdmissionReview for an unchanged
//! GPU Deployment's pod, and the init container it injects run exactly as injected against that
//! host root. The kernel steps, which need a real kernel and a GPU, are printed as the exact
//! operations `install` would perform (`install --dry-run`), never performed.
//!
//! ```sh
//! cargo run -p integration-tests --bin local-flow
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use integration_tests::fixtures::{host_root, sample_driver};
use integration_tests::s3::S3Server;
use serde_json::{Value, json};

/// The unchanged sample GPU Deployment (also `examples/gpu-deployment.yaml`).
const SAMPLE_DEPLOYMENT: &str = include_str!("../../../examples/gpu-deployment.yaml");
const BUCKET: &str = "nvidia-drivers";
/// How long the injected `wait` must keep waiting to count as gating the pod.
const GATE_SECONDS: u64 = 2;

/// What to run the flow with.
#[derive(Debug, Clone)]
struct Options {
    bin_dir: Option<PathBuf>,
    kernel_release: String,
    driver_version: String,
    gardenlinux_version: String,
    /// A real driver directory (bin/, lib/, modules/) instead of the sample one.
    driver_dir: Option<PathBuf>,
    manifest: Option<PathBuf>,
    keep: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bin_dir: None,
            kernel_release: "6.12.117+deb12-cloud-amd64".to_owned(),
            driver_version: "535.261.03".to_owned(),
            gardenlinux_version: "1877.3".to_owned(),
            driver_dir: None,
            manifest: None,
            keep: false,
        }
    }
}

const USAGE: &str = "usage: local-flow [--bin-dir DIR] [--kernel-release R] [--driver-version V] \
[--gardenlinux-version G] [--driver-dir DIR] [--manifest FILE] [--keep]

Runs the whole nvidia-installer flow on this machine (loopback S3, temporary host root, webhook on
loopback) and prints each step. --driver-dir packs a real driver directory (bin/, lib/, modules/)
instead of the sample one; --manifest uses another GPU workload; --keep leaves the temp dir.";

fn parse(args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options::default();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| args.next()).ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--bin-dir" => options.bin_dir = Some(value()?.into()),
            "--kernel-release" => options.kernel_release = value()?,
            "--driver-version" => options.driver_version = value()?,
            "--gardenlinux-version" => options.gardenlinux_version = value()?,
            "--driver-dir" => options.driver_dir = Some(value()?.into()),
            "--manifest" => options.manifest = Some(value()?.into()),
            "--keep" => options.keep = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    let options = match parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("local-flow: {message}");
            }
            eprintln!("{USAGE}");
            return if message.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) };
        }
    };
    let mut flow = Flow::new();
    println!(
        "nvidia-installer, the whole flow on this machine: loopback S3, a temporary host root, the webhook on loopback\n"
    );
    let result = run(&mut flow, &options);
    println!();
    match result {
        Ok(()) => {
            println!(
                "All {} steps passed in {:.1} s. The kernel operations `install --dry-run` listed need a node's kernel and a GPU: on a node, `install` performs them.",
                flow.step,
                flow.started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("FAILED at step {}: {error}", flow.step);
            ExitCode::FAILURE
        }
    }
}

/// Numbered steps with timings.
struct Flow {
    step: usize,
    started: Instant,
}

impl Flow {
    fn new() -> Self {
        Self { step: 0, started: Instant::now() }
    }

    /// Run one step; print its title, timing and the lines it returns.
    fn step<T>(&mut self, title: &str, body: impl FnOnce() -> Result<(T, String), String>) -> Result<T, String> {
        self.step += 1;
        let started = Instant::now();
        let result = body();
        let elapsed = started.elapsed().as_secs_f64() * 1000.0;
        let mark = if result.is_ok() { "ok " } else { "ERR" };
        println!("[{:>2}] {mark} {title:<64} {elapsed:>8.1} ms", self.step);
        match result {
            Ok((value, detail)) => {
                for line in detail.lines() {
                    println!("          {line}");
                }
                Ok(value)
            }
            Err(error) => Err(error),
        }
    }
}

fn run(flow: &mut Flow, options: &Options) -> Result<(), String> {
    let bins = flow.step("build nvidia-installer and nvidia-webhook", || binaries(options))?;
    let work = tempfile::Builder::new().prefix("nvidia-local-flow-").tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let work_path = if options.keep { work.keep() } else { work.path().to_owned() };
    let host = work_path.join("host");
    let kernel = options.kernel_release.as_str();
    let driver = options.driver_version.as_str();

    let server = flow.step("start the loopback S3 server", || {
        let server = S3Server::start();
        server.create_bucket(BUCKET);
        let detail = format!("{} (TLS, SigV4 checked), bucket {BUCKET}", server.endpoint());
        Ok((server, detail))
    })?;
    let s3_env = server.env();

    let bundle = work_path.join(format!("nvidia-{driver}-{kernel}.tar.zst"));
    flow.step("nvidia-installer pack", || {
        let (dir, what) = match &options.driver_dir {
            Some(dir) => (dir.clone(), format!("driver directory {}", dir.display())),
            None => {
                let dir = work_path.join("driver");
                sample_driver(&dir, kernel, driver, 4 << 20)
                    .map_err(|e| format!("writing the sample driver {}: {e}", dir.display()))?;
                (
                    dir,
                    "sample driver: bin/nvidia-smi, lib/libnvidia-ml.so.1, modules with the modinfo install checks"
                        .to_owned(),
                )
            }
        };
        let out = run_ok(
            Command::new(bins.installer())
                .args(["pack", "--driver-version", driver, "--kernel-release", kernel])
                .arg("--gardenlinux-version")
                .arg(&options.gardenlinux_version)
                .arg("--dir")
                .arg(&dir)
                .arg("--output")
                .arg(&bundle),
        )?;
        Ok(((), format!("{what}\n{}", out.trim())))
    })?;

    flow.step("nvidia-installer publish", || {
        let out = run_ok(
            Command::new(bins.installer())
                .args(["publish", "--bucket", BUCKET, "--gardenlinux-version", &options.gardenlinux_version])
                .arg("--bundle")
                .arg(&bundle)
                .envs(s3_env.iter().cloned()),
        )?;
        let keys = server.list(BUCKET).join(", ");
        Ok(((), format!("{}\nbucket now holds: {keys}", out.trim())))
    })?;

    host_root(&host, kernel).map_err(|e| format!("preparing the host root {}: {e}", host.display()))?;
    let stage_args = |command: &str| -> Vec<String> {
        vec![
            command.to_owned(),
            "--host-root".to_owned(),
            host.display().to_string(),
            "--bucket".to_owned(),
            BUCKET.to_owned(),
            "--gardenlinux-version".to_owned(),
            options.gardenlinux_version.clone(),
            "--driver-version".to_owned(),
            driver.to_owned(),
        ]
    };
    flow.step("nvidia-installer stage (into the temporary host root)", || {
        let before = server.log().entries().len();
        let out = run_ok(Command::new(bins.installer()).args(stage_args("stage")).envs(s3_env.iter().cloned()))?;
        let requests = server.log().entries().len() - before;
        let current = host.join("opt/nvidia-installer/current");
        let target = std::fs::read_link(&current).map_err(|e| format!("{}: {e}", current.display()))?;
        Ok((
            (),
            format!(
                "{}\nhost root {}; current -> {} ({requests} S3 requests; kernel {kernel} read from the host root's /proc)",
                out.trim(),
                host.display(),
                target.display()
            ),
        ))
    })?;

    flow.step("nvidia-installer stage again: cache hit", || {
        let before = server.log().entries().len();
        run_ok(Command::new(bins.installer()).args(stage_args("stage")).envs(s3_env.iter().cloned()))?;
        let requests = server.log().entries().len() - before;
        if requests != 0 {
            return Err(format!("a cache hit made {requests} S3 requests"));
        }
        Ok(((), "verified bundle already staged: 0 S3 requests".to_owned()))
    })?;

    flow.step("nvidia-installer install --dry-run (kernel steps NOT performed)", || {
        let out = run_ok(
            Command::new(bins.installer()).args(stage_args("install")).arg("--dry-run").envs(s3_env.iter().cloned()),
        )?;
        if host.join("opt/nvidia-installer/ready").exists() {
            return Err("the dry run wrote a ready marker".to_owned());
        }
        let plan: String = out.lines().filter(|l| !l.starts_with("staged ")).map(|l| format!("{l}\n")).collect();
        Ok(((), plan))
    })?;

    let webhook = flow.step("nvidia-webhook serve (generated certificate)", || serve(&bins, &work_path))?;

    let pod = flow
        .step("AdmissionReview for the sample Deployment's pod", || admission(&webhook, options.manifest.as_deref()))?;
    drop(webhook);

    let init = pod["spec"]["initContainers"][0].clone();
    flow.step("run the injected init container's command", || gate(&bins, &init, &host))?;

    flow.step("the injected mounts resolve to the current bundle", || mounts(&pod, &host))?;
    Ok(())
}

/// Where the workspace's binaries are; built first when run through `cargo run`.
struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    fn installer(&self) -> PathBuf {
        self.dir.join("nvidia-installer")
    }
    fn webhook(&self) -> PathBuf {
        self.dir.join("nvidia-webhook")
    }
}

fn binaries(options: &Options) -> Result<(Binaries, String), String> {
    let own_dir = || std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf));
    let (dir, detail) = match (&options.bin_dir, std::env::var_os("CARGO")) {
        (Some(dir), _) => (dir.clone(), format!("using {}", dir.display())),
        (None, Some(cargo)) => {
            let mut command = Command::new(cargo);
            command.args(["build", "--quiet", "-p", "nvidia-installer", "-p", "nvidia-webhook", "--bins"]);
            if !cfg!(debug_assertions) {
                command.arg("--release");
            }
            let output = command.output().map_err(|e| format!("running cargo build: {e}"))?;
            if !output.status.success() {
                return Err(format!("cargo build failed:\n{}", String::from_utf8_lossy(&output.stderr)));
            }
            let dir = own_dir().ok_or("cannot tell where this binary is")?;
            let detail = format!("cargo build -p nvidia-installer -p nvidia-webhook → {}", dir.display());
            (dir, detail)
        }
        (None, None) => {
            let dir = own_dir().ok_or("cannot tell where this binary is")?;
            (dir.clone(), format!("using the binaries beside this one in {}", dir.display()))
        }
    };
    let bins = Binaries { dir };
    for path in [bins.installer(), bins.webhook()] {
        if !path.is_file() {
            return Err(format!(
                "{} is missing: build the workspace first (cargo build) or pass --bin-dir",
                path.display()
            ));
        }
    }
    Ok((bins, detail))
}

/// The running webhook; stopped on drop.
struct Webhook {
    child: Child,
    port: u16,
    ca_pem: String,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SERVICE: &str = "nvidia-installer-webhook";
const NAMESPACE: &str = "kube-system";

fn serve(bins: &Binaries, work: &Path) -> Result<(Webhook, String), String> {
    let names = nvidia_certs::service_dns_names(SERVICE, NAMESPACE);
    let certificate =
        nvidia_certs::generate(&names, nvidia_certs::Lifetimes::default()).map_err(|e| format!("certificate: {e}"))?;
    let tls = work.join("tls");
    std::fs::create_dir_all(&tls).map_err(|e| format!("{}: {e}", tls.display()))?;
    for (file, pem) in [("tls.crt", &certificate.cert), ("tls.key", &certificate.key)] {
        std::fs::write(tls.join(file), pem).map_err(|e| format!("{}: {e}", tls.join(file).display()))?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("finding a free port: {e}"))?
        .port();
    let child = Command::new(bins.webhook())
        .arg("serve")
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--tls-cert={}", tls.join("tls.crt").display()))
        .arg(format!("--tls-key={}", tls.join("tls.key").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bins.webhook().display()))?;
    let mut webhook = Webhook { child, port, ca_pem: certificate.ca_cert.clone() };
    let runtime = runtime()?;
    let started = Instant::now();
    let status = runtime.block_on(async {
        let client = client(&webhook)?;
        loop {
            match client.get(url(&webhook, "/readyz")).send().await {
                Ok(response) => return Ok::<_, String>(response.status()),
                Err(_) if started.elapsed() < Duration::from_secs(20) => {
                    if let Ok(Some(status)) = webhook.child.try_wait() {
                        return Err(format!("nvidia-webhook serve exited: {status}"));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => return Err(format!("nvidia-webhook serve never answered: {error}")),
            }
        }
    })?;
    if !status.is_success() {
        return Err(format!("GET /readyz answered {status}"));
    }
    let detail = format!(
        "https://{SERVICE}.{NAMESPACE}.svc:{port} (loopback), CA + ECDSA P-256 leaf for {}; GET /readyz {status}",
        names.join(", ")
    );
    Ok((webhook, detail))
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("tokio runtime: {e}"))
}

fn client(webhook: &Webhook) -> Result<reqwest::Client, String> {
    let ca = reqwest::Certificate::from_pem(webhook.ca_pem.as_bytes()).map_err(|e| format!("CA: {e}"))?;
    reqwest::Client::builder()
        .add_root_certificate(ca)
        .resolve(&format!("{SERVICE}.{NAMESPACE}.svc"), ([127, 0, 0, 1], webhook.port).into())
        .build()
        .map_err(|e| format!("HTTPS client: {e}"))
}

fn url(webhook: &Webhook, path: &str) -> String {
    format!("https://{SERVICE}.{NAMESPACE}.svc:{}{path}", webhook.port)
}

/// The pod a ReplicaSet controller creates from the manifest's first pod template, as the API
/// server sends it to the webhook.
fn review_for(manifest: &str) -> Result<(Value, String), String> {
    let documents: Vec<Value> = serde_yaml_ng::Deserializer::from_str(manifest)
        .map(|d| serde::Deserialize::deserialize(d).map_err(|e| format!("manifest: {e}")))
        .collect::<Result<_, _>>()?;
    let workload = documents
        .iter()
        .find(|d| d.pointer("/spec/template/spec").is_some() || d["kind"] == "Pod")
        .ok_or("the manifest has no Pod or pod template")?;
    let name = workload["metadata"]["name"].as_str().unwrap_or("gpu-workload");
    let namespace = workload["metadata"]["namespace"].as_str().unwrap_or("default").to_owned();
    let pod = if workload["kind"] == "Pod" {
        let mut pod = workload.clone();
        if let Some(metadata) = pod["metadata"].as_object_mut() {
            metadata.remove("namespace");
        }
        pod
    } else {
        let template = &workload["spec"]["template"];
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": format!("{name}-7d9f8b6c5d-"),
                "labels": template["metadata"]["labels"],
                "annotations": template["metadata"]["annotations"],
            },
            "spec": template["spec"],
        })
    };
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0b7c3f0e-2f4a-4f9e-9d8e-local-flow",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": strip_nulls(pod),
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    });
    Ok((review, format!("{} {name}", workload["kind"].as_str().unwrap_or("workload"))))
}

fn strip_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, strip_nulls(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

fn admission(webhook: &Webhook, manifest: Option<&Path>) -> Result<(Value, String), String> {
    let text = match manifest {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
        None => SAMPLE_DEPLOYMENT.to_owned(),
    };
    let (review, workload) = review_for(&text)?;
    let runtime = runtime()?;
    let answer: Value = runtime.block_on(async {
        let response = client(webhook)?
            .post(url(webhook, "/mutate"))
            .json(&review)
            .send()
            .await
            .map_err(|e| format!("POST /mutate: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("POST /mutate answered {status}: {}", response.text().await.unwrap_or_default()));
        }
        response.json::<Value>().await.map_err(|e| format!("the AdmissionReview response: {e}"))
    })?;
    let response = &answer["response"];
    if answer["apiVersion"] != review["apiVersion"] || answer["kind"] != "AdmissionReview" {
        return Err(format!("the response does not echo apiVersion and kind: {answer}"));
    }
    if response["uid"] != review["request"]["uid"] || response["allowed"] != true {
        return Err(format!("the response does not allow the pod with its uid: {response}"));
    }
    if response["patchType"] != "JSONPatch" {
        return Err(format!("no JSONPatch in the response: {response}"));
    }
    let patch = response["patch"].as_str().ok_or("the response has no patch")?;
    let patch = base64::engine::general_purpose::STANDARD.decode(patch).map_err(|e| format!("patch: {e}"))?;
    let patch: json_patch::Patch = serde_json::from_slice(&patch).map_err(|e| format!("patch: {e}"))?;
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).map_err(|e| format!("the patch does not apply: {e}"))?;
    let init = &pod["spec"]["initContainers"][0];
    if init["name"] != "nvidia-driver-wait" {
        return Err(format!("no wait init container first: {}", pod["spec"]["initContainers"]));
    }
    let mut detail = format!(
        "{workload} ({} pod in namespace {}), unchanged\n",
        pod["metadata"]["generateName"].as_str().unwrap_or("a"),
        review["request"]["namespace"].as_str().unwrap_or_default()
    );
    let _ = writeln!(detail, "allowed, uid echoed, JSONPatch with {} operations:", patch.0.len());
    for op in &patch.0 {
        let _ = writeln!(detail, "  {} {}", op_name(op), op_path(op));
    }
    let _ = writeln!(detail, "init container {}: {}", init["name"].as_str().unwrap_or_default(), command_line(init));
    for container in pod["spec"]["containers"].as_array().into_iter().flatten() {
        let mounts: Vec<&str> = container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["mountPath"].as_str())
            .collect();
        let _ = writeln!(
            detail,
            "container {}: mounts {}",
            container["name"].as_str().unwrap_or_default(),
            if mounts.is_empty() { "none (no GPU asked for)".to_owned() } else { mounts.join(", ") }
        );
    }
    Ok((pod, detail))
}

fn op_name(op: &json_patch::PatchOperation) -> &'static str {
    match op {
        json_patch::PatchOperation::Add(_) => "add",
        json_patch::PatchOperation::Remove(_) => "remove",
        json_patch::PatchOperation::Replace(_) => "replace",
        json_patch::PatchOperation::Move(_) => "move",
        json_patch::PatchOperation::Copy(_) => "copy",
        json_patch::PatchOperation::Test(_) => "test",
    }
}

fn op_path(op: &json_patch::PatchOperation) -> String {
    serde_json::to_value(op).ok().and_then(|v| v["path"].as_str().map(str::to_owned)).unwrap_or_default()
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect()
}

fn command_line(container: &Value) -> String {
    strings(&container["command"]).into_iter().chain(strings(&container["args"])).collect::<Vec<_>>().join(" ")
}

/// Where a container path of the injected init container is on this machine: its mounts map
/// host paths under `/host`, which here is the temporary host root.
fn on_host(host: &Path, arg: &str) -> String {
    match arg.strip_prefix("/host") {
        Some("") => host.display().to_string(),
        Some(rest) if rest.starts_with('/') => host.join(rest.trim_start_matches('/')).display().to_string(),
        _ => arg.to_owned(),
    }
}

/// Run the injected command as injected (the container's `/host` is the temporary host root) and
/// check that it keeps the pod waiting: no kernel step ran here, so no driver is ready.
fn gate(bins: &Binaries, init: &Value, host: &Path) -> Result<((), String), String> {
    let command = strings(&init["command"]);
    if command.len() != 1 || Path::new(&command[0]).file_name().is_none_or(|n| n != "nvidia-installer") {
        return Err(format!("the init container does not run nvidia-installer: {command:?}"));
    }
    let mounts_host = init["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|m| m["mountPath"].as_str().is_some_and(|p| p.starts_with("/host")) && m["readOnly"] == true);
    if !mounts_host {
        return Err(format!("the init container's mounts are not read-only under /host: {}", init["volumeMounts"]));
    }
    let args: Vec<String> =
        command[1..].iter().chain(strings(&init["args"]).iter()).map(|a| on_host(host, a)).collect();
    let mut env: Vec<(String, String)> = Vec::new();
    for var in init["env"].as_array().into_iter().flatten() {
        if let (Some(name), Some(value)) = (var["name"].as_str(), var["value"].as_str()) {
            env.push((name.to_owned(), value.to_owned()));
        }
    }
    // Only what the container is given: nothing of this process's environment leaks in.
    let mut child = Command::new(bins.installer())
        .args(&args)
        .env_clear()
        .envs(env)
        .env("NVIDIA_INSTALLER_LOG_FORMAT", "text")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the wait command: {e}"))?;
    std::thread::sleep(Duration::from_secs(GATE_SECONDS));
    let still_waiting = child.try_wait().map_err(|e| format!("polling wait: {e}"))?.is_none();
    let _ = child.kill();
    let output = child.wait_with_output().map_err(|e| format!("wait: {e}"))?;
    let log = String::from_utf8_lossy(&output.stderr);
    if !still_waiting {
        return Err(format!("wait returned ({}) although no driver is ready:\n{log}", output.status));
    }
    let reason = log
        .lines()
        .find_map(|l| l.split_once("reason=").map(|(_, r)| r.split(" waited_s").next().unwrap_or(r).trim().to_owned()))
        .ok_or_else(|| format!("wait logged no reason:\n{log}"))?;
    let detail = format!(
        "nvidia-installer {} (/host = {})\nstill waiting after {GATE_SECONDS} s, as the pod would: {reason}\non a node, `install` writes the ready marker after the kernel steps of step 7 and this returns at once",
        strings(&init["args"]).join(" "),
        host.display()
    );
    Ok(((), detail))
}

/// The pod's `/usr/local/nvidia` is a hostPath of `<driver root>/current`: inside the host root
/// it must reach the staged bundle's files.
fn mounts(pod: &Value, host: &Path) -> Result<((), String), String> {
    let volumes = pod["spec"]["volumes"].as_array().ok_or("the pod has no volumes")?;
    let gpu = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["resources"]["limits"].get("nvidia.com/gpu").is_some())
        .ok_or("no GPU container")?;
    let mount = gpu["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"] == "/usr/local/nvidia")
        .ok_or("the GPU container does not mount /usr/local/nvidia")?;
    let volume = volumes.iter().find(|v| v["name"] == mount["name"]).ok_or("the mount's volume is missing")?;
    let host_path = volume["hostPath"]["path"].as_str().ok_or("the volume is not a hostPath")?;
    let root = host.join(host_path.trim_start_matches('/'));
    let mut detail = format!("/usr/local/nvidia = hostPath {host_path} (read-only: {})\n", mount["readOnly"]);
    for file in ["bin/nvidia-smi", "lib/libnvidia-ml.so.1", "lib64/libnvidia-ml.so.1", "lib/libcuda.so.1"] {
        let path = root.join(file);
        let meta =
            std::fs::metadata(&path).map_err(|e| format!("/usr/local/nvidia/{file} ({}): {e}", path.display()))?;
        let _ = writeln!(detail, "/usr/local/nvidia/{file}: {} bytes", meta.len());
    }
    Ok(((), detail))
}

fn run_ok(command: &mut Command) -> Result<String, String> {
    let output: Output = command.output().map_err(|e| format!("{command:?}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed ({}):\n{}",
            describe(command),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn describe(command: &Command) -> String {
    let program =
        Path::new(command.get_program()).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let args: Vec<String> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    format!("{program} {}", args.join(" "))
}
