//! Live driver upgrades: a new driver version reaches nodes whose GPUs are in use without a person.
//!
//! The installer's install step, finding another version loaded, stages the new bundle beside it
//! and marks its Node `upgrade-required`; the old driver keeps serving. The upgrade controller (one
//! small Deployment, the only component with cordon and eviction rights) takes at most
//! `maxUnavailable` such nodes at a time: cordons, drains the pods that hold the driver through the
//! Eviction API, then orders the switch by marking the node `unloading` and deleting its installer
//! pod. The replacement pod's install step performs the kernel steps (unload the old modules when
//! nothing holds them, load the new ones, validate, or go back to the old bundle) and marks the
//! node `done` or `failed`; the controller uncordons it. Every state lives in the Node's label and
//! annotations ([`nvidia_contract::UPGRADE_STATE_LABEL`] and friends).

pub mod controller;
pub mod lease;
pub mod metrics;
pub mod plan;

use k8s_openapi::api::core::v1::{Node, Pod};
use nvidia_contract::{
    INIT_CONTAINER, UPGRADE_CORDONED_ANNOTATION, UPGRADE_REASON_ANNOTATION, UPGRADE_SINCE_ANNOTATION,
    UPGRADE_STATE_LABEL, UPGRADE_TARGET_ANNOTATION,
};

use plan::{NodeView, PodView};

/// Where a node's upgrade stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    /// The new bundle is staged beside the loaded driver; waiting for the controller.
    UpgradeRequired,
    Cordoned,
    Draining,
    /// Ordered: the installer pod's replacement unloads the old driver.
    Unloading,
    Installing,
    Validating,
    Done,
    /// With a reason in the `upgrade-reason` annotation; the node keeps a working driver.
    Failed,
}

impl State {
    pub const ALL: [State; 8] = [
        State::UpgradeRequired,
        State::Cordoned,
        State::Draining,
        State::Unloading,
        State::Installing,
        State::Validating,
        State::Done,
        State::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::UpgradeRequired => "upgrade-required",
            State::Cordoned => "cordoned",
            State::Draining => "draining",
            State::Unloading => "unloading",
            State::Installing => "installing",
            State::Validating => "validating",
            State::Done => "done",
            State::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Counted against `maxUnavailable`: the node is cordoned for the upgrade.
    pub fn out_of_service(self) -> bool {
        matches!(self, State::Cordoned | State::Draining | State::Unloading | State::Installing | State::Validating)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many GPU nodes may be out at once: a number, or a percentage of the GPU nodes (rounded
/// down, at least one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxUnavailable {
    Count(usize),
    Percent(u8),
}

impl MaxUnavailable {
    pub fn of(self, nodes: usize) -> usize {
        match self {
            MaxUnavailable::Count(n) => n.max(1),
            MaxUnavailable::Percent(p) => (nodes * usize::from(p) / 100).max(1),
        }
    }
}

impl std::str::FromStr for MaxUnavailable {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bad = || format!("{text:?}: a number of nodes (1) or a percentage (10%)");
        match text.strip_suffix('%') {
            Some(p) => p.parse::<u8>().ok().filter(|p| (1..=100).contains(p)).map(Self::Percent).ok_or_else(bad),
            None => text.parse::<usize>().ok().filter(|n| *n >= 1).map(Self::Count).ok_or_else(bad),
        }
    }
}

/// What to do with pods that have not left when the drain timeout passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DrainPolicy {
    /// Keep evicting and waiting (PodDisruptionBudgets stay in charge), with a warning Event.
    Wait,
    /// Delete the pods that did not leave (bypassing PodDisruptionBudgets).
    ForceAfter,
    /// Give the node up: `failed`, uncordoned, the old driver stays.
    SkipNode,
}

/// Whether a pod holds the GPU driver: it carries the injected `wait` init container, or one of
/// its containers asks for a GPU resource (`patterns`: names, `prefix*` allowed).
pub fn holds_driver(pod: &Pod, patterns: &[String]) -> bool {
    let Some(spec) = &pod.spec else { return false };
    let injected = spec.init_containers.iter().flatten().any(|c| c.name == INIT_CONTAINER);
    let gpu = spec.containers.iter().chain(spec.init_containers.iter().flatten()).any(|c| {
        let resources = c.resources.as_ref();
        let names = resources
            .into_iter()
            .flat_map(|r| r.limits.iter().flatten().chain(r.requests.iter().flatten()).map(|(name, _)| name.as_str()));
        names.into_iter().any(|name| {
            patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == p,
            })
        })
    });
    injected || gpu
}

fn time_of(text: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(text).ok()
}

/// Whether the first condition of `kind` among `(type, status)` pairs is `True`.
fn condition_true<'a>(mut conditions: impl Iterator<Item = (&'a str, &'a str)>, kind: &str) -> bool {
    conditions.find(|(t, _)| *t == kind).is_some_and(|(_, status)| status == "True")
}

/// The controller's view of a Node.
pub fn node_view(node: &Node) -> NodeView {
    let labels = node.metadata.labels.as_ref();
    let annotations = node.metadata.annotations.as_ref();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).cloned();
    NodeView {
        name: node.metadata.name.clone().unwrap_or_default(),
        state: labels.and_then(|l| l.get(UPGRADE_STATE_LABEL)).and_then(|s| State::parse(s)),
        target: annotation(UPGRADE_TARGET_ANNOTATION),
        unschedulable: node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false),
        cordoned_by_us: annotation(UPGRADE_CORDONED_ANNOTATION).as_deref() == Some("true"),
        since: annotation(UPGRADE_SINCE_ANNOTATION).as_deref().and_then(time_of),
        reason: annotation(UPGRADE_REASON_ANNOTATION).filter(|r| !r.is_empty()),
        ready: condition_true(
            node.status.iter().flat_map(|s| s.conditions.iter().flatten()).map(|c| (&*c.type_, &*c.status)),
            "Ready",
        ),
    }
}

/// The controller's view of a Pod; `installer` when it is in the installer's namespace, matches
/// the installer pods' labels and is owned by a DaemonSet (a pod author cannot pass for one).
pub fn pod_view(pod: &Pod, patterns: &[String], namespace: &str, installer: &[(String, String)]) -> Option<PodView> {
    let status = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(status, Some("Succeeded" | "Failed")) {
        return None;
    }
    let labels = pod.metadata.labels.as_ref();
    let daemon = pod.metadata.owner_references.iter().flatten().any(|o| o.kind == "DaemonSet");
    let is_installer = !installer.is_empty()
        && daemon
        && pod.metadata.namespace.as_deref() == Some(namespace)
        && installer.iter().all(|(k, v)| labels.and_then(|l| l.get(k)).is_some_and(|have| have == v));
    Some(PodView {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
        gpu: !is_installer && holds_driver(pod, patterns),
        installer: is_installer,
        terminating: pod.metadata.deletion_timestamp.is_some(),
        daemon,
        created: pod.metadata.creation_timestamp.as_ref().and_then(|t| time_of(&t.0.to_string())),
        initialized: condition_true(
            pod.status.iter().flat_map(|s| s.conditions.iter().flatten()).map(|c| (&*c.type_, &*c.status)),
            "Initialized",
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn states_round_trip_and_only_the_middle_ones_count_as_out() {
        for state in State::ALL {
            assert_eq!(State::parse(state.as_str()), Some(state));
        }
        assert_eq!(State::ALL.iter().filter(|s| s.out_of_service()).count(), 5);
        assert_eq!(State::parse("Done"), None);
    }

    #[test]
    fn max_unavailable_takes_a_count_or_a_percentage() {
        assert_eq!("2".parse::<MaxUnavailable>(), Ok(MaxUnavailable::Count(2)));
        assert_eq!("25%".parse::<MaxUnavailable>(), Ok(MaxUnavailable::Percent(25)));
        assert!("0".parse::<MaxUnavailable>().is_err());
        assert!("150%".parse::<MaxUnavailable>().is_err());
        assert_eq!(MaxUnavailable::Percent(25).of(10), 2);
        assert_eq!(MaxUnavailable::Percent(1).of(10), 1, "at least one");
    }

    #[test]
    fn gpu_pods_are_those_with_the_wait_container_or_a_gpu_resource() {
        let patterns = vec!["nvidia.com/gpu".to_owned(), "nvidia.com/mig-*".to_owned()];
        let pod = |spec: serde_json::Value| -> Pod { serde_json::from_value(json!({"spec": spec})).expect("pod") };
        assert!(holds_driver(
            &pod(json!({"containers": [{"name": "a", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]})),
            &patterns
        ));
        assert!(holds_driver(
            &pod(json!({"containers": [{"name": "a", "resources": {"requests": {"nvidia.com/mig-1g.5gb": "1"}}}]})),
            &patterns
        ));
        assert!(holds_driver(
            &pod(json!({"initContainers": [{"name": INIT_CONTAINER}], "containers": [{"name": "a"}]})),
            &patterns
        ));
        assert!(!holds_driver(
            &pod(json!({"containers": [{"name": "a", "resources": {"limits": {"cpu": "1"}}}]})),
            &patterns
        ));
    }
}
