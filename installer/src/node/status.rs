//! `status`: the node's driver state as JSON.

use std::path::PathBuf;

use serde::Serialize;

use crate::node::cache::{self, StagedBundle};
use crate::node::ready::{self, LastError, Readiness, ReadyMarker};
use nvidia_contract::layout::Layout;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub driver_root: PathBuf,
    pub ready: bool,
    /// Why not ready, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub marker: Option<ReadyMarker>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<PathBuf>,
    pub staged: Vec<StagedBundle>,
    /// The version of the loaded `nvidia` module, when the kernel shows one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded_module_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
}

pub fn loaded_version(layout: &Layout) -> Option<String> {
    let text = std::fs::read_to_string(layout.host("/sys/module/nvidia/version")).ok()?;
    Some(text.trim().to_owned()).filter(|s| !s.is_empty())
}

pub fn status(layout: &Layout, pin: Option<&str>) -> Status {
    let (ready, reason) = match ready::check(layout, pin) {
        Readiness::Ready(_) => (true, None),
        Readiness::NotReady(reason) => (false, Some(reason)),
    };
    Status {
        driver_root: layout.root().to_owned(),
        ready,
        reason,
        marker: ready::read_marker(layout),
        current: std::fs::read_link(layout.current()).ok(),
        staged: cache::staged(layout),
        loaded_module_version: loaded_version(layout),
        last_error: ready::read_last_error(layout),
    }
}
