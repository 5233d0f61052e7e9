//! The mutation: one pure function from a pod and the settings to a JSON Patch.
//!
//! The patch is built from explicit operations so that it applies to the pod exactly as the API
//! server holds it: arrays are created when missing and appended to with `/-` when present, object
//! keys are escaped by [`jsonptr`](json_patch::jsonptr), and nothing the user wrote is replaced
//! except `LD_LIBRARY_PATH`, which is extended.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, PoisonError, RwLock};

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, HostPathVolumeSource, Pod, ResourceRequirements, SeccompProfile, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::Serialize;
use serde_json::{Value, json};

use crate::config::InjectConfig;
use crate::pod::{ContainerView, PodView, SpecView};
use nvidia_contract::{self as contract, NameKind, WaitInvocation};

/// Why a pod was left unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    /// The pod carries `inject: "false"`.
    OptedOut,
    /// The pod already carries the `injected` annotation or the init container.
    AlreadyInjected,
    /// No container asks for a GPU resource and the pod did not opt in.
    NotGpuPod,
    /// The pod defines a volume named like the one the init container needs.
    VolumeConflict,
}

impl SkipReason {
    /// Stable label value for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OptedOut => "opted-out",
            Self::AlreadyInjected => "already-injected",
            Self::NotGpuPod => "not-gpu-pod",
            Self::VolumeConflict => "volume-conflict",
        }
    }

    /// Every reason, for metric initialisation.
    pub const ALL: [SkipReason; 4] = [Self::OptedOut, Self::AlreadyInjected, Self::NotGpuPod, Self::VolumeConflict];
}

/// What the mutation decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The init container was added; `mounted` names the containers that got the driver mount.
    Injected { mounted: Vec<String> },
    /// Nothing was changed.
    Skipped(SkipReason),
}

/// The result of [`mutate`]: the patch (empty when skipped) and warnings for the user.
#[derive(Debug, Clone)]
pub struct Mutation {
    pub outcome: Outcome,
    pub patch: Patch,
    pub warnings: Vec<String>,
}

impl Mutation {
    fn skipped(reason: SkipReason, warnings: Vec<String>) -> Self {
        Self { outcome: Outcome::Skipped(reason), patch: Patch(Vec::new()), warnings }
    }
}

/// Content of the `injected` annotation.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Injected<'a> {
    init_container: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    driver_version: Option<&'a str>,
    mounted: &'a [String],
}

/// Which list of the pod spec a container sits in.
#[derive(Debug, Clone, Copy)]
enum List {
    Containers,
    InitContainers,
}

impl List {
    fn field(self) -> &'static str {
        match self {
            Self::Containers => "containers",
            Self::InitContainers => "initContainers",
        }
    }
}

/// Decide what to inject into `pod` and return it as a JSON Patch against the pod.
///
/// Pure: reads the pod, never serializes it back, so fields this build does not know survive.
pub fn mutate(pod: &Pod, config: &InjectConfig) -> crate::Result<Mutation> {
    mutate_view(&PodView::from(pod), config)
}

/// [`mutate`] on the parts of the pod it reads (what the server parses a review's pod into).
pub fn mutate_view(pod: &PodView, config: &InjectConfig) -> crate::Result<Mutation> {
    let annotations = pod.metadata.annotations.as_ref();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    let mut warnings = Vec::new();

    // Exactly "false" and "true", as the chart's matchConditions compare them: the API server
    // and the offline `inject` decide alike.
    let opt = annotation(contract::INJECT_ANNOTATION);
    if opt == Some("false") {
        return Ok(Mutation::skipped(SkipReason::OptedOut, warnings));
    }
    let opted_in = opt == Some("true");
    if annotation(contract::INJECTED_ANNOTATION).is_some() {
        return Ok(Mutation::skipped(SkipReason::AlreadyInjected, warnings));
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(Mutation::skipped(SkipReason::NotGpuPod, warnings));
    };
    let init_containers = spec.init_containers.as_deref().unwrap_or_default();
    if init_containers.iter().any(|c| c.name == contract::INIT_CONTAINER) {
        return Ok(Mutation::skipped(SkipReason::AlreadyInjected, warnings));
    }

    let gpu_containers: Vec<usize> = indices(&spec.containers, |c| requests_gpu(c, config));
    let gpu_init_containers: Vec<usize> = indices(init_containers, |c| requests_gpu(c, config));
    let (targets, init_targets) = if gpu_containers.is_empty() && gpu_init_containers.is_empty() {
        if !opted_in {
            return Ok(Mutation::skipped(SkipReason::NotGpuPod, warnings));
        }
        ((0..spec.containers.len()).collect(), Vec::new())
    } else {
        (gpu_containers, gpu_init_containers)
    };

    let pin = annotation(contract::DRIVER_VERSION_ANNOTATION).map(str::trim).filter(|v| !v.is_empty());
    if let Some(version) = pin {
        nvidia_contract::names::check(NameKind::DriverVersion, version).map_err(|error| crate::Error::InvalidPin {
            annotation: contract::DRIVER_VERSION_ANNOTATION.to_owned(),
            error,
        })?;
    }

    let volume_names: BTreeSet<&str> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    refuse_injected_volume_references(spec, &volume_names)?;
    if volume_names.contains(contract::ROOT_VOLUME) {
        warnings.push(format!(
            "nvidia-installer: the pod defines a volume named {:?}; it was left as it is and no driver was injected",
            contract::ROOT_VOLUME
        ));
        return Ok(Mutation::skipped(SkipReason::VolumeConflict, warnings));
    }
    let mount_driver = !volume_names.contains(contract::DRIVER_VOLUME);
    if !mount_driver {
        warnings.push(format!(
            "nvidia-installer: the pod defines a volume named {:?}; it was left as it is, and {} is not mounted (the pod still waits for the driver)",
            contract::DRIVER_VOLUME,
            config.mount_path
        ));
    }

    let templates = Templates::for_config(config);
    let mut ops = Vec::new();
    let mut mounted = Vec::new();
    if mount_driver {
        for (list, containers, picked) in [
            (List::Containers, spec.containers.as_slice(), &targets),
            (List::InitContainers, init_containers, &init_targets),
        ] {
            for &index in picked {
                let container = &containers[index];
                if mounts_path(container, &config.mount_path) {
                    warnings.push(format!(
                        "nvidia-installer: container {:?} already mounts {}; it was left as it is",
                        container.name, config.mount_path
                    ));
                    continue;
                }
                mount_into(&mut ops, list, index, container, config, &templates, &mut warnings);
                mounted.push(container.name.clone());
            }
        }
    }

    let mut volumes = vec![templates.root_volume.clone()];
    if mount_driver {
        volumes.push(templates.driver_volume.clone());
    }
    // Volumes and container edits first, the init container last: inserting it at index 0 shifts
    // the indices of the existing init containers.
    let mut head = Vec::new();
    let record = Injected { init_container: contract::INIT_CONTAINER, driver_version: pin, mounted: &mounted };
    add_annotation(
        &mut head,
        pod.metadata.annotations.is_some(),
        contract::INJECTED_ANNOTATION,
        to_json(&record).to_string(),
    );
    append_all(&mut head, &["spec", "volumes"], spec.volumes.is_some(), volumes);
    if let Some(version) = pin {
        pin_to_nodes(&mut head, spec, version, &mut warnings);
    }
    ops.splice(0..0, head);
    let mut wait = templates.wait[usize::from(is_guaranteed(spec))].clone();
    if pin.is_some() {
        wait["args"] = json!(WaitInvocation::for_pod(&config.driver_root, config.wait_timeout, pin).args());
    }
    if spec.init_containers.is_some() {
        ops.push(add(&["spec", "initContainers", "0"], wait));
    } else {
        ops.push(add(&["spec", "initContainers"], Value::Array(vec![wait])));
    }

    Ok(Mutation { outcome: Outcome::Injected { mounted }, patch: Patch(ops), warnings })
}

/// A pod that pins a driver version is scheduled only onto nodes whose installer labelled them
/// with that version (`driver-version=<v>`): a node selector, which the scheduler ANDs with the
/// pod's own selector and affinity. A selector the pod already has for that label is left alone
/// (with a warning when it names another version: the pod could then never start).
fn pin_to_nodes(ops: &mut Vec<PatchOperation>, spec: &SpecView, version: &str, warnings: &mut Vec<String>) {
    let label = contract::DRIVER_VERSION_LABEL;
    match spec.node_selector.as_ref().and_then(|s| s.get(label)) {
        Some(selected) if selected == version => {}
        Some(selected) => warnings.push(format!(
            "nvidia-installer: the pod selects nodes with {label}={selected} but pins driver {version}; it was left as it is and will wait for {version}"
        )),
        None if spec.node_selector.is_some() => ops.push(add(&["spec", "nodeSelector", label], json!(version))),
        None => ops.push(add(&["spec", "nodeSelector"], json!({ label: version }))),
    }
}

/// A mount of a volume the webhook is about to add would get the host's driver directory, and
/// without `readOnly` writably: refuse the pod instead, naming the container and the volume. (A
/// volume the pod defines itself under that name is the pod's own; the webhook does not add one.)
fn refuse_injected_volume_references(spec: &SpecView, defined: &BTreeSet<&str>) -> crate::Result<()> {
    let lists = [
        ("container", Some(&spec.containers)),
        ("init container", spec.init_containers.as_ref()),
        ("ephemeral container", spec.ephemeral_containers.as_ref()),
    ];
    for (list, containers) in lists {
        for container in containers.into_iter().flatten() {
            for mount in container.volume_mounts.iter().flatten() {
                if contract::INJECTED_VOLUMES.contains(&mount.name.as_str()) && !defined.contains(mount.name.as_str()) {
                    return Err(crate::Error::InjectedVolumeReferenced {
                        list,
                        container: container.name.clone(),
                        volume: mount.name.clone(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Ephemeral containers added to a running pod (`kubectl debug`) reach the pod's volumes, the
/// injected host volumes included: refuse one that mounts an injected volume other than
/// read-only.
pub fn check_ephemeral_containers(pod: &PodView) -> crate::Result<()> {
    let containers = pod.spec.iter().flat_map(|s| s.ephemeral_containers.iter().flatten());
    for container in containers {
        for mount in container.volume_mounts.iter().flatten() {
            if contract::INJECTED_VOLUMES.contains(&mount.name.as_str()) && mount.read_only != Some(true) {
                return Err(crate::Error::InjectedVolumeWritable {
                    container: container.name.clone(),
                    volume: mount.name.clone(),
                });
            }
        }
    }
    Ok(())
}

/// The parts of the patch that depend on the settings only, built once per settings: a review
/// then clones them instead of building and serializing Kubernetes objects again.
#[derive(Debug, PartialEq)]
struct Templates {
    root_volume: Value,
    driver_volume: Value,
    mount: Value,
    library_path: Value,
    /// The wait init container for a Burstable pod, then for a Guaranteed one; without a pin.
    wait: [Value; 2],
}

impl Templates {
    fn new(config: &InjectConfig) -> Self {
        let mount = VolumeMount {
            name: contract::DRIVER_VOLUME.to_owned(),
            mount_path: config.mount_path.clone(),
            read_only: Some(true),
            ..VolumeMount::default()
        };
        let library_path =
            EnvVar { name: "LD_LIBRARY_PATH".to_owned(), value: Some(config.library_path()), ..EnvVar::default() };
        Self {
            root_volume: to_json(&root_volume(config)),
            driver_volume: to_json(&driver_volume(config)),
            mount: to_json(&mount),
            library_path: to_json(&library_path),
            wait: [to_json(&wait_container(config, None, false)), to_json(&wait_container(config, None, true))],
        }
    }

    /// The templates of `config`: the last settings' are kept (a server has one), others built.
    fn for_config(config: &InjectConfig) -> Arc<Self> {
        static LAST: RwLock<Option<(InjectConfig, Arc<Templates>)>> = RwLock::new(None);
        if let Some((last, templates)) = LAST.read().unwrap_or_else(PoisonError::into_inner).as_ref()
            && last == config
        {
            return Arc::clone(templates);
        }
        let templates = Arc::new(Self::new(config));
        *LAST.write().unwrap_or_else(PoisonError::into_inner) = Some((config.clone(), Arc::clone(&templates)));
        templates
    }
}

fn indices(containers: &[ContainerView], keep: impl Fn(&ContainerView) -> bool) -> Vec<usize> {
    containers.iter().enumerate().filter(|(_, c)| keep(c)).map(|(i, _)| i).collect()
}

/// Whether the container's requests or limits name a GPU resource.
pub fn requests_gpu(container: &ContainerView, config: &InjectConfig) -> bool {
    let Some(resources) = container.resources.as_ref() else { return false };
    [&resources.requests, &resources.limits]
        .into_iter()
        .flatten()
        .flat_map(BTreeMap::keys)
        .any(|name| config.is_gpu_resource(name))
}

/// Driver versions are path components and flag values: keep them to a safe alphabet.
fn mounts_path(container: &ContainerView, path: &str) -> bool {
    let path = path.trim_end_matches('/');
    container.volume_mounts.iter().flatten().any(|m| m.mount_path.trim_end_matches('/') == path)
}

fn mount_into(
    ops: &mut Vec<PatchOperation>,
    list: List,
    index: usize,
    container: &ContainerView,
    config: &InjectConfig,
    templates: &Templates,
    warnings: &mut Vec<String>,
) {
    let idx = index.to_string();
    let base = ["spec", list.field(), idx.as_str()];
    let mount = templates.mount.clone();
    append_all(ops, &[&base[..], &["volumeMounts"]].concat(), container.volume_mounts.is_some(), [mount]);
    if !config.set_library_path {
        return;
    }
    let libraries = config.library_path();
    let env = container.env.as_ref();
    match env.and_then(|env| env.library_path.as_ref()) {
        None => {
            append_all(ops, &[&base[..], &["env"]].concat(), env.is_some(), [templates.library_path.clone()]);
        }
        Some(var) => {
            if var.from_reference {
                warnings.push(format!(
                    "nvidia-installer: container {:?} takes LD_LIBRARY_PATH from a reference; it was left as it is, add {libraries} to it",
                    container.name
                ));
                return;
            }
            let current = var.value.as_deref().unwrap_or_default();
            if libraries.split(':').all(|dir| current.split(':').any(|have| have == dir)) {
                return;
            }
            let extended = if current.is_empty() { libraries } else { format!("{current}:{libraries}") };
            let at = var.index.to_string();
            ops.push(add(&[&base[..], &["env", at.as_str(), "value"]].concat(), Value::String(extended)));
        }
    }
}

/// Add `items` to the array at `path`: create it when missing, append with `/-` when present.
fn append_all(ops: &mut Vec<PatchOperation>, path: &[&str], exists: bool, items: impl IntoIterator<Item = Value>) {
    if exists {
        let append: Vec<&str> = path.iter().copied().chain(["-"]).collect();
        ops.extend(items.into_iter().map(|item| add(&append, item)));
    } else {
        ops.push(add(path, Value::Array(items.into_iter().collect())));
    }
}

fn add_annotation(ops: &mut Vec<PatchOperation>, exists: bool, key: &str, value: String) {
    if exists {
        ops.push(add(&["metadata", "annotations", key], Value::String(value)));
    } else {
        ops.push(add(&["metadata", "annotations"], json!({ key: value })));
    }
}

fn add(path: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path: PointerBuf::from_tokens(path.iter().copied()), value })
}

fn to_json(value: &impl Serialize) -> Value {
    // Serializing k8s-openapi types and plain structs into a `Value` cannot fail.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn root_volume(config: &InjectConfig) -> Volume {
    host_path_volume(contract::ROOT_VOLUME, &config.driver_root, Some("DirectoryOrCreate"))
}

/// The bundle in use. No type check: the link appears only once the driver is staged, and the
/// containers that mount it start after the init container has seen it ready.
fn driver_volume(config: &InjectConfig) -> Volume {
    host_path_volume(contract::DRIVER_VOLUME, &config.current_path(), None)
}

fn host_path_volume(name: &str, path: &str, kind: Option<&str>) -> Volume {
    Volume {
        name: name.to_owned(),
        host_path: Some(HostPathVolumeSource { path: path.to_owned(), type_: kind.map(str::to_owned) }),
        ..Volume::default()
    }
}

/// A pod is Guaranteed when every container's cpu and memory requests equal its limits.
/// The init container must keep it so, or the pod would drop to Burstable.
fn is_guaranteed(spec: &SpecView) -> bool {
    let all = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    let mut any = false;
    for container in all {
        any = true;
        let Some(resources) = container.resources.as_ref() else { return false };
        let Some(limits) = resources.limits.as_ref() else { return false };
        for name in ["cpu", "memory"] {
            let Some(limit) = limits.get(name) else { return false };
            let request = resources.requests.as_ref().and_then(|r| r.get(name)).unwrap_or(limit);
            if !crate::quantity::same(request, limit) {
                return false;
            }
        }
    }
    any
}

/// The init container that blocks the pod until the node's driver is ready.
pub fn wait_container(config: &InjectConfig, pin: Option<&str>, guaranteed: bool) -> Container {
    let wait = WaitInvocation::for_pod(&config.driver_root, config.wait_timeout, pin);
    let quantities = |cpu: &str, memory: &str| {
        Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.to_owned())),
            ("memory".to_owned(), Quantity(memory.to_owned())),
        ]))
    };
    let resources = if guaranteed {
        ResourceRequirements {
            requests: quantities("10m", "32Mi"),
            limits: quantities("10m", "32Mi"),
            ..Default::default()
        }
    } else {
        ResourceRequirements {
            requests: quantities("10m", "16Mi"),
            limits: Some(BTreeMap::from([("memory".to_owned(), Quantity("32Mi".to_owned()))])),
            ..Default::default()
        }
    };
    Container {
        name: contract::INIT_CONTAINER.to_owned(),
        image: Some(config.installer_image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        command: Some(vec![contract::INSTALLER_BINARY.to_owned()]),
        args: Some(wait.args()),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(contract::NONROOT_UID),
            run_as_group: Some(contract::NONROOT_UID),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), add: None }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".to_owned(), localhost_profile: None }),
            ..SecurityContext::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        volume_mounts: Some(vec![VolumeMount {
            name: contract::ROOT_VOLUME.to_owned(),
            mount_path: wait.driver_root_mount(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Small builder for pods in tests.
    #[derive(Debug, Default)]
    pub struct PodBuilder {
        pod: Value,
    }

    impl PodBuilder {
        pub fn new() -> Self {
            Self {
                pod: json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}}),
            }
        }
        pub fn container(mut self, container: Value) -> Self {
            self.push("containers", container);
            self
        }
        pub fn init_container(mut self, container: Value) -> Self {
            self.push("initContainers", container);
            self
        }
        pub fn annotation(mut self, key: &str, value: &str) -> Self {
            let metadata = &mut self.pod["metadata"];
            if metadata.get("annotations").is_none() {
                metadata["annotations"] = json!({});
            }
            metadata["annotations"][key] = json!(value);
            self
        }
        pub fn volume(mut self, volume: Value) -> Self {
            self.push("volumes", volume);
            self
        }
        fn push(&mut self, field: &str, item: Value) {
            let spec = &mut self.pod["spec"];
            if spec.get(field).is_none() {
                spec[field] = json!([]);
            }
            if let Some(items) = spec[field].as_array_mut() {
                items.push(item);
            }
        }
        pub fn json(self) -> Value {
            self.pod
        }
        pub fn build(self) -> Pod {
            serde_json::from_value(self.pod).expect("test pod")
        }
    }

    pub fn gpu(name: &str) -> Value {
        json!({"name": name, "image": "cuda", "resources": {"limits": {"nvidia.com/gpu": "1"}}})
    }

    pub fn plain(name: &str) -> Value {
        json!({"name": name, "image": "busybox"})
    }

    fn config() -> InjectConfig {
        InjectConfig::new("registry.example/nvidia-installer:1")
    }

    /// Apply the mutation's patch and return the patched pod as JSON.
    fn apply(pod: &Value, mutation: &Mutation) -> Value {
        let mut doc = pod.clone();
        json_patch::patch(&mut doc, &mutation.patch).expect("patch applies");
        doc
    }

    fn run(builder: PodBuilder) -> (Mutation, Value) {
        let raw = builder.json();
        let pod: Pod = serde_json::from_value(raw.clone()).expect("pod");
        let mutation = mutate(&pod, &config()).expect("mutate");
        let patched = apply(&raw, &mutation);
        (mutation, patched)
    }

    fn mount_paths(container: &Value) -> Vec<String> {
        container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| m["mountPath"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    #[test]
    fn gpu_pod_gets_init_container_first_and_mount_only_in_gpu_containers() {
        let (mutation, pod) =
            run(PodBuilder::new().container(plain("sidecar")).container(gpu("trainer")).init_container(plain("setup")));
        assert_eq!(mutation.outcome, Outcome::Injected { mounted: vec!["trainer".into()] });
        let init = pod["spec"]["initContainers"].as_array().expect("init containers");
        assert_eq!(init[0]["name"], contract::INIT_CONTAINER);
        assert_eq!(init[1]["name"], "setup");
        assert_eq!(mount_paths(&pod["spec"]["containers"][1]), vec!["/usr/local/nvidia"]);
        assert!(mount_paths(&pod["spec"]["containers"][0]).is_empty());
        assert!(mount_paths(&init[1]).is_empty());
        assert_eq!(pod["spec"]["containers"][1]["env"][0]["value"], "/usr/local/nvidia/lib:/usr/local/nvidia/lib64");
    }

    #[test]
    fn second_pass_changes_nothing() {
        let (_, once) = run(PodBuilder::new().container(gpu("a")));
        let pod: Pod = serde_json::from_value(once).expect("pod");
        let again = mutate(&pod, &config()).expect("mutate");
        assert_eq!(again.outcome, Outcome::Skipped(SkipReason::AlreadyInjected));
        assert!(again.patch.0.is_empty());
    }

    #[test]
    fn opt_out_and_non_gpu_pods_are_left_alone() {
        let (m, _) = run(PodBuilder::new().container(gpu("a")).annotation(contract::INJECT_ANNOTATION, "false"));
        assert_eq!(m.outcome, Outcome::Skipped(SkipReason::OptedOut));
        let (m, _) = run(PodBuilder::new().container(plain("a")));
        assert_eq!(m.outcome, Outcome::Skipped(SkipReason::NotGpuPod));
    }

    #[test]
    fn opt_in_mounts_every_container() {
        let (m, pod) = run(PodBuilder::new()
            .container(plain("a"))
            .container(plain("b"))
            .annotation(contract::INJECT_ANNOTATION, "true"));
        assert_eq!(m.outcome, Outcome::Injected { mounted: vec!["a".into(), "b".into()] });
        assert_eq!(mount_paths(&pod["spec"]["containers"][1]), vec!["/usr/local/nvidia"]);
    }

    #[test]
    fn pin_reaches_the_wait_arguments_and_bad_pins_are_refused() {
        let (_, pod) =
            run(PodBuilder::new().container(gpu("a")).annotation(contract::DRIVER_VERSION_ANNOTATION, "550.127.05"));
        let args: Vec<&str> = pod["spec"]["initContainers"][0]["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(&args[args.len() - 2..], &["--driver-version", "550.127.05"]);
        let pod =
            PodBuilder::new().container(gpu("a")).annotation(contract::DRIVER_VERSION_ANNOTATION, "../../etc").build();
        let error = mutate(&pod, &config()).expect_err("refused");
        assert!(error.to_string().contains("../../etc"), "{error}");
    }

    #[test]
    fn ld_library_path_is_extended_not_replaced() {
        let mut c = gpu("a");
        c["env"] = json!([{"name": "LD_LIBRARY_PATH", "value": "/opt/lib"}, {"name": "X", "value": "1"}]);
        let (_, pod) = run(PodBuilder::new().container(c));
        assert_eq!(
            pod["spec"]["containers"][0]["env"][0]["value"],
            "/opt/lib:/usr/local/nvidia/lib:/usr/local/nvidia/lib64"
        );
        assert_eq!(pod["spec"]["containers"][0]["env"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn guaranteed_pods_stay_guaranteed() {
        let mut c = gpu("a");
        c["resources"] = json!({"limits": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"}});
        let (_, pod) = run(PodBuilder::new().container(c));
        let resources = &pod["spec"]["initContainers"][0]["resources"];
        assert_eq!(resources["requests"], resources["limits"]);
        let (_, pod) = run(PodBuilder::new().container(gpu("a")));
        let resources = &pod["spec"]["initContainers"][0]["resources"];
        assert_ne!(resources["requests"], resources["limits"]);
    }

    #[test]
    fn volume_name_conflicts_are_reported_not_overwritten() {
        let (m, pod) =
            run(PodBuilder::new().container(gpu("a")).volume(json!({"name": "nvidia-driver", "emptyDir": {}})));
        assert_eq!(m.outcome, Outcome::Injected { mounted: vec![] });
        assert_eq!(m.warnings.len(), 1);
        assert_eq!(pod["spec"]["volumes"][0], json!({"name": "nvidia-driver", "emptyDir": {}}));
        let (m, _) =
            run(PodBuilder::new().container(gpu("a")).volume(json!({"name": "nvidia-installer-root", "emptyDir": {}})));
        assert_eq!(m.outcome, Outcome::Skipped(SkipReason::VolumeConflict));
        assert!(m.patch.0.is_empty());
    }

    #[test]
    fn opt_in_and_out_are_spelled_exactly_as_the_charts_match_conditions_compare() {
        for (value, outcome_injected) in [("false", false), ("False", true), (" false", true), ("FALSE", true)] {
            let (m, _) = run(PodBuilder::new().container(gpu("a")).annotation(contract::INJECT_ANNOTATION, value));
            assert_eq!(matches!(m.outcome, Outcome::Injected { .. }), outcome_injected, "{value:?}");
        }
        let plain = || json!({"name": "a", "image": "img"});
        for (value, opted_in) in [("true", true), ("True", false), ("true ", false)] {
            let (m, _) = run(PodBuilder::new().container(plain()).annotation(contract::INJECT_ANNOTATION, value));
            assert_eq!(matches!(m.outcome, Outcome::Injected { .. }), opted_in, "{value:?}");
        }
    }

    #[test]
    fn any_container_list_mounting_an_injected_volume_is_refused() {
        let borrowing = |volume: &str| json!({"name": "side", "image": "img", "volumeMounts": [{"name": volume, "mountPath": "/x"}]});
        for volume in contract::INJECTED_VOLUMES {
            let pod = PodBuilder::new().container(gpu("a")).container(borrowing(volume)).build();
            let error = mutate(&pod, &config()).expect_err("refused").to_string();
            assert!(error.contains("container \"side\"") && error.contains(volume), "{error}");
            let pod = PodBuilder::new().container(gpu("a")).init_container(borrowing(volume)).build();
            assert!(mutate(&pod, &config()).expect_err("refused").to_string().contains("init container"));
            let mut raw = PodBuilder::new().container(gpu("a")).json();
            raw["spec"]["ephemeralContainers"] = json!([borrowing(volume)]);
            let pod: Pod = serde_json::from_value(raw.clone()).expect("pod");
            assert!(mutate(&pod, &config()).expect_err("refused").to_string().contains("ephemeral container"));
            let view: PodView = serde_json::from_value(raw).expect("view");
            assert!(mutate_view(&view, &config()).is_err(), "the server's view decides alike");
        }
        // The pod's own volume of that name is the pod's business: mounting it is not refused.
        let own = PodBuilder::new()
            .container(gpu("a"))
            .container(borrowing(contract::DRIVER_VOLUME))
            .volume(json!({"name": contract::DRIVER_VOLUME, "emptyDir": {}}))
            .build();
        assert!(mutate(&own, &config()).is_ok());
    }

    #[test]
    fn pins_follow_the_contracts_name_rule() {
        for (pin, valid) in
            [("535.261.03", true), ("550-open", true), ("550+gl1", false), ("../x", false), ("-rf", false)]
        {
            let pod: Pod = serde_json::from_value(
                PodBuilder::new().container(gpu("a")).annotation(contract::DRIVER_VERSION_ANNOTATION, pin).json(),
            )
            .expect("pod");
            assert_eq!(mutate(&pod, &config()).is_ok(), valid, "{pin}");
            assert_eq!(nvidia_contract::names::is_valid(NameKind::DriverVersion, pin), valid, "{pin}");
        }
    }
}
