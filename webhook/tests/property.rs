//! For random pod shapes the patch always applies, the result is a valid `Pod`, GPU containers get
//! exactly one driver mount, nothing else of the pod changes, and a second pass adds nothing.

use k8s_openapi::api::core::v1::Pod;
use nvidia_webhook::{InjectConfig, Outcome, PodView, mutate, mutate_view};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Volume names a container may mount: mostly its pod's own, now and then one the webhook injects.
const MOUNTED: [&str; 6] = ["v0", "v0", "v0", "v0", "nvidia-driver", "nvidia-installer-root"];
const INJECTED: [&str; 2] = ["nvidia-driver", "nvidia-installer-root"];

const RESOURCES: [&str; 5] = ["nvidia.com/gpu", "nvidia.com/mig-2g.20gb", "cpu", "amd.com/gpu", "example.com/fpga"];

fn container(
    name: String,
    resources: Vec<usize>,
    limits: bool,
    mounts: Option<Vec<(bool, usize)>>,
    env: Option<Vec<(bool, bool)>>,
) -> Value {
    let mut c = Map::new();
    c.insert("name".into(), json!(name));
    c.insert("image".into(), json!("img"));
    if !resources.is_empty() {
        let list: Map<String, Value> = resources.iter().map(|&r| (RESOURCES[r].to_owned(), json!("1"))).collect();
        c.insert("resources".into(), json!({ if limits { "limits" } else { "requests" }: list }));
    }
    if let Some(mounts) = mounts {
        let list: Vec<Value> = mounts
            .iter()
            .enumerate()
            .map(|(i, &(at_nvidia, volume))| json!({"name": MOUNTED[volume], "mountPath": if at_nvidia { "/usr/local/nvidia".to_owned() } else { format!("/data{i}") }}))
            .collect();
        c.insert("volumeMounts".into(), Value::Array(list));
    }
    if let Some(env) = env {
        let list: Vec<Value> = env
            .iter()
            .enumerate()
            .map(|(i, &(ld, from))| {
                let name = if ld { "LD_LIBRARY_PATH".to_owned() } else { format!("VAR{i}") };
                if from {
                    json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
                } else {
                    json!({"name": name, "value": "/x"})
                }
            })
            .collect();
        c.insert("env".into(), Value::Array(list));
    }
    Value::Object(c)
}

prop_compose! {
    fn arb_container(prefix: &'static str)(
        id in 0u32..1000,
        resources in prop::collection::vec(0usize..RESOURCES.len(), 0..3),
        limits in any::<bool>(),
        mounts in prop::option::of(prop::collection::vec((prop::bool::weighted(0.1), prop::sample::select(vec![0usize, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0])), 0..3)),
        env in prop::option::of(prop::collection::vec((prop::bool::weighted(0.3), prop::bool::weighted(0.2)), 0..3)),
    ) -> Value {
        container(format!("{prefix}{id}"), resources, limits, mounts, env)
    }
}

prop_compose! {
    fn arb_pod()(
        containers in prop::collection::vec(arb_container("c"), 1..4),
        init in prop::option::of(prop::collection::vec(arb_container("i"), 0..3)),
        sidecar in any::<bool>(),
        volumes in prop::option::of(0usize..3),
        own_driver_volume in prop::bool::weighted(0.1),
        annotations in prop::option::of(prop::collection::btree_map("[a-z~/.]{1,12}", "[a-z]{0,4}", 0..3)),
        opt in prop::option::of(prop::sample::select(vec!["true", "false", "TRUE", "maybe"])),
        pin in prop::option::of(prop::sample::select(vec!["535.261.03", "550.54.15"])),
        name in prop::option::of("[a-z]{1,8}"),
    ) -> Value {
        // Names are unique in a real pod (the API server checks).
        let mut containers = containers;
        for (i, c) in containers.iter_mut().enumerate() {
            c["name"] = json!(format!("c{i}"));
        }
        let mut init = init;
        for (i, c) in init.iter_mut().flatten().enumerate() {
            c["name"] = json!(format!("i{i}"));
        }
        if sidecar && let Some(list) = init.as_mut() && let Some(first) = list.first_mut() {
            first["restartPolicy"] = json!("Always");
        }
        let mut annotations: Option<Map<String, Value>> = annotations.map(|a| a.into_iter().map(|(k, v)| (k, json!(v))).collect());
        for (key, value) in [("nvidia-installer.gardenlinux.io/inject", opt), ("nvidia-installer.gardenlinux.io/driver-version", pin)] {
            if let Some(value) = value {
                annotations.get_or_insert_with(Map::new).insert(key.to_owned(), json!(value));
            }
        }
        let mut metadata = Map::new();
        match name {
            Some(name) => metadata.insert("name".into(), json!(name)),
            None => metadata.insert("generateName".into(), json!("gen-")),
        };
        if let Some(annotations) = annotations {
            metadata.insert("annotations".into(), Value::Object(annotations));
        }
        let mut spec = Map::new();
        spec.insert("containers".into(), Value::Array(containers));
        if let Some(init) = init {
            spec.insert("initContainers".into(), Value::Array(init));
        }
        if let Some(n) = volumes {
            let mut list: Vec<Value> = (0..n).map(|i| json!({"name": format!("v{i}"), "emptyDir": {}})).collect();
            if own_driver_volume {
                list.push(json!({"name": "nvidia-driver", "emptyDir": {}}));
            }
            spec.insert("volumes".into(), Value::Array(list));
        }
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
    }
}

/// The first injected volume name a container mounts without the pod defining that volume.
fn borrowed_volume(pod: &Value) -> Option<String> {
    let defined: Vec<&str> =
        pod["spec"]["volumes"].as_array().into_iter().flatten().filter_map(|v| v["name"].as_str()).collect();
    ["containers", "initContainers"]
        .iter()
        .flat_map(|list| pod["spec"][*list].as_array().into_iter().flatten())
        .flat_map(|c| c["volumeMounts"].as_array().into_iter().flatten())
        .filter_map(|m| m["name"].as_str())
        .find(|name| INJECTED.contains(name) && !defined.contains(name))
        .map(str::to_owned)
}

fn without_injection(pod: &Value) -> Value {
    // Remove what the mutation adds, to compare the rest with the original.
    let mut pod = pod.clone();
    if let Some(a) = pod.pointer_mut("/metadata/annotations").and_then(Value::as_object_mut) {
        a.remove("nvidia-installer.gardenlinux.io/injected");
    }
    if let Some(v) = pod.pointer_mut("/spec/volumes").and_then(Value::as_array_mut) {
        v.retain(|v| !matches!(v["name"].as_str(), Some("nvidia-driver" | "nvidia-installer-root")));
    }
    if let Some(i) = pod.pointer_mut("/spec/initContainers").and_then(Value::as_array_mut) {
        i.retain(|c| c["name"] != "nvidia-driver-wait");
    }
    if let Some(s) = pod.pointer_mut("/spec/nodeSelector").and_then(Value::as_object_mut) {
        s.remove("nvidia-installer.gardenlinux.io/driver-version");
    }
    for list in ["containers", "initContainers"] {
        for c in pod.pointer_mut(&format!("/spec/{list}")).and_then(Value::as_array_mut).into_iter().flatten() {
            if let Some(m) = c.get_mut("volumeMounts").and_then(Value::as_array_mut) {
                m.retain(|m| m["name"] != "nvidia-driver");
            }
            if let Some(e) = c.get_mut("env").and_then(Value::as_array_mut) {
                for var in e.iter_mut() {
                    if var["name"] == "LD_LIBRARY_PATH"
                        && let Some(v) = var.get("value").and_then(Value::as_str)
                    {
                        let kept: Vec<&str> = v.split(':').filter(|d| !d.starts_with("/usr/local/nvidia/")).collect();
                        var["value"] = json!(kept.join(":"));
                    }
                }
                e.retain(|v| !(v["name"] == "LD_LIBRARY_PATH" && v["value"] == ""));
            }
        }
    }
    pod
}

fn normalize(pod: &Value) -> Value {
    // Compare after removing empty arrays/objects the patch may have created.
    let mut pod = without_injection(pod);
    for pointer in ["/metadata/annotations", "/spec/volumes", "/spec/initContainers", "/spec/nodeSelector"] {
        remove_if_empty(&mut pod, pointer);
    }
    for list in ["containers", "initContainers"] {
        for c in pod.pointer_mut(&format!("/spec/{list}")).and_then(Value::as_array_mut).into_iter().flatten() {
            for field in ["volumeMounts", "env"] {
                if c.get(field).is_some_and(|v| v.as_array().is_some_and(Vec::is_empty)) {
                    c.as_object_mut().map(|o| o.remove(field));
                }
            }
        }
    }
    pod
}

fn remove_if_empty(pod: &mut Value, pointer: &str) {
    let empty = pod
        .pointer(pointer)
        .is_some_and(|v| v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(Map::is_empty));
    if empty {
        let (parent, key) = pointer.rsplit_once('/').unwrap_or_default();
        pod.pointer_mut(parent).and_then(Value::as_object_mut).map(|o| o.remove(key));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn patch_applies_keeps_the_pod_and_is_idempotent(raw in arb_pod()) {
        let config = InjectConfig::new("img");
        let pod: Pod = serde_json::from_value(raw.clone()).expect("generated pod reads");
        let borrowed = borrowed_volume(&raw);
        let mutation = match mutate(&pod, &config) {
            Ok(mutation) => mutation,
            Err(error) => {
                // Only a pod that mounts a volume the webhook would add is refused, and the
                // answer names the volume.
                let volume = borrowed.expect("refused only for borrowing an injected volume");
                prop_assert!(error.to_string().contains(&format!("{volume:?}")), "{}", error);
                prop_assert!(mutate_view(&serde_json::from_value(raw).expect("view"), &config).is_err());
                return Ok(());
            }
        };
        if let Outcome::Injected { .. } = &mutation.outcome {
            prop_assert_eq!(borrowed, None, "a pod that mounts an injected volume is never injected");
        }
        // The server reads the pod straight from JSON into the view; inject goes through the
        // typed pod. Both see the same pod and decide the same.
        let view: PodView = serde_json::from_value(raw.clone()).expect("the view reads the pod");
        prop_assert_eq!(&view, &PodView::from(&pod));
        prop_assert_eq!(&mutate_view(&view, &config).expect("view").patch, &mutation.patch);
        let mut patched = raw.clone();
        json_patch::patch(&mut patched, &mutation.patch).expect("patch applies");
        let typed: Pod = serde_json::from_value(patched.clone()).expect("patched pod reads as a Pod");
        prop_assert_eq!(normalize(&patched), normalize(&raw), "only the injection differs");

        // No path through the webhook yields a writable mount of a host volume it added.
        let host_volumes: Vec<&str> = typed.spec.iter().flat_map(|s| s.volumes.iter().flatten())
            .filter(|v| v.host_path.is_some()).map(|v| v.name.as_str()).collect();
        for c in typed.spec.iter().flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten())) {
            for m in c.volume_mounts.iter().flatten().filter(|m| host_volumes.contains(&m.name.as_str())) {
                prop_assert_eq!(m.read_only, Some(true), "{} mounts {} writably", &c.name, &m.name);
            }
        }
        if let Outcome::Injected { mounted } = &mutation.outcome {
            let spec = typed.spec.as_ref().expect("spec");
            // A pinned pod is scheduled only where that driver version is installed.
            if let Some(pin) = raw.pointer("/metadata/annotations/nvidia-installer.gardenlinux.io~1driver-version").and_then(Value::as_str) {
                let selected = spec.node_selector.as_ref().and_then(|s| s.get("nvidia-installer.gardenlinux.io/driver-version"));
                prop_assert_eq!(selected.map(String::as_str), Some(pin));
            }
            let init = spec.init_containers.as_ref().expect("init containers");
            prop_assert_eq!(&init[0].name, "nvidia-driver-wait");
            for c in spec.containers.iter().chain(init.iter().skip(1)) {
                let ours = c.volume_mounts.iter().flatten().filter(|m| m.name == "nvidia-driver").count();
                let at_nvidia = c.volume_mounts.iter().flatten().filter(|m| m.mount_path == "/usr/local/nvidia").count();
                if mounted.contains(&c.name) {
                    prop_assert_eq!((ours, at_nvidia), (1, 1), "{} gets exactly one driver mount", &c.name);
                } else {
                    // A non-target keeps its mounts: none of ours (only of the pod's own volume
                    // of that name, where it has one).
                    let before = ["containers", "initContainers"].iter()
                        .flat_map(|list| raw["spec"][*list].as_array().into_iter().flatten())
                        .filter(|r| r["name"] == c.name.as_str())
                        .flat_map(|r| r["volumeMounts"].as_array().into_iter().flatten())
                        .filter(|m| m["name"] == "nvidia-driver")
                        .count();
                    prop_assert_eq!(ours, before, "{} is not a target", &c.name);
                }
            }
        }
        let again = mutate(&typed, &config).expect("second pass");
        prop_assert!(again.patch.0.is_empty(), "second pass added {:?}", again.patch);
    }
}
