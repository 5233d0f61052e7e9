//! `manifest.json`: what a bundle holds. Written by `compile`, checked by `stage`.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The bundle's description. Inside the archive it lists every file; the copy in S3 (key
/// `….manifest.json`) adds the archive's own digest and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    pub driver_version: String,
    pub kernel_release: String,
    /// `open` or `proprietary`; `legacy` for bundles mapped from the original system's layout.
    pub flavor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gardenlinux_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<Module>,
    /// Regular files by bundle-relative path.
    pub files: BTreeMap<String, FileEntry>,
    /// Symbolic links by bundle-relative path, with their (relative) targets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub links: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Module {
    pub name: String,
    pub path: String,
    pub vermagic: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub size: u64,
    #[serde(default = "default_mode")]
    pub mode: u32,
}

fn default_mode() -> u32 {
    0o644
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveEntry {
    pub sha256: String,
    pub size: u64,
}

pub const SCHEMA_VERSION: u32 = 1;
pub const FILE_NAME: &str = "manifest.json";
/// The largest manifest read (a bundle lists a few hundred files).
pub const MAX_BYTES: u64 = 16 << 20;

impl Manifest {
    pub fn parse(bytes: &[u8], source: &str) -> Result<Self> {
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| Error::Manifest { source_name: source.to_owned(), reason: e.to_string() })?;
        if manifest.schema_version != SCHEMA_VERSION {
            return Err(Error::Manifest {
                source_name: source.to_owned(),
                reason: format!("schema version {} is not {SCHEMA_VERSION}", manifest.schema_version),
            });
        }
        let refuse = |reason: String| Error::Manifest { source_name: source.to_owned(), reason };
        for path in manifest.files.keys().chain(manifest.links.keys()) {
            check_relative(Path::new(path)).map_err(|reason| refuse(format!("{path}: {reason}")))?;
        }
        for module in &manifest.modules {
            let what = format!("module {:?} at {:?}", module.name, module.path);
            if module.name.is_empty()
                || !module.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(refuse(format!("{what}: the name is not a module name")));
            }
            check_relative(Path::new(&module.path)).map_err(|reason| refuse(format!("{what}: {reason}")))?;
            if !module.path.starts_with("modules/") {
                return Err(refuse(format!("{what}: modules live under modules/")));
            }
            if !manifest.files.contains_key(&module.path) {
                return Err(refuse(format!("{what}: not among the bundle's verified files")));
            }
        }
        Ok(manifest)
    }

    /// Read a manifest on disk (a regular file of at most [`MAX_BYTES`], not through a link).
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = crate::durable::read_regular(path, MAX_BYTES)
            .and_then(|b| b.ok_or_else(|| std::io::ErrorKind::NotFound.into()))
            .map_err(|e| Error::io("reading", path, e))?;
        Self::parse(&bytes, &path.display().to_string())
    }

    /// The manifest as stored inside the bundle: without the archive entry.
    pub fn without_archive(&self) -> Self {
        Self { archive: None, ..self.clone() }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }
}

/// A path inside the bundle must be relative, normal, and not empty.
pub fn check_relative(path: &Path) -> std::result::Result<(), String> {
    if path.as_os_str().is_empty() {
        return Err("empty path".to_owned());
    }
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err("path contains '..'".to_owned()),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path".to_owned()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_only() {
        assert!(check_relative(Path::new("bin/nvidia-smi")).is_ok());
        assert!(check_relative(Path::new("/etc/passwd")).is_err());
        assert!(check_relative(Path::new("bin/../../x")).is_err());
        assert!(check_relative(Path::new("")).is_err());
    }
}
