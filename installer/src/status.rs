//! `status`: the node's driver state as JSON.

use std::path::PathBuf;

use serde::Serialize;

use crate::layout::Layout;
use crate::manifest::{self, Manifest};
use crate::ready::{self, LastError, Readiness, ReadyMarker};

/// A bundle in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StagedBundle {
    pub kernel_release: String,
    pub driver_version: String,
    pub flavor: String,
    pub path: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Bundles under `cache/<kernel>/<driver>/` with a readable manifest.
pub fn staged(layout: &Layout) -> Vec<StagedBundle> {
    let mut found = Vec::new();
    let Ok(kernels) = std::fs::read_dir(layout.cache()) else { return found };
    for kernel in kernels.flatten() {
        let Ok(drivers) = std::fs::read_dir(kernel.path()) else { continue };
        for driver in drivers.flatten() {
            if let Ok(manifest) = Manifest::read(&driver.path().join(manifest::FILE_NAME)) {
                found.push(StagedBundle {
                    kernel_release: manifest.kernel_release,
                    driver_version: manifest.driver_version,
                    flavor: manifest.flavor,
                    path: driver.path(),
                    sha256: manifest.archive.map(|a| a.sha256),
                });
            }
        }
    }
    found.sort_by(|a, b| (&a.kernel_release, &a.driver_version).cmp(&(&b.kernel_release, &b.driver_version)));
    found
}

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
        staged: staged(layout),
        loaded_module_version: loaded_version(layout),
        last_error: ready::read_last_error(layout),
    }
}
