//! The ready marker, the last error, and `wait`: what GPU pods block on.

use crate::durable::write_atomic;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};
use nvidia_contract::layout::Layout;

/// Written atomically, and only after modules are loaded, device nodes exist and `nvidia-smi`
/// succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadyMarker {
    pub driver_version: String,
    pub kernel_release: String,
    /// Digest of the bundle archive the driver came from.
    pub sha256: String,
    /// RFC 3339.
    pub ready_at: String,
    /// The host boot this marker belongs to; after a reboot the modules are gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The bundle directory, relative to the driver root.
    #[serde(default)]
    pub bundle: String,
    /// The trusted key whose signature the bundle carried (its key number, hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
}

/// Why the last install failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastError {
    pub reason: String,
    pub driver_version: String,
    pub at: String,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The largest ready marker or last error read (they are a few hundred bytes).
pub const MAX_STATE_BYTES: u64 = 64 << 10;

/// The ready marker: `Ok(None)` when there is none, an error saying why when it cannot be
/// trusted (not a regular file, too large, not a marker).
pub fn marker(layout: &Layout) -> std::result::Result<Option<ReadyMarker>, String> {
    let Some(bytes) = crate::durable::read_regular(&layout.ready(), MAX_STATE_BYTES).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| e.to_string())
}

/// The ready marker when there is a sound one.
pub fn read_marker(layout: &Layout) -> Option<ReadyMarker> {
    marker(layout).ok().flatten()
}

pub fn write_marker(layout: &Layout, marker: &ReadyMarker) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(marker)
        .map_err(|e| Error::Encode { what: "the ready marker", reason: e.to_string() })?;
    write_atomic(&layout.ready(), &bytes)
}

pub fn remove_marker(layout: &Layout) -> Result<()> {
    match std::fs::remove_file(layout.ready()) {
        Ok(()) => crate::durable::sync_dir(layout.root()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing", &layout.ready(), e)),
    }
}

pub fn read_last_error(layout: &Layout) -> Option<LastError> {
    let bytes = crate::durable::read_regular(&layout.last_error(), MAX_STATE_BYTES).ok()??;
    serde_json::from_slice(&bytes).ok()
}

pub fn write_last_error(layout: &Layout, error: &LastError) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(error)
        .map_err(|e| Error::Encode { what: "the last error", reason: e.to_string() })?;
    write_atomic(&layout.last_error(), &bytes)
}

pub fn clear_last_error(layout: &Layout) {
    let _ = std::fs::remove_file(layout.last_error());
}

/// The node's driver state as a pod sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready(ReadyMarker),
    NotReady(String),
}

/// Is the driver (or the pinned version) ready? If not, say why, in words for `kubectl describe`.
pub fn check(layout: &Layout, pin: Option<&str>) -> Readiness {
    let marker = match marker(layout) {
        Ok(marker) => marker,
        Err(reason) => {
            return Readiness::NotReady(format!(
                "corrupt ready marker at {}: {reason}; the installer replaces it on its next run",
                layout.ready().display()
            ));
        }
    };
    if let Some(marker) = marker {
        let boot = layout.boot_id();
        if let (Some(marked), Some(now)) = (&marker.boot_id, &boot)
            && marked != now
        {
            return Readiness::NotReady(format!(
                "the ready marker for driver {} is from before the node restarted; the installer has not finished since",
                marker.driver_version
            ));
        }
        return match pin {
            Some(pin) if pin != marker.driver_version => Readiness::NotReady(format!(
                "driver {} is ready on this node, but this pod pins driver {pin} (annotation nvidia-installer.gardenlinux.io/driver-version): run it on a node pool with {pin}, or change the annotation",
                marker.driver_version
            )),
            _ => Readiness::Ready(marker),
        };
    }
    if let Some(failed) = read_last_error(layout) {
        return Readiness::NotReady(format!(
            "the installer failed to install driver {} at {}: {}",
            failed.driver_version, failed.at, failed.reason
        ));
    }
    let staged = crate::node::cache::staged(layout);
    if let Some(first) = staged.first() {
        return Readiness::NotReady(format!(
            "driver {} is staged for kernel {} but not loaded yet: the installer is still working (see its logs and the node's Events)",
            first.driver_version, first.kernel_release
        ));
    }
    if layout.root().is_dir() {
        return Readiness::NotReady(
            "no driver is staged on this node yet: the installer is downloading it, or cannot (see the nvidia-installer pod's logs on this node)".to_owned(),
        );
    }
    Readiness::NotReady(format!(
        "no nvidia-installer has run on this node ({} does not exist): is the installer DaemonSet scheduled on this node pool?",
        layout.root().display()
    ))
}

/// Block until [`check`] says ready, polling with backoff; give up after `timeout`.
pub async fn wait(layout: &Layout, pin: Option<&str>, timeout: Duration) -> Result<ReadyMarker> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(50);
    let mut last_reason = String::new();
    let mut last_log = Instant::now();
    loop {
        match check(layout, pin) {
            Readiness::Ready(marker) => return Ok(marker),
            Readiness::NotReady(reason) => {
                if reason != last_reason || last_log.elapsed() >= Duration::from_secs(30) {
                    tracing::info!(%reason, waited_s = started.elapsed().as_secs(), "waiting for the NVIDIA driver");
                    last_log = Instant::now();
                    last_reason = reason;
                }
            }
        }
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(Error::WaitTimeout(format!(
                "gave up after {} waiting for the NVIDIA driver on this node: {last_reason}",
                humantime::format_duration(Duration::from_secs(timeout.as_secs()))
            )));
        }
        tokio::time::sleep(delay.min(left)).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}
