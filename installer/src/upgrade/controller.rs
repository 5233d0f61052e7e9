//! `nvidia-installer upgrade-controller`: reads the cluster, [`plan`](super::plan::plan)s a round,
//! and performs it through the API server. One replica; a restarted one carries on from the Nodes'
//! labels.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams};
use nvidia_contract::{
    DRIVER_READY_LABEL, UPGRADE_CORDONED_ANNOTATION, UPGRADE_REASON_ANNOTATION, UPGRADE_SINCE_ANNOTATION,
    UPGRADE_STATE_LABEL,
};
use serde_json::json;
use tracing::{info, warn};

use super::lease::{Elector, LeaseConfig};
use super::metrics::Stats;
use super::plan::{self, Action, Policy};
use super::{State, node_view, pod_view};
use crate::node::api::node_event;
use crate::{Error, Result};

/// What the controller watches and how it paces the rollout.
#[derive(Debug, Clone)]
pub struct Config {
    /// The installer pods' namespace and labels (their init container performs the switch).
    pub namespace: String,
    pub installer_labels: Vec<(String, String)>,
    /// GPU resource names (`prefix*` allowed): pods asking for one hold the driver.
    pub gpu_resources: Vec<String>,
    pub policy: Policy,
    pub interval: Duration,
    /// The Lease in `namespace` that one controller at a time holds.
    pub lease: LeaseConfig,
    /// Where to serve the controller's metrics (`GET /metrics`, plain HTTP).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// The merge patch that moves a node to `state` (with `reason`, or none), now.
pub fn state_patch(state: State, reason: Option<&str>) -> serde_json::Value {
    json!({"metadata": {
        "labels": {UPGRADE_STATE_LABEL: state.as_str()},
        "annotations": {
            UPGRADE_SINCE_ANNOTATION: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            UPGRADE_REASON_ANNOTATION: reason,
        },
    }})
}

/// Run rounds every `config.interval` until `stop` resolves.
pub async fn run(client: kube::Client, config: Config, stop: impl Future<Output = ()>) -> Result<()> {
    let elector = Elector::new(client.clone(), &config.namespace, &config.lease);
    let stats = Arc::new(Mutex::new(Stats::default()));
    if let Some(listen) = config.metrics_listen {
        let listener = crate::node::metrics::bind(listen).await?;
        let shown = Arc::clone(&stats);
        tokio::spawn(crate::node::metrics::serve_rendered(listener, move || {
            shown.lock().map(|s| super::metrics::render(&s)).unwrap_or_default()
        }));
    }
    let mut controller = Controller { client, config, warned: HashMap::new(), elector, stats };
    tokio::pin!(stop);
    info!(
        namespace = %controller.config.namespace,
        max_unavailable = ?controller.config.policy.max_unavailable,
        drain_timeout = %humantime::format_duration(controller.config.policy.drain_timeout),
        switch_timeout = %humantime::format_duration(controller.config.policy.switch_timeout),
        on_drain_timeout = ?controller.config.policy.on_drain_timeout,
        lease = %controller.config.lease.name,
        identity = %controller.config.lease.identity,
        "upgrade controller started"
    );
    // Between rounds the Lease is renewed (or watched) often enough that a long interval does
    // not let it lapse.
    let renew_every = controller.config.lease.duration.max(Duration::from_secs(1)) / 3;
    loop {
        let outcome = controller.round().await;
        if let Err(error) = &outcome {
            warn!(%error, "upgrade round failed; trying again");
        }
        controller.record(|s| s.round(outcome.is_ok()));
        let next_round = Instant::now() + controller.config.interval;
        while let Some(left) = next_round.checked_duration_since(Instant::now()).filter(|l| !l.is_zero()) {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tokio::time::sleep(left.min(renew_every)) => {}
            }
            if Instant::now() < next_round
                && let Err(error) = controller.elector.lead().await
            {
                warn!(%error, "renewing the upgrade controller's lease");
            }
        }
    }
}

struct Controller {
    client: kube::Client,
    config: Config,
    /// When a warning Event about a pod was last recorded (so a blocked drain does not flood).
    warned: HashMap<String, Instant>,
    elector: Elector,
    stats: Arc<Mutex<Stats>>,
}

/// The longest one API call of a round may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// At most one warning Event per pod and reason this often.
const WARN_EVERY: Duration = Duration::from_secs(120);

impl Controller {
    /// Change the figures the metrics show.
    fn record(&self, change: impl FnOnce(&mut Stats)) {
        if let Ok(mut stats) = self.stats.lock() {
            change(&mut stats);
        }
    }

    /// One round: read, plan, act.
    async fn round(&mut self) -> Result<()> {
        let leading = self.elector.lead().await;
        self.record(|s| s.leader = matches!(leading, Ok(true)));
        if !leading? {
            return Ok(());
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        let listed = nodes
            .list(&ListParams::default().labels(DRIVER_READY_LABEL))
            .await
            .map_err(|e| api_error("listing the GPU nodes", "", e))?;
        let views: Vec<_> = listed.items.iter().map(node_view).collect();
        let budget = self.config.policy.max_unavailable.of(views.len());
        self.record(|s| s.saw(views.iter().map(|v| v.state), plan::unavailable(&views), budget));
        // Every Node write is conditional on the version this round planned from (and then on
        // the version the write before it left): one the node side changed meanwhile is refused
        // and looked at again next round.
        let mut versions: HashMap<String, String> = listed
            .items
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.resource_version.clone()?)))
            .collect();
        let mut pods = Vec::new();
        // Nodes whose pods could not be listed: nothing is done on them this round (an empty list
        // would read as a drained node), the others go on.
        let mut unknown = HashSet::new();
        let pods_api: Api<Pod> = Api::all(self.client.clone());
        for node in views.iter().filter(|n| matches!(n.state, Some(State::Draining | State::Unloading))) {
            let params = ListParams::default().fields(&format!("spec.nodeName={}", node.name));
            match tokio::time::timeout(STEP_TIMEOUT, pods_api.list(&params)).await {
                Ok(Ok(on_node)) => pods.extend(on_node.items.iter().filter_map(|p| {
                    pod_view(p, &self.config.gpu_resources, &self.config.namespace, &self.config.installer_labels)
                })),
                Ok(Err(error)) => {
                    warn!(node = %node.name, error = %api_error("listing the pods on", &node.name, error), "skipping the node this round");
                    unknown.insert(node.name.clone());
                }
                Err(_) => {
                    warn!(node = %node.name, "listing its pods took too long; skipping the node this round");
                    unknown.insert(node.name.clone());
                }
            }
        }
        let mut actions = plan::plan(&views, &pods, &self.config.policy, SystemTime::now());
        actions.retain(|action| !unknown.contains(action.node()));
        // A node's writes follow one another (cordon, then `cordoned`; `failed`, then its Event):
        // after one of them fails, the rest of that node's steps wait for the next round. A failed
        // eviction or pod deletion holds up nothing else.
        let mut failed = HashSet::new();
        let mut node = None;
        for action in actions {
            // Before each node's steps (a node's steps go together: cordon, `cordoned`, its Event):
            // renewed when due; a lease lost (or not renewed in time) ends the round, as another
            // controller may be acting on what is left.
            if node.as_deref() != Some(action.node()) {
                if !self.elector.lead().await? {
                    warn!("no longer holding the upgrade controller's lease; the rest of this round is left");
                    self.record(|s| s.leader = false);
                    return Ok(());
                }
                node = Some(action.node().to_owned());
            }
            if failed.contains(action.node()) {
                continue;
            }
            // No step outlives the lease it was started under.
            let limit = STEP_TIMEOUT.min(self.elector.remaining());
            let done = tokio::time::timeout(limit, self.perform(&action, &mut versions)).await;
            self.record(|s| s.step(&action, matches!(done, Ok(Ok(())))));
            match done {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => warn!(%error, ?action, "upgrade step failed; retried next round"),
                Err(_) => warn!(?action, "upgrade step took too long; retried next round"),
            }
            if matches!(action, Action::Cordon { .. } | Action::Uncordon { .. } | Action::SetState { .. }) {
                failed.insert(action.node().to_owned());
            }
        }
        Ok(())
    }

    /// A merge patch on `node`, conditional on the version in `versions` (updated on success).
    async fn patch_node(
        &self,
        versions: &mut HashMap<String, String>,
        node: &str,
        mut patch: serde_json::Value,
    ) -> Result<()> {
        if let Some(version) = versions.get(node) {
            patch["metadata"]["resourceVersion"] = json!(version);
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        match nodes.patch(node, &PatchParams::default(), &Patch::Merge(patch)).await {
            Ok(patched) => {
                match patched.metadata.resource_version {
                    Some(version) => versions.insert(node.to_owned(), version),
                    None => versions.remove(node),
                };
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Err(Error::Node {
                node: node.to_owned(),
                reason: "the Node changed since this round read it; planned again next round".to_owned(),
            }),
            Err(e) => Err(api_error("patching", node, e)),
        }
    }

    async fn perform(&mut self, action: &Action, versions: &mut HashMap<String, String>) -> Result<()> {
        match action {
            Action::Cordon { node } => {
                info!(node, "cordoning for the driver upgrade");
                let patch = json!({"spec": {"unschedulable": true}, "metadata": {"annotations": {UPGRADE_CORDONED_ANNOTATION: "true"}}});
                self.patch_node(versions, node, patch).await
            }
            Action::Uncordon { node } => {
                info!(node, "uncordoning after the driver upgrade");
                let patch = json!({"spec": {"unschedulable": false}, "metadata": {"annotations": {UPGRADE_CORDONED_ANNOTATION: null}}});
                self.patch_node(versions, node, patch).await
            }
            Action::SetState { node, state, reason } => {
                info!(node, %state, reason = reason.as_deref().unwrap_or(""), "upgrade state");
                self.patch_node(versions, node, state_patch(*state, reason.as_deref())).await
            }
            Action::Evict { namespace, pod, node } => {
                let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
                match pods.evict(pod, &EvictParams::default()).await {
                    Ok(_) => {
                        info!(node, pod = %format!("{namespace}/{pod}"), "evicted");
                        Ok(())
                    }
                    Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                    Err(kube::Error::Api(status)) if status.code == 429 => {
                        let message = format!(
                            "cannot evict pod {namespace}/{pod} yet (a PodDisruptionBudget allows no disruption now): {}",
                            status.message
                        );
                        self.warn_once(node, &format!("{namespace}/{pod}"), "EvictionBlocked", &message).await;
                        Ok(())
                    }
                    Err(e) => Err(api_error("evicting a pod on", node, e)),
                }
            }
            Action::Delete { namespace, pod, node } | Action::RestartInstaller { namespace, pod, node } => {
                let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
                let forced = matches!(action, Action::Delete { .. });
                info!(node, pod = %format!("{namespace}/{pod}"), forced, "deleting");
                // force-after: no grace period, so a pod stuck terminating goes too.
                let params = if forced {
                    DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() }
                } else {
                    DeleteParams::default()
                };
                match pods.delete(pod, &params).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                    Err(e) => Err(api_error("deleting a pod on", node, e)),
                }
            }
            Action::Event { node, reason, message, warning } => {
                if *warning {
                    self.warn_once(node, node, reason, message).await;
                } else {
                    self.event(node, reason, message, false).await;
                }
                Ok(())
            }
        }
    }

    async fn warn_once(&mut self, node: &str, subject: &str, reason: &str, message: &str) {
        let key = format!("{reason}/{subject}");
        if self.warned.get(&key).is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        self.warned.insert(key, Instant::now());
        warn!(node, %message, reason, "upgrade blocked");
        self.event(node, reason, message, true).await;
    }

    async fn event(&self, node: &str, reason: &str, message: &str, warning: bool) {
        let events: Api<Event> = Api::namespaced(self.client.clone(), "default");
        let event = node_event(node, reason, message, warning, "Upgrade", "nvidia-installer-upgrade-controller");
        if let Err(error) = events.create(&PostParams::default(), &event).await {
            warn!(%error, node, reason, "could not record the event");
        }
    }
}

fn api_error(what: &str, node: &str, error: kube::Error) -> Error {
    Error::Node { node: node.to_owned(), reason: format!("{what}: {error}") }
}
