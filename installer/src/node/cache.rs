//! The host cache: which bundles are staged under `cache/<kernel>/<driver>/`, and whether one is
//! complete.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use nvidia_contract::layout::Layout;
use serde::Serialize;

use crate::bundle::manifest::{self, FileEntry, Manifest};

/// Whether a bundle file is run or loaded with host privileges: the kernel modules, the programs
/// (`install` runs `nvidia-smi` as root), NVML (which `nvidia-smi` and the device plugin load),
/// and the firmware the kernel loads. These are hashed again on every cache hit.
pub fn runs_privileged(path: &str) -> bool {
    ["modules/", "bin/", "firmware/", "lib/libnvidia-ml.so"].iter().any(|prefix| path.starts_with(prefix))
}

/// Check a staged bundle before it is used again: its manifest reads, it holds exactly the files
/// and links the manifest lists (nothing added, which `LD_LIBRARY_PATH` or the module search
/// could pick up), every file has its recorded size, every link its recorded target, and every
/// file that runs with host privileges ([`runs_privileged`]) its recorded sha256. The rest was
/// verified before the bundle was published by rename. `Err` says what differs.
pub fn cached(bundle: &Path) -> Result<Manifest, String> {
    let manifest = Manifest::read(&bundle.join(manifest::FILE_NAME)).map_err(|e| e.to_string())?;
    let mut listed: BTreeSet<PathBuf> = manifest.files.keys().chain(manifest.links.keys()).map(PathBuf::from).collect();
    listed.insert(PathBuf::from(manifest::FILE_NAME));
    // Every entry is what the manifest says it is: a listed file, a listed link with its target,
    // or a real directory on the way to them (a directory replaced by a link would lead the
    // checks below, which go by path, somewhere else).
    for entry in walk(bundle)? {
        let relative = entry.strip_prefix(bundle).map_err(|e| e.to_string())?;
        let name = relative.to_string_lossy();
        let kind = std::fs::symlink_metadata(&entry).map_err(|e| format!("{name}: {e}"))?.file_type();
        let fits = if kind.is_symlink() {
            let target = std::fs::read_link(&entry).map_err(|e| format!("{name}: {e}"))?;
            let wanted = manifest.links.get(name.as_ref()).map(PathBuf::from);
            // Staging adds `lib64 -> lib` where the bundle has none (CUDA images look in lib64).
            let staged_lib64 = name == "lib64" && wanted.is_none() && target == Path::new("lib");
            wanted.is_some_and(|w| w == target) || staged_lib64
        } else if kind.is_dir() {
            listed.iter().any(|l| l.starts_with(relative) && l != relative)
        } else {
            kind.is_file()
                && (manifest.files.contains_key(name.as_ref())
                    || name == manifest::FILE_NAME
                    || name == crate::node::stage::SIGNATURE_FILE)
        };
        if !fits {
            return Err(format!("{name} is not what the manifest lists there"));
        }
    }
    for (path, entry) in &manifest.files {
        let meta = std::fs::symlink_metadata(bundle.join(path)).map_err(|e| format!("{path}: {e}"))?;
        if !meta.is_file() || meta.len() != entry.size {
            return Err(format!("{path}: not a regular file of {} bytes", entry.size));
        }
    }
    let privileged: Vec<(&String, &FileEntry)> = manifest.files.iter().filter(|(p, _)| runs_privileged(p)).collect();
    verify_digests(bundle, &privileged)?;
    for (path, target) in &manifest.links {
        match std::fs::read_link(bundle.join(path)) {
            Ok(actual) if actual == Path::new(target) => {}
            _ => return Err(format!("{path}: not a link to {target}")),
        }
    }
    Ok(manifest)
}

/// Hash `files` on a few threads (a driver's modules, firmware and tools are 50–150 MB); the
/// first mismatch is the error.
fn verify_digests(bundle: &Path, files: &[(&String, &FileEntry)]) -> Result<(), String> {
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4).min(files.len().max(1));
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<(), String> {
                    while let Some((path, entry)) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let actual = crate::bundle::sha256_file(&bundle.join(path)).map_err(|e| e.to_string())?;
                        if actual != entry.sha256 {
                            next.store(files.len(), Ordering::Relaxed);
                            return Err(format!("{path}: sha256 {actual}, the manifest says {}", entry.sha256));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| h.join().unwrap_or_else(|_| Err("hashing failed".to_owned())))
    })
}

/// Every entry under `dir` (not following links: a link is listed, never entered).
fn walk(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
            found.push(entry.path());
        }
    }
    Ok(found)
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
    /// The key number of the signature kept beside the manifest (as staged; checked then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
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
                    sha256: manifest.archive.map(|a| a.sha256),
                    signed_by: std::fs::read_to_string(driver.path().join(crate::node::stage::SIGNATURE_FILE))
                        .ok()
                        .and_then(|text| crate::bundle::signature::signer(&text))
                        .map(|k| k.to_string()),
                    path: driver.path(),
                });
            }
        }
    }
    found.sort_by(|a, b| (&a.kernel_release, &a.driver_version).cmp(&(&b.kernel_release, &b.driver_version)));
    found
}
