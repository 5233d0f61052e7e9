//! `nvidia-webhook inject`: the webhook's mutation applied offline to manifests.
//!
//! Pods are mutated as the API server would have them mutated; workload kinds have their pod
//! template rewritten, so `kubectl apply` of the output needs no webhook. Other kinds pass through.

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::Value;

use crate::config::InjectConfig;
use crate::mutate::{Outcome, mutate};
use crate::{Error, Result};

/// A mutated document and what happened to it.
#[derive(Debug)]
pub struct Injected {
    pub document: Value,
    /// One line per pod or template: what was done, and any warnings.
    pub notes: Vec<String>,
}

/// Where the pod template sits in a workload of the given kind.
pub fn template_path(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" | "ReplicationController" => {
            Some("/spec/template")
        }
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// Mutate one document (a `List` is handled item by item).
pub fn inject_document(mut document: Value, index: usize, config: &InjectConfig) -> Result<Injected> {
    let mut notes = Vec::new();
    inject_in_place(&mut document, index, config, &mut notes)?;
    Ok(Injected { document, notes })
}

fn inject_in_place(document: &mut Value, index: usize, config: &InjectConfig, notes: &mut Vec<String>) -> Result<()> {
    let kind = document.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
    if kind == "List" {
        if let Some(items) = document.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                inject_in_place(item, index, config, notes)?;
            }
        }
        return Ok(());
    }
    let Some(path) = template_path(&kind) else { return Ok(()) };
    let name = document.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("(unnamed)").to_owned();
    let fail = |reason: String| Error::Manifest { index, reason: format!("{kind} {name}: {reason}") };
    let Some(template) = document.pointer_mut(path) else {
        return Err(fail(format!("has no pod template at {path}")));
    };
    if let Some(object) = template.as_object_mut() {
        // A template may omit metadata; the annotation needs an object to land in.
        object.entry("metadata").or_insert_with(|| Value::Object(Default::default()));
    }
    let pod: Pod = serde_json::from_value(template.clone())
        .map_err(|e| fail(format!("pod template does not read as a pod: {e}")))?;
    let mutation = mutate(&pod, config).map_err(|e| fail(e.to_string()))?;
    json_patch::patch(template, &mutation.patch).map_err(|e| fail(format!("patch does not apply: {e}")))?;
    let what = match &mutation.outcome {
        Outcome::Injected { mounted } => format!(
            "injected; driver mounted in {}",
            if mounted.is_empty() { "no container".to_owned() } else { mounted.join(", ") }
        ),
        Outcome::Skipped(reason) => format!("unchanged ({})", reason.as_str()),
    };
    notes.push(format!("{kind}/{name}: {what}"));
    notes.extend(mutation.warnings.into_iter().map(|w| format!("{kind}/{name}: warning: {w}")));
    Ok(())
}

/// Read one or many YAML or JSON documents, mutate them, and render them in the input's format.
pub fn inject_text(input: &str, config: &InjectConfig) -> Result<(String, Vec<String>)> {
    let json_input = input.trim_start().starts_with(['{', '[']);
    let mut documents = Vec::new();
    if json_input {
        let stream = serde_json::Deserializer::from_str(input).into_iter::<Value>();
        for (index, document) in stream.enumerate() {
            documents.push(document.map_err(|e| Error::Manifest { index, reason: format!("not JSON: {e}") })?);
        }
    } else {
        for (index, document) in serde_yaml_ng::Deserializer::from_str(input).enumerate() {
            let value = Value::deserialize(document)
                .map_err(|e| Error::Manifest { index, reason: format!("not YAML: {e}") })?;
            if !value.is_null() {
                documents.push(value);
            }
        }
    }
    let mut notes = Vec::new();
    let mut out = String::new();
    for (index, document) in documents.into_iter().enumerate() {
        let injected = inject_document(document, index, config)?;
        notes.extend(injected.notes);
        let rendered = if json_input {
            serde_json::to_string_pretty(&injected.document)
                .map(|s| s + "\n")
                .map_err(|e| Error::Manifest { index, reason: e.to_string() })?
        } else {
            let yaml = serde_yaml_ng::to_string(&injected.document)
                .map_err(|e| Error::Manifest { index, reason: e.to_string() })?;
            format!("---\n{yaml}")
        };
        out.push_str(&rendered);
    }
    Ok((out, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: trainer}
spec:
  selector: {matchLabels: {app: t}}
  template:
    metadata: {labels: {app: t}}
    spec:
      containers:
      - name: main
        image: cuda
        resources: {limits: {nvidia.com/gpu: 1}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {a: b}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: "0 0 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers:
          - {name: job, image: cuda, resources: {limits: {nvidia.com/mig-1g.10gb: 1}}}
"#;

    #[test]
    fn templates_are_rewritten_and_other_kinds_pass_through() {
        let config = InjectConfig::new("img");
        let (out, notes) = inject_text(DEPLOYMENT, &config).expect("inject");
        let docs: Vec<Value> =
            serde_yaml_ng::Deserializer::from_str(&out).map(|d| Value::deserialize(d).expect("yaml")).collect();
        assert_eq!(docs.len(), 3);
        assert_eq!(
            docs[0].pointer("/spec/template/spec/initContainers/0/name").and_then(Value::as_str),
            Some("nvidia-driver-wait")
        );
        assert_eq!(
            docs[1],
            serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"a": "b"}})
        );
        assert_eq!(
            docs[2]
                .pointer("/spec/jobTemplate/spec/template/spec/containers/0/volumeMounts/0/mountPath")
                .and_then(Value::as_str),
            Some("/usr/local/nvidia")
        );
        assert_eq!(notes.len(), 2, "{notes:?}");
        let (again, _) = inject_text(&out, &config).expect("inject again");
        assert_eq!(again, out, "a second pass changes nothing");
    }

    #[test]
    fn json_in_json_out_and_errors_name_the_document() {
        let config = InjectConfig::new("img");
        let pod = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","annotations":{"nvidia-installer.gardenlinux.io/driver-version":"a b"}},"spec":{"containers":[{"name":"c","resources":{"limits":{"nvidia.com/gpu":"1"}}}]}}"#;
        let error = inject_text(pod, &config).expect_err("bad pin");
        assert!(error.to_string().contains("document 0") && error.to_string().contains("Pod p"), "{error}");
        let ok = pod.replace("a b", "550.1");
        let (out, _) = inject_text(&ok, &config).expect("inject");
        assert!(out.trim_start().starts_with('{'));
    }
}
