//! The node's driver state in Kubernetes: labels and Events on the Node object.

use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use tracing::{info, warn};

use crate::{Error, Result};

pub const DRIVER_VERSION_LABEL: &str = "nvidia-installer.gardenlinux.io/driver-version";
pub const DRIVER_READY_LABEL: &str = "nvidia-installer.gardenlinux.io/driver-ready";

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

async fn publish(client: &kube::Client, node: &str, report: &Report) -> Result<()> {
    let fail = |what: &str, e: kube::Error| Error::Node { node: node.to_owned(), reason: format!("{what}: {e}") };
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(report.label_patch()))
        .await
        .map_err(|e| fail("patching labels", e))?;
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    events.create(&PostParams::default(), &event(node, report)).await.map_err(|e| fail("creating the event", e))?;
    info!(node, ready = report.ready, driver = %report.driver_version, "node labelled");
    Ok(())
}

/// The Event recorded on the Node.
pub fn event(node: &str, report: &Report) -> Event {
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now());
    Event {
        metadata: ObjectMeta { generate_name: Some(format!("{node}.nvidia-installer.")), ..ObjectMeta::default() },
        regarding: Some(ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Node".to_owned()),
            name: Some(node.to_owned()),
            ..ObjectReference::default()
        }),
        reason: Some(report.reason.clone()),
        note: Some(report.message.chars().take(1000).collect()),
        type_: Some(if report.ready { "Normal" } else { "Warning" }.to_owned()),
        action: Some("Install".to_owned()),
        event_time: Some(now),
        reporting_controller: Some("gardenlinux.io/nvidia-installer".to_owned()),
        reporting_instance: Some(format!("nvidia-installer-{node}").chars().take(128).collect()),
        ..Event::default()
    }
}
