//! Making a bundle's GPU firmware findable by the kernel before its modules load.
//!
//! `nvidia.ko` asks the kernel's firmware loader for `nvidia/<version>/gsp_*.bin` when it
//! initialises a GPU. The loader looks in the directory named by the `firmware_class.path`
//! parameter first, then in `/lib/firmware`, which on Garden Linux belongs to the read-only OS
//! image. So `install` keeps a stable directory under the driver root,
//! `<driver root>/firmware/nvidia/<version>` → the cached bundle's `firmware/nvidia/<version>`
//! (a relative link, one per installed version, so a later switch of `current` does not take the
//! files from a loaded driver), and points `firmware_class.path` at `<driver root>/firmware` —
//! unless the parameter already names another directory (someone else's), which is never
//! silently replaced.

use std::path::{Path, PathBuf};

use nvidia_contract::layout::Layout;
use tracing::info;

use crate::bundle::manifest::Manifest;
use crate::{Error, Result};

/// The kernel parameter, as a host path.
pub const PARAMETER: &str = "/sys/module/firmware_class/parameters/path";

/// What [`prepare`] would do or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The bundle holds no firmware for its version.
    None,
    /// The files are already where the kernel looks (`/lib/firmware`, or the directory the
    /// parameter names): nothing to change.
    AlreadyFindable { dir: String },
    /// Link `link` (host path) to the bundle's directory and point the parameter at `path`.
    Link { link: String, target: String, path: String, set_parameter: bool },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => write!(f, "no GPU firmware in the bundle: nothing to make findable"),
            Self::AlreadyFindable { dir } => write!(f, "GPU firmware already findable in {dir}: nothing to change"),
            Self::Link { link, target, path, set_parameter } => {
                write!(f, "link {link} -> {target} (the bundle's GPU firmware)")?;
                if *set_parameter {
                    write!(f, ", then write {path} to {PARAMETER}")
                } else {
                    write!(f, "; {PARAMETER} already names {path}")
                }
            }
        }
    }
}

/// The bundle's firmware files for its own version, bundle-relative (`firmware/nvidia/<v>/…`).
fn firmware_files(manifest: &Manifest) -> Vec<&str> {
    let prefix = format!("firmware/nvidia/{}/", manifest.driver_version);
    manifest.files.keys().filter(|p| p.starts_with(&prefix)).map(String::as_str).collect()
}

/// A host path as the host sees it.
fn in_host(layout: &Layout, path: &Path) -> String {
    format!("/{}", path.strip_prefix(layout.host_root()).unwrap_or(path).display())
}

/// Decide what makes the firmware of the staged bundle at `bundle` findable, reading only.
pub fn plan(layout: &Layout, bundle: &Path, manifest: &Manifest) -> Result<Step> {
    let files = firmware_files(manifest);
    if files.is_empty() {
        return Ok(Step::None);
    }
    let version = &manifest.driver_version;
    let names: Vec<&str> = files.iter().filter_map(|f| f.rsplit('/').next()).collect();
    let holds_all = |dir: &Path| names.iter().all(|name| dir.join(name).is_file());
    let os = layout.host(&format!("/lib/firmware/nvidia/{version}"));
    if holds_all(&os) {
        return Ok(Step::AlreadyFindable { dir: in_host(layout, &os) });
    }
    let ours = layout.root().join("firmware");
    let ours_host = in_host(layout, &ours);
    let parameter = layout.host(PARAMETER);
    let current = std::fs::read_to_string(&parameter).map_err(|e| Error::io("reading", &parameter, e))?;
    let current = current.trim_end_matches('\n');
    let set_parameter = match current {
        "" => true,
        path if path.trim_end_matches('/') == ours_host => false,
        other => {
            let theirs = layout.host(other).join("nvidia").join(version);
            if holds_all(&theirs) {
                return Ok(Step::AlreadyFindable { dir: in_host(layout, &theirs) });
            }
            return Err(Error::Firmware {
                reason: format!(
                    "{PARAMETER} is set to {other:?} by someone else, and neither it nor /lib/firmware holds nvidia/{version}/{}; \
                     nvidia.ko could not initialise the GPU. Clear the parameter (echo -n > {PARAMETER}) to let the installer \
                     use {ours_host}, or copy the bundle's firmware/nvidia/{version}/ there",
                    names.join(", ")
                ),
            });
        }
    };
    let link = ours.join("nvidia").join(version);
    let target = relative_target(layout, &link, &bundle.join("firmware/nvidia").join(version));
    Ok(Step::Link {
        link: in_host(layout, &link),
        target: target.display().to_string(),
        path: ours_host,
        set_parameter,
    })
}

/// `to` relative to the directory of `link` (both under the driver root).
fn relative_target(layout: &Layout, link: &Path, to: &Path) -> PathBuf {
    let from = link.parent().and_then(|p| p.strip_prefix(layout.root()).ok()).unwrap_or(Path::new(""));
    let to = to.strip_prefix(layout.root()).unwrap_or(to);
    let mut relative: PathBuf = from.components().map(|_| "..").collect();
    relative.push(to);
    relative
}

/// Carry out [`plan`]: replace the link atomically, then write the parameter.
pub fn prepare(layout: &Layout, bundle: &Path, manifest: &Manifest) -> Result<Step> {
    let step = plan(layout, bundle, manifest)?;
    if let Step::Link { target, path, set_parameter, .. } = &step {
        let link = layout.root().join("firmware/nvidia").join(&manifest.driver_version);
        let dir = link.parent().unwrap_or(layout.root());
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
        let tmp = dir.join(format!(".{}.tmp-{}", manifest.driver_version, std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).map_err(|e| Error::io("linking", &tmp, e))?;
        std::fs::rename(&tmp, &link).map_err(|e| Error::io("linking", &link, e))?;
        crate::durable::sync_dir(dir)?;
        if *set_parameter {
            let parameter = layout.host(PARAMETER);
            std::fs::write(&parameter, path.as_bytes()).map_err(|e| Error::io("writing", &parameter, e))?;
        }
        info!(link = %link.display(), %target, parameter = %path, "GPU firmware findable by the kernel");
    }
    Ok(step)
}
