//! The host cache: which bundles are staged under `cache/<kernel>/<driver>/`, and whether one is
//! complete.

use std::path::{Path, PathBuf};

use nvidia_contract::layout::Layout;
use serde::Serialize;

use crate::bundle::manifest::{self, Manifest};

/// A staged bundle is complete when its manifest reads and every file has its recorded size.
/// (Contents were verified before the bundle was published by rename.)
pub fn cached(bundle: &Path) -> Option<Manifest> {
    let manifest = Manifest::read(&bundle.join(manifest::FILE_NAME)).ok()?;
    for (path, entry) in &manifest.files {
        let meta = std::fs::symlink_metadata(bundle.join(path)).ok()?;
        if !meta.is_file() || meta.len() != entry.size {
            return None;
        }
    }
    Some(manifest)
}

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
