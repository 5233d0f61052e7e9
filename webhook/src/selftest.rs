//! `nvidia-webhook selftest`: what `helm test` runs in the cluster. It creates a GPU pod in a
//! namespace labelled for injection as a server-side dry run (`dryRun=All`: admission runs, nothing
//! is stored, nothing is scheduled) and checks that the pod the API server answers with carries the
//! injection: the `wait` init container and the driver mounts. That proves the whole path a real
//! pod takes: the MutatingWebhookConfiguration's rules and namespace selector, the Service, the
//! serving certificate against the caBundle, and the mutation itself.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use nvidia_contract::{INIT_CONTAINER, INJECTED_ANNOTATION, MOUNT_PATH};
use serde_json::json;

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub injected: bool,
    /// In words: what was or was not found.
    pub detail: String,
}

/// The GPU pod the check asks the API server to admit.
pub fn probe_pod(resource: &str, image: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "nvidia-webhook-selftest-", "labels": {"app.kubernetes.io/component": "selftest"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "gpu",
                "image": image,
                "resources": {"limits": {resource: "1"}},
            }],
        },
    }))
    .expect("the probe pod is a valid Pod")
}

/// Whether `pod` (as admitted) carries the injection.
pub fn judge(pod: &Pod) -> Verdict {
    let spec = pod.spec.as_ref();
    let init =
        spec.and_then(|s| s.init_containers.as_ref()).is_some_and(|c| c.iter().any(|c| c.name == INIT_CONTAINER));
    let mounted = spec.is_some_and(|s| {
        s.containers.iter().all(|c| {
            c.volume_mounts
                .as_ref()
                .is_some_and(|m| m.iter().any(|m| m.mount_path == MOUNT_PATH && m.read_only == Some(true)))
        })
    });
    let annotated = pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    let mut missing = Vec::new();
    if !init {
        missing.push(format!("no `{INIT_CONTAINER}` init container"));
    }
    if !mounted {
        missing.push(format!("no read-only mount at {MOUNT_PATH}"));
    }
    if !annotated {
        missing.push(format!("no {INJECTED_ANNOTATION} annotation"));
    }
    if missing.is_empty() {
        Verdict {
            injected: true,
            detail: format!("injected: `{INIT_CONTAINER}` init container and {MOUNT_PATH} mounted read-only"),
        }
    } else {
        Verdict {
            injected: false,
            detail: format!(
                "not injected ({}): is the webhook running, the namespace labelled, and the MutatingWebhookConfiguration's caBundle current?",
                missing.join(", ")
            ),
        }
    }
}

/// How long the check waits for a namespace created with it (by the same `helm test`) to get its
/// `default` ServiceAccount, without which the API server refuses every pod.
const NAMESPACE_SETTLE: Duration = Duration::from_secs(60);

/// Whether the API server refused because the namespace's `default` ServiceAccount does not exist
/// yet (the service account controller creates it moments after the namespace).
pub fn namespace_not_ready(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status)
        if (status.code == 403 || status.code == 404) && status.message.contains("serviceaccount"))
}

/// Create the probe pod in `namespace` as a dry run and judge what comes back.
pub async fn run(client: kube::Client, namespace: &str, resource: &str, image: &str) -> Result<Verdict, kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let params = PostParams { dry_run: true, ..PostParams::default() };
    let started = std::time::Instant::now();
    loop {
        match pods.create(&params, &probe_pod(resource, image)).await {
            Ok(admitted) => return Ok(judge(&admitted)),
            Err(error) if namespace_not_ready(&error) && started.elapsed() < NAMESPACE_SETTLE => {
                tracing::info!(%error, namespace, "the namespace is not ready for pods yet; asking again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::InjectConfig;
    use crate::mutate::mutate;

    #[test]
    fn the_probe_is_judged_injected_only_after_the_mutation() {
        let pod = probe_pod("nvidia.com/gpu", "registry.k8s.io/pause:3.10");
        let verdict = judge(&pod);
        assert!(!verdict.injected);
        assert!(verdict.detail.contains(INIT_CONTAINER), "{}", verdict.detail);

        let config = InjectConfig::new("registry.example/nvidia-installer:1");
        let mutation = mutate(&pod, &config).expect("mutates");
        let mut value = serde_json::to_value(&pod).expect("json");
        json_patch::patch(&mut value, &mutation.patch).expect("applies");
        let injected: Pod = serde_json::from_value(value).expect("pod");
        let verdict = judge(&injected);
        assert!(verdict.injected, "{}", verdict.detail);
    }
}
