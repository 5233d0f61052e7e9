//! What the upgrade controller does next, decided from a snapshot of the cluster alone: the
//! states in the Nodes' labels and annotations and the pods on them. Nothing is kept in memory
//! between rounds, so a restarted controller carries on where the API says the rollout stands.

use std::time::{Duration, SystemTime};

use super::{DrainPolicy, MaxUnavailable, State};

/// A GPU node as the controller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub state: Option<State>,
    pub target: Option<String>,
    pub unschedulable: bool,
    /// The controller cordoned it (and so uncordons it when done).
    pub cordoned_by_us: bool,
    /// When the state last changed.
    pub since: Option<SystemTime>,
    /// Why, as the last writer of the state put it.
    pub reason: Option<String>,
    /// The kubelet reports the node Ready: only such nodes are started (a NotReady node's
    /// installer pod would never come back to perform the switch).
    pub ready: bool,
}

/// A pod on a node in the rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub node: String,
    /// Holds the GPU driver: the injected `wait` init container or a GPU resource.
    pub gpu: bool,
    /// The node's installer pod (its init container performs the kernel steps).
    pub installer: bool,
    /// Being deleted already.
    pub terminating: bool,
    /// Owned by a DaemonSet: evicted, it comes straight back (DaemonSet pods tolerate the cordon),
    /// so it is not waited for; if it holds the driver, the switch names it.
    pub daemon: bool,
    pub created: Option<SystemTime>,
    /// Its init containers have finished (for an installer pod: its install step has run).
    pub initialized: bool,
}

/// One step for the controller to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Mark the node unschedulable, remembering that the controller did.
    Cordon {
        node: String,
    },
    /// Make it schedulable again (only nodes the controller cordoned).
    Uncordon {
        node: String,
    },
    SetState {
        node: String,
        state: State,
        reason: Option<String>,
    },
    /// Through the Eviction API: PodDisruptionBudgets decide.
    Evict {
        namespace: String,
        pod: String,
        node: String,
    },
    /// `force-after`: delete a pod that did not leave in time.
    Delete {
        namespace: String,
        pod: String,
        node: String,
    },
    /// Delete the node's installer pod: its replacement's install step performs the switch.
    RestartInstaller {
        namespace: String,
        pod: String,
        node: String,
    },
    Event {
        node: String,
        reason: String,
        message: String,
        warning: bool,
    },
}

/// How the rollout is paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub max_unavailable: MaxUnavailable,
    pub drain_timeout: Duration,
    pub on_drain_timeout: DrainPolicy,
    /// How long a node may stay in `unloading`, `installing` or `validating` before the controller
    /// says so in an Event; a node in `unloading` whose switch nobody performs is given up
    /// (`failed`, its driver kept, its slot freed): see [`unloading_stalled`].
    pub switch_timeout: Duration,
}

impl Action {
    /// What kind of step it is, as the controller's metrics name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Cordon { .. } => "cordon",
            Self::Uncordon { .. } => "uncordon",
            Self::SetState { .. } => "set_state",
            Self::Evict { .. } => "evict",
            Self::Delete { .. } => "delete",
            Self::RestartInstaller { .. } => "restart_installer",
            Self::Event { .. } => "event",
        }
    }

    /// The node the action concerns.
    pub fn node(&self) -> &str {
        match self {
            Self::Cordon { node }
            | Self::Uncordon { node }
            | Self::SetState { node, .. }
            | Self::Evict { node, .. }
            | Self::Delete { node, .. }
            | Self::RestartInstaller { node, .. }
            | Self::Event { node, .. } => node,
        }
    }
}

/// The nodes out of service for the upgrade now: in a state between `cordoned` and `validating`,
/// or cordoned by the controller and not finished (a node whose state was written over).
pub fn unavailable(nodes: &[NodeView]) -> usize {
    nodes
        .iter()
        .filter(|n| {
            n.state.is_some_and(State::out_of_service)
                || (n.cordoned_by_us && !matches!(n.state, Some(State::Done | State::Failed)))
        })
        .count()
}

/// The actions of one round.
pub fn plan(nodes: &[NodeView], pods: &[PodView], policy: &Policy, now: SystemTime) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut sorted: Vec<&NodeView> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let budget = policy.max_unavailable.of(nodes.len());
    let mut out = unavailable(nodes);
    for node in &sorted {
        let on_node = |p: &&PodView| p.node == node.name;
        match node.state {
            Some(State::Done | State::Failed) if node.cordoned_by_us => {
                actions.push(Action::Uncordon { node: node.name.clone() });
            }
            // Cordoned by the controller, its state written over (an installer pod restarted by a
            // second `helm upgrade` asks again): carry on from the cordon.
            Some(State::UpgradeRequired) if node.cordoned_by_us => {
                actions.push(Action::SetState { node: node.name.clone(), state: State::Cordoned, reason: None })
            }
            Some(State::Cordoned) => {
                actions.push(Action::SetState { node: node.name.clone(), state: State::Draining, reason: None })
            }
            Some(State::Draining) => drain(node, pods.iter().filter(on_node).collect(), policy, now, &mut actions),
            Some(State::Unloading) => {
                // The installer pod that runs the switch is the one created after the order; an
                // older one (the controller stopped before deleting it) is deleted now.
                let since = node.since.unwrap_or(SystemTime::UNIX_EPOCH);
                let installers: Vec<&PodView> =
                    pods.iter().filter(on_node).filter(|p| p.installer && !p.terminating).collect();
                for pod in &installers {
                    if pod.created.is_none_or(|created| created < since) {
                        actions.push(Action::RestartInstaller {
                            namespace: pod.namespace.clone(),
                            pod: pod.name.clone(),
                            node: node.name.clone(),
                        });
                    }
                }
                if let Some(waited) = in_state_for(node, now).filter(|w| *w >= policy.switch_timeout) {
                    let long_past = waited >= 2 * policy.switch_timeout;
                    // Only a pod created after the order can have acted on it.
                    let ordered: Vec<&PodView> =
                        installers.iter().copied().filter(|p| p.created.is_some_and(|c| c >= since)).collect();
                    unloading_stalled(node, (&installers, &ordered), (&seconds(waited), long_past), &mut actions);
                }
            }
            Some(state @ (State::Installing | State::Validating)) => {
                if let Some(waited) = in_state_for(node, now).filter(|w| *w >= policy.switch_timeout) {
                    let stalled = seconds(waited);
                    // The old driver may be unloaded already: the node stays cordoned and keeps its
                    // slot (the rollout waits rather than take more nodes into a switch that fails).
                    let readiness = if node.ready { "" } else { "; the node is NotReady" };
                    // The node side wrote the reason: capped, so the Event keeps its own words.
                    let why = node
                        .reason
                        .as_deref()
                        .map(|r| format!(" ({})", crate::node::api::truncated(r, MAX_REASON_BYTES)))
                        .unwrap_or_default();
                    actions.push(Action::Event {
                        node: node.name.clone(),
                        reason: "DriverUpgradeStalled".to_owned(),
                        message: format!(
                            "still {state} after {stalled}{why}{readiness}; the node stays cordoned and keeps its place in the rollout until its installer pod finishes the switch (its log says why)"
                        ),
                        warning: true,
                    });
                }
            }
            _ => {}
        }
    }
    for node in sorted.iter().filter(|n| n.state == Some(State::UpgradeRequired) && !n.cordoned_by_us) {
        if out >= budget {
            break;
        }
        if !node.ready {
            continue;
        }
        out += 1;
        if !node.unschedulable {
            actions.push(Action::Cordon { node: node.name.clone() });
        }
        actions.push(Action::SetState { node: node.name.clone(), state: State::Cordoned, reason: None });
        actions.push(Action::Event {
            node: node.name.clone(),
            reason: "DriverUpgradeStarted".to_owned(),
            message: format!(
                "upgrading the NVIDIA driver to {}: cordoned; {} of at most {budget} GPU nodes out",
                node.target.as_deref().unwrap_or("?"),
                out
            ),
            warning: false,
        });
    }
    actions
}

/// How long the node has been in its state (`None`: its `since` is missing, or ahead of `now`).
fn in_state_for(node: &NodeView, now: SystemTime) -> Option<Duration> {
    now.duration_since(node.since?).ok()
}

/// A duration in whole seconds, as the Events say it.
fn seconds(duration: Duration) -> String {
    humantime::format_duration(Duration::from_secs(duration.as_secs())).to_string()
}

/// How much of a reason the node side wrote goes into an Event of the controller's.
const MAX_REASON_BYTES: usize = 300;

/// A node ordered to switch that has not started within the switch timeout. Nothing has been
/// unloaded yet: the node side records `installing` first, and only while the Node is still at the
/// version it read `unloading` at, and the controller's `failed` is written on the same condition,
/// so whichever comes second is refused. A node whose switch nobody performs (NotReady, no
/// installer pod on it, its installer pod's install step over, or twice the switch timeout gone)
/// is given up: `failed`, then uncordoned with its driver, and its slot goes to the next node. A
/// node whose installer pod is still in its install step is warned about first.
fn unloading_stalled(
    node: &NodeView,
    (installers, ordered): (&[&PodView], &[&PodView]),
    (stalled, long_past): (&str, bool),
    actions: &mut Vec<Action>,
) {
    let names = installers.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect::<Vec<_>>().join(", ");
    let gone = if !node.ready {
        Some("the node is NotReady".to_owned())
    } else if installers.is_empty() {
        Some("no installer pod runs on it (is the DaemonSet's node selector or affinity still matching?)".to_owned())
    } else if !ordered.is_empty() && ordered.iter().all(|p| p.initialized) {
        Some(format!("the install step of {names} ended without switching (its log says why)"))
    } else if long_past {
        Some(format!("the installer pod {names} has not started it"))
    } else {
        None
    };
    match gone {
        Some(why) => {
            let reason = format!("the switch was not performed within {stalled}: {why}");
            let then = "the node keeps the driver it has, is uncordoned, and the rollout goes on without it";
            give_up(node, "DriverUpgradeSkipped", reason, then, actions);
        }
        None => {
            actions.push(Action::Event {
                node: node.name.clone(),
                reason: "DriverUpgradeStalled".to_owned(),
                message: format!(
                    "still unloading after {stalled}: the installer pod {names} has not started the switch (it waits up to its --unload-wait for processes holding the driver; its log names them); the node is given up at twice the switch timeout"
                ),
                warning: true,
            });
        }
    }
}

/// Give the node's upgrade up: `failed` with `reason` (the controller uncordons it next round),
/// and a Warning Event saying so and what follows (`then`).
fn give_up(node: &NodeView, event: &str, reason: String, then: &str, actions: &mut Vec<Action>) {
    let message = format!("{reason}; {then}");
    actions.push(Action::SetState { node: node.name.clone(), state: State::Failed, reason: Some(reason) });
    // After the state: a write the Node refuses (it changed meanwhile) leaves no Event behind.
    actions.push(Action::Event { node: node.name.clone(), reason: event.to_owned(), message, warning: true });
}

/// A draining node: evict its GPU pods; once none is left, order the switch.
fn drain(node: &NodeView, pods: Vec<&PodView>, policy: &Policy, now: SystemTime, actions: &mut Vec<Action>) {
    let holding: Vec<&PodView> = pods.iter().copied().filter(|p| p.gpu && !p.installer && !p.daemon).collect();
    if holding.is_empty() {
        actions.push(Action::SetState { node: node.name.clone(), state: State::Unloading, reason: None });
        for pod in pods.iter().filter(|p| p.installer && !p.terminating) {
            actions.push(Action::RestartInstaller {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                node: node.name.clone(),
            });
        }
        return;
    }
    let waited = in_state_for(node, now).unwrap_or_default();
    let names = holding.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect::<Vec<_>>().join(", ");
    let evict = |actions: &mut Vec<Action>| {
        for pod in holding.iter().filter(|p| !p.terminating) {
            actions.push(Action::Evict {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                node: node.name.clone(),
            });
        }
    };
    if waited < policy.drain_timeout {
        evict(actions);
        return;
    }
    let waited_text = seconds(waited);
    match policy.on_drain_timeout {
        DrainPolicy::Wait => {
            evict(actions);
            actions.push(Action::Event {
                node: node.name.clone(),
                reason: "DrainBlocked".to_owned(),
                message: format!("still draining after {waited_text}; waiting for: {names}"),
                warning: true,
            });
        }
        DrainPolicy::ForceAfter => {
            // Terminating ones too: the forced delete has no grace period.
            for pod in &holding {
                actions.push(Action::Delete {
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                    node: node.name.clone(),
                });
            }
            actions.push(Action::Event {
                node: node.name.clone(),
                reason: "DrainForced".to_owned(),
                message: format!("deleting pods that did not leave within {waited_text}: {names}"),
                warning: true,
            });
        }
        DrainPolicy::SkipNode => {
            let reason = format!("drain timed out after {waited_text}; still on the node: {names}");
            give_up(node, "DriverUpgradeSkipped", reason, "the node keeps its driver and is uncordoned", actions);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, state: Option<State>) -> NodeView {
        NodeView {
            name: name.to_owned(),
            state,
            target: Some("2".to_owned()),
            unschedulable: state.is_some_and(State::out_of_service),
            cordoned_by_us: state.is_some_and(State::out_of_service),
            since: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1000)),
            reason: None,
            ready: true,
        }
    }

    fn pod(name: &str, node: &str, gpu: bool, installer: bool) -> PodView {
        PodView {
            namespace: "ml".to_owned(),
            name: name.to_owned(),
            node: node.to_owned(),
            gpu,
            installer,
            terminating: false,
            daemon: false,
            created: Some(SystemTime::UNIX_EPOCH),
            initialized: false,
        }
    }

    fn policy(max: MaxUnavailable, on_timeout: DrainPolicy) -> Policy {
        Policy {
            max_unavailable: max,
            drain_timeout: Duration::from_secs(60),
            on_drain_timeout: on_timeout,
            switch_timeout: Duration::from_secs(900),
        }
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn no_more_than_max_unavailable_are_started_counting_those_already_out() {
        let nodes = vec![
            node("a", Some(State::Draining)),
            node("b", Some(State::UpgradeRequired)),
            node("c", Some(State::UpgradeRequired)),
            node("d", Some(State::UpgradeRequired)),
            node("e", None),
        ];
        let actions = plan(&nodes, &[], &policy(MaxUnavailable::Count(2), DrainPolicy::Wait), at(1001));
        let cordoned: Vec<_> = actions
            .iter()
            .filter_map(|a| if let Action::Cordon { node } = a { Some(node.as_str()) } else { None })
            .collect();
        assert_eq!(cordoned, ["b"], "a is out already; one more makes two");
        let actions = plan(&nodes, &[], &policy(MaxUnavailable::Percent(40), DrainPolicy::Wait), at(1001));
        assert!(actions.iter().any(|a| *a == Action::Cordon { node: "b".into() }), "40% of 5 is 2");
        assert!(!actions.iter().any(|a| *a == Action::Cordon { node: "c".into() }));
    }

    #[test]
    fn draining_evicts_only_gpu_pods_then_orders_the_switch() {
        let nodes = vec![node("a", Some(State::Draining))];
        let pods = vec![pod("train", "a", true, false), pod("web", "a", false, false), pod("inst", "a", false, true)];
        let actions = plan(&nodes, &pods, &policy(MaxUnavailable::Count(1), DrainPolicy::Wait), at(1010));
        assert_eq!(actions, vec![Action::Evict { namespace: "ml".into(), pod: "train".into(), node: "a".into() }]);
        let pods = vec![pod("web", "a", false, false), pod("inst", "a", false, true)];
        let actions = plan(&nodes, &pods, &policy(MaxUnavailable::Count(1), DrainPolicy::Wait), at(1010));
        assert_eq!(
            actions,
            vec![
                Action::SetState { node: "a".into(), state: State::Unloading, reason: None },
                Action::RestartInstaller { namespace: "ml".into(), pod: "inst".into(), node: "a".into() },
            ]
        );
    }

    #[test]
    fn a_drain_past_its_timeout_follows_the_policy() {
        let nodes = vec![node("a", Some(State::Draining))];
        let pods = vec![pod("train", "a", true, false)];
        let late = at(1000 + 61);
        let wait = plan(&nodes, &pods, &policy(MaxUnavailable::Count(1), DrainPolicy::Wait), late);
        assert!(wait.iter().any(|a| matches!(a, Action::Event { reason, message, .. } if reason == "DrainBlocked" && message.contains("ml/train"))));
        let force = plan(&nodes, &pods, &policy(MaxUnavailable::Count(1), DrainPolicy::ForceAfter), late);
        assert!(force.contains(&Action::Delete { namespace: "ml".into(), pod: "train".into(), node: "a".into() }));
        let skip = plan(&nodes, &pods, &policy(MaxUnavailable::Count(1), DrainPolicy::SkipNode), late);
        assert!(skip.iter().any(
            |a| matches!(a, Action::SetState { state: State::Failed, reason: Some(r), .. } if r.contains("ml/train"))
        ));
    }

    #[test]
    fn finished_nodes_are_uncordoned_only_when_the_controller_cordoned_them() {
        let mut theirs = node("b", Some(State::Done));
        theirs.cordoned_by_us = false;
        theirs.unschedulable = true;
        let ours = |name: &str, state: State| NodeView {
            cordoned_by_us: true,
            unschedulable: true,
            ..node(name, Some(state))
        };
        let nodes = vec![ours("a", State::Done), theirs, ours("c", State::Failed)];
        let actions = plan(&nodes, &[], &policy(MaxUnavailable::Count(1), DrainPolicy::Wait), at(2000));
        assert_eq!(actions, vec![Action::Uncordon { node: "a".into() }, Action::Uncordon { node: "c".into() }]);
    }

    #[test]
    fn an_installer_pod_older_than_the_order_is_restarted_again_after_a_controller_restart() {
        let nodes = vec![node("a", Some(State::Unloading))];
        let mut old = pod("inst-old", "a", false, true);
        old.created = Some(at(10));
        let mut new = pod("inst-new", "a", false, true);
        new.created = Some(at(1500));
        let actions = plan(&nodes, &[old, new.clone()], &policy(MaxUnavailable::Count(1), DrainPolicy::Wait), at(1501));
        assert_eq!(
            actions,
            vec![Action::RestartInstaller { namespace: "ml".into(), pod: "inst-old".into(), node: "a".into() }]
        );
        assert!(plan(&nodes, &[new], &policy(MaxUnavailable::Count(1), DrainPolicy::Wait), at(1501)).is_empty());
    }

    #[test]
    fn not_ready_nodes_are_not_started_and_daemon_pods_are_not_waited_for() {
        let mut down = node("a", Some(State::UpgradeRequired));
        down.ready = false;
        let nodes = vec![down, node("b", Some(State::UpgradeRequired))];
        let actions = plan(&nodes, &[], &policy(MaxUnavailable::Count(1), DrainPolicy::Wait), at(1001));
        assert!(actions.contains(&Action::Cordon { node: "b".into() }), "{actions:?}");
        assert!(!actions.contains(&Action::Cordon { node: "a".into() }));

        let nodes = vec![node("c", Some(State::Draining))];
        let mut daemon = pod("exporter", "c", true, false);
        daemon.daemon = true;
        let actions = plan(&nodes, &[daemon], &policy(MaxUnavailable::Count(1), DrainPolicy::Wait), at(1001));
        assert_eq!(actions[0], Action::SetState { node: "c".into(), state: State::Unloading, reason: None });
    }

    #[test]
    fn a_node_the_controller_cordoned_counts_as_out_whatever_its_label_says() {
        let mut overwritten = node("a", Some(State::UpgradeRequired));
        overwritten.cordoned_by_us = true;
        let nodes = vec![overwritten, node("b", Some(State::UpgradeRequired))];
        let actions = plan(&nodes, &[], &policy(MaxUnavailable::Count(1), DrainPolicy::Wait), at(1001));
        assert_eq!(actions, vec![Action::SetState { node: "a".into(), state: State::Cordoned, reason: None }]);
    }

    #[test]
    fn force_after_deletes_terminating_pods_too() {
        let nodes = vec![node("a", Some(State::Draining))];
        let mut stuck = pod("train", "a", true, false);
        stuck.terminating = true;
        let actions = plan(&nodes, &[stuck], &policy(MaxUnavailable::Count(1), DrainPolicy::ForceAfter), at(1061));
        assert!(actions.contains(&Action::Delete { namespace: "ml".into(), pod: "train".into(), node: "a".into() }));
    }

    #[test]
    fn a_node_ordered_to_switch_that_nobody_can_switch_is_given_up_after_the_switch_timeout() {
        let pol = policy(MaxUnavailable::Count(1), DrainPolicy::Wait);
        let mut lost = node("a", Some(State::Unloading));
        lost.ready = false;
        let waiting = node("b", Some(State::UpgradeRequired));
        let before = plan(&[lost.clone(), waiting.clone()], &[], &pol, at(1000 + 899));
        assert!(before.is_empty(), "within the switch timeout nothing happens: {before:?}");
        let after = plan(&[lost.clone(), waiting.clone()], &[], &pol, at(1000 + 900));
        assert!(
            after.iter().any(|a| matches!(a, Action::SetState { node, state: State::Failed, reason: Some(r) }
                if node == "a" && r.contains("NotReady") && r.contains("15m"))),
            "{after:?}"
        );
        assert!(
            after
                .iter()
                .any(|a| matches!(a, Action::Event { reason, warning: true, .. } if reason == "DriverUpgradeSkipped"))
        );
        // Failed, then uncordoned the next round, and its slot goes to the next node.
        lost.state = Some(State::Failed);
        let next = plan(&[lost, waiting], &[], &pol, at(1000 + 910));
        assert!(next.contains(&Action::Uncordon { node: "a".into() }), "{next:?}");
        assert!(next.contains(&Action::Cordon { node: "b".into() }), "{next:?}");

        // Ready, but no installer pod on it: nobody will switch it either.
        let orphan = node("c", Some(State::Unloading));
        let actions = plan(std::slice::from_ref(&orphan), &[], &pol, at(1000 + 900));
        assert!(
            actions.iter().any(|a| matches!(a, Action::SetState { state: State::Failed, reason: Some(r), .. } if r.contains("no installer pod"))),
            "{actions:?}"
        );
        // Ready with its installer pod still in its install step (waiting for a process to let
        // go): warned about, given up only at twice the switch timeout.
        let mut installer = pod("inst", "c", false, true);
        installer.created = Some(at(1001));
        let actions = plan(std::slice::from_ref(&orphan), std::slice::from_ref(&installer), &pol, at(1000 + 900));
        assert!(!actions.iter().any(|a| matches!(a, Action::SetState { .. })), "{actions:?}");
        assert!(actions.iter().any(|a| matches!(a, Action::Event { reason, message, .. }
            if reason == "DriverUpgradeStalled" && message.contains("ml/inst"))));
        let actions = plan(std::slice::from_ref(&orphan), std::slice::from_ref(&installer), &pol, at(1000 + 1800));
        assert!(
            actions.iter().any(|a| matches!(a, Action::SetState { state: State::Failed, reason: Some(r), .. }
                if r.contains("has not started it") && r.contains("30m"))),
            "{actions:?}"
        );
        // Its install step over without switching (its order read as something else): given up.
        installer.initialized = true;
        let actions = plan(std::slice::from_ref(&orphan), &[installer.clone()], &pol, at(1000 + 900));
        assert!(
            actions.iter().any(|a| matches!(a, Action::SetState { state: State::Failed, reason: Some(r), .. }
                if r.contains("ended without switching"))),
            "{actions:?}"
        );
        // A pod from before the order (a controller that stopped before deleting it) is restarted,
        // not taken for one whose install step ended without switching.
        let mut stale = installer.clone();
        stale.created = Some(at(10));
        let actions = plan(std::slice::from_ref(&orphan), &[stale], &pol, at(1000 + 900));
        assert!(!actions.iter().any(|a| matches!(a, Action::SetState { .. })), "{actions:?}");
        assert!(actions.iter().any(|a| matches!(a, Action::RestartInstaller { pod, .. } if pod == "inst")));
        // NotReady with its installer pod still there: given up too (nothing was unloaded).
        let mut gone = orphan.clone();
        gone.ready = false;
        installer.initialized = false;
        let actions = plan(&[gone], &[installer], &pol, at(1000 + 900));
        assert!(actions.iter().any(|a| matches!(a, Action::SetState { state: State::Failed, .. })), "{actions:?}");
    }

    #[test]
    fn a_node_without_a_readable_since_or_one_ahead_of_the_clock_is_not_timed_out() {
        let pol = policy(MaxUnavailable::Count(1), DrainPolicy::Wait);
        let mut unknown = node("a", Some(State::Unloading));
        unknown.ready = false;
        unknown.since = None;
        assert!(plan(std::slice::from_ref(&unknown), &[], &pol, at(1_000_000)).is_empty());
        unknown.since = Some(at(5000));
        assert!(plan(&[unknown], &[], &pol, at(1000)).is_empty(), "a since in the future");
    }

    #[test]
    fn the_node_sides_reason_is_capped_in_the_controllers_event() {
        let pol = policy(MaxUnavailable::Count(1), DrainPolicy::Wait);
        let mut stuck = node("a", Some(State::Validating));
        stuck.reason = Some("é".repeat(2000));
        let actions = plan(&[stuck], &[], &pol, at(1000 + 900));
        let Some(Action::Event { message, .. }) = actions.first() else { panic!("{actions:?}") };
        assert!(message.len() < 600, "{}", message.len());
        assert!(message.ends_with("(its log says why)"), "the controller's own words stay: {message}");
    }

    #[test]
    fn a_node_stalled_mid_switch_is_reported_and_keeps_its_slot() {
        let pol = policy(MaxUnavailable::Count(1), DrainPolicy::Wait);
        let mut stuck = node("a", Some(State::Installing));
        stuck.reason = Some("no driver is loaded".to_owned());
        stuck.ready = false;
        let waiting = node("b", Some(State::UpgradeRequired));
        let actions = plan(&[stuck.clone(), waiting.clone()], &[], &pol, at(1000 + 3600));
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert!(matches!(&actions[0], Action::Event { node, reason, message, warning: true }
            if node == "a" && reason == "DriverUpgradeStalled" && message.contains("still installing after 1h")
                && message.contains("no driver is loaded") && message.contains("NotReady")));
        stuck.state = Some(State::Validating);
        assert!(plan(&[stuck, waiting], &[], &pol, at(1000 + 60)).is_empty(), "not before the switch timeout");
    }

    #[test]
    fn every_action_names_its_node() {
        let actions = [
            Action::Cordon { node: "a".into() },
            Action::Uncordon { node: "a".into() },
            Action::SetState { node: "a".into(), state: State::Done, reason: None },
            Action::Evict { namespace: "n".into(), pod: "p".into(), node: "a".into() },
            Action::Delete { namespace: "n".into(), pod: "p".into(), node: "a".into() },
            Action::RestartInstaller { namespace: "n".into(), pod: "p".into(), node: "a".into() },
            Action::Event { node: "a".into(), reason: String::new(), message: String::new(), warning: false },
        ];
        assert!(actions.iter().all(|a| a.node() == "a"));
    }
}
