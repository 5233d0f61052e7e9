//! Golden AdmissionReviews: every `tests/golden/<case>.review.json` is sent through the router and
//! the answer (with the patch decoded) must equal `<case>.expected.json`. Set `UPDATE_GOLDEN=1` to
//! rewrite the expected files, then read the diff before committing it.
//!
//! Beyond equality, each answer is checked for meaning: it echoes uid, apiVersion and kind; a patch
//! is base64 JSON that applies to the request's pod; the patched pod reads as a k8s-openapi `Pod`;
//! and a second review of the patched pod adds nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Pod;
use nvidia_webhook::InjectConfig;
use nvidia_webhook::admission::{AppState, router};
use serde_json::{Value, json};
use tower::ServiceExt;

pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

pub fn test_config() -> InjectConfig {
    InjectConfig::new("ghcr.io/gardenlinux/nvidia-installer:0.1.0")
}

async fn post(state: &Arc<AppState>, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
    let request =
        Request::post("/mutate").header("content-type", "application/json").body(Body::from(body)).expect("request");
    let response = router(state.clone()).oneshot(request).await.expect("router answers");
    let status = response.status();
    let bytes = response.into_body().collect().await.expect("body").to_bytes().to_vec();
    (status, bytes)
}

fn decode_patch(answer: &Value) -> Option<Value> {
    let encoded = answer.pointer("/response/patch")?;
    let text = encoded.as_str().expect("patch is a base64 string, as the API server reads []byte");
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).expect("patch is valid base64");
    Some(serde_json::from_slice(&bytes).expect("patch is JSON"))
}

/// Every case, with its review, answer and (when injected) the patched pod.
#[derive(Debug)]
pub struct Case {
    pub name: String,
    pub review: Value,
    pub answer: Value,
    pub patched: Option<Value>,
}

pub async fn run_cases() -> Vec<Case> {
    let state = AppState::new(test_config());
    let mut paths: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("golden dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".review.json"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 20, "golden cases missing: {}", paths.len());
    let mut cases = Vec::new();
    for path in paths {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".review.json"))
            .expect("name")
            .to_owned();
        let body = std::fs::read(&path).expect("read review");
        let review: Value = serde_json::from_slice(&body).expect("review JSON");
        let (status, bytes) = post(&state, body).await;
        assert_eq!(status, StatusCode::OK, "{name}: {}", String::from_utf8_lossy(&bytes));
        let answer: Value = serde_json::from_slice(&bytes).expect("answer JSON");
        let patched = decode_patch(&answer).map(|patch| {
            let mut pod = review["request"]["object"].clone();
            let patch: json_patch::Patch = serde_json::from_value(patch).expect("patch reads as RFC 6902");
            json_patch::patch(&mut pod, &patch).unwrap_or_else(|e| panic!("{name}: patch does not apply: {e}"));
            pod
        });
        cases.push(Case { name, review, answer, patched });
    }
    cases
}

#[tokio::test]
async fn golden_reviews_match_and_mean_what_they_say() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let state = AppState::new(test_config());
    let mut mismatched = Vec::new();
    for case in run_cases().await {
        let Case { name, review, answer, patched } = case;
        // Echo: the API server rejects answers that don't carry its uid, apiVersion and kind.
        assert_eq!(answer["apiVersion"], review["apiVersion"], "{name}");
        assert_eq!(answer["kind"], review["kind"], "{name}");
        assert_eq!(answer["response"]["uid"], review["request"]["uid"], "{name}");
        let mut readable = answer.clone();
        if let Some(patch) = decode_patch(&answer) {
            assert_eq!(answer["response"]["patchType"], "JSONPatch", "{name}");
            readable["response"]["patch"] = patch;
        } else {
            assert!(answer["response"].get("patchType").is_none(), "{name}: patchType without patch");
        }
        if let Some(pod) = &patched {
            let typed: Pod =
                serde_json::from_value(pod.clone()).unwrap_or_else(|e| panic!("{name}: patched pod is not a Pod: {e}"));
            let init = typed.spec.as_ref().and_then(|s| s.init_containers.as_ref()).expect("init containers");
            assert_eq!(init[0].name, "nvidia-driver-wait", "{name}: the wait container comes first");
            let mut again = review.clone();
            again["request"]["object"] = pod.clone();
            let (status, bytes) = post(&state, serde_json::to_vec(&again).expect("json")).await;
            assert_eq!(status, StatusCode::OK);
            let second: Value = serde_json::from_slice(&bytes).expect("json");
            assert!(second["response"].get("patch").is_none(), "{name}: a second pass must add nothing: {second}");
            assert_eq!(second["response"]["allowed"], true, "{name}");
        }
        let expected_path = golden_dir().join(format!("{name}.expected.json"));
        if update {
            std::fs::write(&expected_path, serde_json::to_string_pretty(&readable).expect("json") + "\n")
                .expect("write");
            continue;
        }
        let expected: Value = std::fs::read(&expected_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| panic!("{} missing; run with UPDATE_GOLDEN=1", expected_path.display()));
        if expected != readable {
            mismatched.push(format!(
                "{name}:\n  expected {}\n  got      {}",
                serde_json::to_string(&expected).expect("json"),
                serde_json::to_string(&readable).expect("json")
            ));
        }
    }
    assert!(mismatched.is_empty(), "golden mismatches:\n{}", mismatched.join("\n"));
}

#[tokio::test]
async fn decisions_per_case() {
    let cases = run_cases().await;
    let get = |name: &str| cases.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("case {name}"));
    let allowed = |c: &Case| c.answer["response"]["allowed"] == json!(true);
    for unchanged in [
        "already-injected-annotation",
        "already-has-init-container",
        "opt-out",
        "not-a-gpu-pod",
        "not-a-pod",
        "update-operation",
        "conflicting-root-volume-name",
        "ephemeral-container-read-only-driver-mount",
    ] {
        let case = get(unchanged);
        assert!(allowed(case) && case.patched.is_none(), "{unchanged} must pass unchanged: {}", case.answer);
    }
    for refused in [
        "invalid-pin",
        "malformed-pod",
        "references-injected-root-volume",
        "references-injected-driver-volume",
        "ephemeral-container-writable-driver-mount",
    ] {
        let case = get(refused);
        assert_eq!(case.answer["response"]["allowed"], false, "{refused}");
        assert!(
            case.answer["response"]["status"]["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{refused} says why"
        );
    }
    let mounted = |pod: &Value, list: &str, index: usize| -> Vec<String> {
        pod["spec"][list][index]["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["mountPath"] == "/usr/local/nvidia")
            .map(|m| m["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let conflict = get("conflicting-mount");
    let pod = conflict.patched.as_ref().expect("patched");
    assert_eq!(mounted(pod, "containers", 0), vec!["drivers"], "the user's own mount stays");
    assert_eq!(mounted(pod, "containers", 1), vec!["nvidia-driver"]);
    assert!(conflict.answer["response"]["warnings"][0].as_str().is_some_and(|w| w.contains("own-driver")));
    let sidecars = get("native-sidecar-and-gpu-init").patched.clone().expect("patched");
    // initContainers after injection: [wait, warmup(gpu), gpu-monitor(sidecar, gpu), plain-init]
    assert_eq!(mounted(&sidecars, "initContainers", 1), vec!["nvidia-driver"]);
    assert_eq!(mounted(&sidecars, "initContainers", 2), vec!["nvidia-driver"]);
    assert!(mounted(&sidecars, "initContainers", 3).is_empty());
    let ld = get("ld-library-path").patched.clone().expect("patched");
    assert_eq!(
        ld["spec"]["containers"][0]["env"][0]["value"],
        "/opt/conda/lib:/usr/local/nvidia/lib:/usr/local/nvidia/lib64"
    );
    assert!(ld["spec"]["containers"][1]["env"][0].get("value").is_none(), "valueFrom left alone");
    assert_eq!(ld["spec"]["containers"][2]["env"][0]["value"], "/usr/local/nvidia/lib:/usr/local/nvidia/lib64");
    let keys = get("annotation-keys-with-tilde-and-slash").patched.clone().expect("patched");
    assert_eq!(keys["metadata"]["annotations"]["example.com/a~b"], "tilde");
    assert!(keys["metadata"]["annotations"]["nvidia-installer.gardenlinux.io/injected"].is_string());
    for (case, container, volume) in [
        ("references-injected-root-volume", "container \"sidecar\"", "\"nvidia-installer-root\""),
        ("references-injected-driver-volume", "init container \"prep\"", "\"nvidia-driver\""),
    ] {
        let message = get(case).answer["response"]["status"]["message"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains(container) && message.contains(volume), "{case}: {message}");
    }
    // Requests and limits equal by value (1000m = 1, 1024Mi = 1Gi): the pod is Guaranteed and
    // the wait container keeps it so.
    let by_value = get("guaranteed-qos-by-value").patched.clone().expect("patched");
    let wait = &by_value["spec"]["initContainers"][0]["resources"];
    assert_eq!(wait["requests"], wait["limits"], "{wait}");
    let pinned = get("pinned-version").patched.clone().expect("patched");
    let args = pinned["spec"]["initContainers"][0]["args"].to_string();
    assert!(args.contains("\"--driver-version\",\"535.261.03\""), "{args}");
    assert_eq!(
        pinned["spec"]["nodeSelector"]["nvidia-installer.gardenlinux.io/driver-version"], "535.261.03",
        "a pinned pod goes only to nodes with that driver"
    );
}

#[tokio::test]
async fn bodies_that_are_not_reviews_get_clear_errors() {
    let state = AppState::new(test_config());
    let (status, body) = post(&state, b"{not json".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("not JSON"));
    let (status, body) =
        post(&state, br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#.to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("AdmissionReview"), "{}", String::from_utf8_lossy(&body));
    let huge = vec![b' '; nvidia_webhook::admission::MAX_BODY_BYTES + 1];
    let (status, _) = post(&state, huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let metrics = state.metrics.encode();
    assert!(metrics.contains("nvidia_webhook_errors_total{reason=\"too-large\"} 1"), "{metrics}");
    assert!(metrics.contains("nvidia_webhook_errors_total{reason=\"malformed\"} 2"), "{metrics}");
}

/// The patched pods, written as files for the schema check.
#[tokio::test]
#[ignore = "needs kubernetes-validate from PyPI in .venv (scripts/test installs it)"]
async fn patched_pods_validate_against_the_kubernetes_schema() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files = Vec::new();
    for case in run_cases().await {
        if let Some(mut pod) = case.patched {
            // The validator needs a name; the API server derives it from generateName on storage.
            if pod["metadata"].get("name").is_none() {
                let generated = format!("{}x7k2p", pod["metadata"]["generateName"].as_str().unwrap_or("pod-"));
                pod["metadata"]["name"] = Value::String(generated);
            }
            let path = dir.path().join(format!("{}.json", case.name));
            std::fs::write(&path, serde_json::to_vec_pretty(&pod).expect("json")).expect("write");
            files.push(path);
        }
    }
    assert!(files.len() >= 12, "{} patched pods", files.len());
    let tool = std::env::var_os("KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/kubernetes-validate"));
    assert!(tool.exists(), "{} not found: run scripts/test (it installs kubernetes-validate)", tool.display());
    let versions = std::env::var("KUBERNETES_VERSIONS").unwrap_or_else(|_| "1.28,1.37".to_owned());
    for version in versions.split(',') {
        let output = std::process::Command::new(&tool)
            .args(["--strict", "--kubernetes-version", version])
            .args(&files)
            .output()
            .expect("run kubernetes-validate");
        assert!(
            output.status.success(),
            "kubernetes-validate {version} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
