//! The node's driver state in Kubernetes: labels and Events on the Node object.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use tracing::{info, warn};

use crate::{Error, Result};

use nvidia_contract::UPGRADE_TARGET_ANNOTATION;
pub use nvidia_contract::{DRIVER_READY_LABEL, DRIVER_VERSION_LABEL};

use crate::upgrade::State;

/// One state change to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub ready: bool,
    pub driver_version: String,
    /// Event reason: `DriverReady`, `DriverInstallFailed`.
    pub reason: String,
    pub message: String,
}

impl Report {
    /// The label patch this report makes (a JSON merge patch on the Node).
    pub fn label_patch(&self) -> serde_json::Value {
        json!({"metadata": {"labels": {
            DRIVER_VERSION_LABEL: self.driver_version,
            DRIVER_READY_LABEL: if self.ready { "true" } else { "false" },
        }}})
    }
}

/// The node's upgrade order as read from its Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub state: State,
    pub target: Option<String>,
    /// The Node's resourceVersion when it was read.
    pub version: Option<String>,
}

/// Where reports go.
#[derive(Clone)]
pub enum Reporter {
    /// No node name given: log only.
    Log,
    /// The Node through the API server (in-cluster config): patch-node and create-event rights.
    Kube { client: kube::Client, node: String },
    /// Kept in memory (tests, local runs).
    Record(Arc<Mutex<Vec<Report>>>),
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Log => f.write_str("Reporter::Log"),
            Self::Kube { node, .. } => write!(f, "Reporter::Kube({node})"),
            Self::Record(_) => f.write_str("Reporter::Record"),
        }
    }
}

impl Reporter {
    /// A reporter for `node`, or [`Reporter::Log`] without one.
    pub async fn for_node(node: Option<&str>) -> Result<Self> {
        let Some(node) = node.filter(|n| !n.is_empty()) else { return Ok(Self::Log) };
        let client = kube::Client::try_default()
            .await
            .map_err(|e| Error::Node { node: node.to_owned(), reason: format!("no Kubernetes client: {e}") })?;
        Ok(Self::Kube { client, node: node.to_owned() })
    }

    /// Report; failures to reach the API server are logged, not fatal: the host state is what
    /// pods wait on.
    pub async fn report(&self, report: Report) {
        match self {
            Self::Log => {
                info!(ready = report.ready, driver = %report.driver_version, reason = %report.reason, message = %report.message, "driver state (no --node-name: node not labelled)")
            }
            Self::Record(reports) => {
                if let Ok(mut reports) = reports.lock() {
                    reports.push(report);
                }
            }
            Self::Kube { client, node } => {
                if let Err(error) = publish(client, node, &report).await {
                    warn!(%error, "could not update the node");
                }
            }
        }
    }
}

impl Reporter {
    /// The node's upgrade state and target, as its Node says (`None`: no order, or no API to ask).
    /// An API that cannot be asked fails: acting without the order could undo the controller's.
    pub async fn upgrade_order(&self) -> Result<Option<(State, Option<String>)>> {
        Ok(self.upgrade_order_at().await?.map(|order| (order.state, order.target)))
    }

    /// Whether orders are read from the Node (through the API server).
    pub fn reads_orders(&self) -> bool {
        matches!(self, Self::Kube { .. })
    }

    /// [`Reporter::upgrade_order`], with the Node's `resourceVersion` it was read at.
    pub async fn upgrade_order_at(&self) -> Result<Option<Order>> {
        let Self::Kube { client, node } = self else { return Ok(None) };
        let nodes: Api<Node> = Api::all(client.clone());
        let found = with_retries("reading the node's upgrade state", node, || nodes.get(node)).await?;
        let view = crate::upgrade::node_view(&found);
        let version = found.metadata.resource_version.clone();
        Ok(view.state.map(|state| Order { state, target: view.target, version }))
    }

    /// Move the node's upgrade to `state` (towards `target`), with an Event. Fails when the Node
    /// could not be updated (the Event is best effort).
    pub async fn upgrade_state(&self, state: State, target: &str, reason: Option<&str>) -> Result<()> {
        self.upgrade_state_at(state, target, reason, None).await.map(drop)
    }

    /// [`Reporter::upgrade_state`], only while the Node is still at `version` (the resourceVersion
    /// an [`Order`] was read at; `None`: whatever it is at). `Ok(false)`: the Node changed
    /// meanwhile (409 Conflict) and nothing was written.
    pub async fn upgrade_state_at(
        &self,
        state: State,
        target: &str,
        reason: Option<&str>,
        version: Option<&str>,
    ) -> Result<bool> {
        match self {
            Self::Log => {
                info!(%state, target, reason = reason.unwrap_or(""), "upgrade state (no --node-name: node not labelled)")
            }
            Self::Record(reports) => {
                if let Ok(mut reports) = reports.lock() {
                    reports.push(Report {
                        ready: state != State::Failed,
                        driver_version: target.to_owned(),
                        reason: format!("upgrade:{state}"),
                        message: reason.unwrap_or_default().to_owned(),
                    });
                }
            }
            Self::Kube { client, node } => {
                let mut patch = crate::upgrade::controller::state_patch(state, reason);
                patch["metadata"]["annotations"][UPGRADE_TARGET_ANNOTATION] = json!(target);
                if let Some(version) = version {
                    // A precondition: the API server refuses the patch if the Node moved on.
                    patch["metadata"]["resourceVersion"] = json!(version);
                }
                let nodes: Api<Node> = Api::all(client.clone());
                let (patch, params) = (Patch::Merge(patch), PatchParams::default());
                let written = with_retries("patching the upgrade state", node, || async {
                    match nodes.patch(node, &params, &patch).await {
                        Ok(_) => Ok(true),
                        Err(kube::Error::Api(status)) if status.code == 409 && version.is_some() => Ok(false),
                        Err(error) => Err(error),
                    }
                })
                .await?;
                if !written {
                    info!(%state, target, "the node changed since its upgrade state was read; not written");
                    return Ok(false);
                }
                let message = match reason {
                    Some(reason) => format!("driver upgrade to {target}: {state}: {reason}"),
                    None => format!("driver upgrade to {target}: {state}"),
                };
                let reason_word =
                    format!("DriverUpgrade{}", state.as_str().split('-').map(capitalize).collect::<String>());
                let event = node_event(
                    node,
                    &reason_word,
                    &message,
                    state == State::Failed,
                    "Upgrade",
                    &format!("nvidia-installer-{node}"),
                );
                let events: Api<Event> = Api::namespaced(client.clone(), "default");
                let params = PostParams::default();
                if let Err(error) = with_retries("creating the event", node, || events.create(&params, &event)).await {
                    warn!(%error, "could not record the upgrade event");
                }
            }
        }
        Ok(true)
    }
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

async fn publish(client: &kube::Client, node: &str, report: &Report) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let (patch, params) = (Patch::Merge(report.label_patch()), PatchParams::default());
    with_retries("patching labels", node, || nodes.patch(node, &params, &patch)).await?;
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let (event, params) = (event(node, report), PostParams::default());
    with_retries("creating the event", node, || events.create(&params, &event)).await?;
    info!(node, ready = report.ready, driver = %report.driver_version, "node labelled");
    Ok(())
}

/// Attempts for one API write, and the wait before the first retry (doubling: at most 3 s in all).
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Whether an API error may pass: server errors and failed connections. (kube's client already
/// retries 429, 503 and 504 itself, honouring `Retry-After`.) Refusals (403, 404, 422) fail at once.
/// A connection lost after the API server created an Event can make a retry record it twice; the
/// label patch is idempotent.
fn transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => matches!(status.code, 500 | 502),
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

async fn with_retries<T, F, Fut>(what: &'static str, node: &str, mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, kube::Error>>,
{
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(error) if attempt < ATTEMPTS && transient(&error) => {
                warn!(node, what, %error, attempt, "transient API error; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            Err(error) => {
                return Err(Error::Node { node: node.to_owned(), reason: format!("{what}: {error}") });
            }
        }
    }
}

/// The API server refuses an Event whose note is longer (in bytes).
const MAX_NOTE_BYTES: usize = 1024;

/// At most `max` bytes of `text`, cut at a character boundary.
pub fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The Event recorded on the Node.
pub fn event(node: &str, report: &Report) -> Event {
    let instance = format!("nvidia-installer-{node}");
    node_event(node, &report.reason, &report.message, !report.ready, "Install", &instance)
}

/// An Event about `node` (events.k8s.io/v1, in `default`, where node Events live).
pub fn node_event(node: &str, reason: &str, message: &str, warning: bool, action: &str, instance: &str) -> Event {
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now());
    Event {
        metadata: ObjectMeta { generate_name: Some(format!("{node}.nvidia-installer.")), ..ObjectMeta::default() },
        regarding: Some(ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Node".to_owned()),
            name: Some(node.to_owned()),
            ..ObjectReference::default()
        }),
        reason: Some(reason.to_owned()),
        note: Some(truncated(message, MAX_NOTE_BYTES).to_owned()),
        type_: Some(if warning { "Warning" } else { "Normal" }.to_owned()),
        action: Some(action.to_owned()),
        event_time: Some(now),
        reporting_controller: Some("gardenlinux.io/nvidia-installer".to_owned()),
        reporting_instance: Some(instance.chars().take(128).collect()),
        ..Event::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_cut_to_the_api_servers_byte_limit_at_a_character_boundary() {
        let long = "é".repeat(600);
        let note = truncated(&long, MAX_NOTE_BYTES);
        assert_eq!(note.len(), 1024);
        assert!(truncated(&format!("x{long}"), MAX_NOTE_BYTES).len() == 1023, "no half character");
        assert_eq!(truncated("short", MAX_NOTE_BYTES), "short");
        let event = node_event("n", "R", &long, true, "Upgrade", "i");
        assert!(event.note.is_some_and(|n| n.len() <= MAX_NOTE_BYTES));
    }
}
