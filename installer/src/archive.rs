//! Safe extraction of bundle archives into a staging directory.
//!
//! Everything that could write outside the staging directory or plant something dangerous on the
//! host is refused: absolute paths, `..`, links leaving the bundle, hard links, device and FIFO
//! entries, setuid/setgid/sticky bits, and entries or totals beyond the limits. Each regular file
//! is hashed as it is written and synced before the caller publishes the directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::manifest::FileEntry;
use crate::{Error, Result};

/// Caps on what one archive may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_entries: usize,
    pub max_file_bytes: u64,
    pub max_total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_entries: 20_000, max_file_bytes: 4 << 30, max_total_bytes: 16 << 30 }
    }
}

/// How archive paths map to bundle paths.
#[derive(Debug, Clone)]
pub enum PathMap {
    /// The bundle layout: `bin/`, `lib/`, `lib64`, `modules/`, `manifest.json`.
    Bundle,
    /// The original system's layout: `bin/`, `lib/`, `lib/modules/<kernel>/…/*.ko`; modules move
    /// to `modules/`, other kernels' modules are skipped.
    Legacy { kernel: String },
}

/// What was extracted.
#[derive(Debug, Default)]
pub struct Extracted {
    pub files: BTreeMap<String, FileEntry>,
    pub links: BTreeMap<String, String>,
    /// Kernel releases seen under `lib/modules/` (legacy archives).
    pub module_kernels: BTreeSet<String>,
    pub total_bytes: u64,
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

/// Normalize `a/./b/` to `a/b`.
fn normal(path: &Path) -> PathBuf {
    path.components().filter(|c| matches!(c, Component::Normal(_))).collect()
}

/// Whether a link at `link` (bundle-relative) pointing at `target` stays inside the bundle.
fn link_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: Vec<&std::ffi::OsStr> = link
        .parent()
        .into_iter()
        .flat_map(Path::components)
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    for component in target.components() {
        match component {
            Component::Normal(n) => depth.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

impl PathMap {
    /// Map an archive path; `Ok(None)` skips the entry.
    fn map(&self, path: &Path, extracted: &mut Extracted) -> std::result::Result<Option<PathBuf>, String> {
        let first = path.components().next().and_then(|c| c.as_os_str().to_str()).unwrap_or_default().to_owned();
        match self {
            Self::Bundle => match first.as_str() {
                "bin" | "lib" | "lib64" | "modules" | "manifest.json" => Ok(Some(path.to_owned())),
                _ => Err(format!(
                    "unexpected top-level entry {first:?} (a bundle holds bin/, lib/, modules/, manifest.json)"
                )),
            },
            Self::Legacy { kernel } => {
                if first == "bin" {
                    return Ok(Some(path.to_owned()));
                }
                if first != "lib" {
                    return Ok(None);
                }
                let rest: Vec<&str> = path.iter().filter_map(|c| c.to_str()).collect();
                if rest.get(1) == Some(&"modules") {
                    let Some(release) = rest.get(2) else { return Ok(None) };
                    extracted.module_kernels.insert((*release).to_owned());
                    if release != kernel || path.extension().is_none_or(|e| e != "ko") {
                        return Ok(None);
                    }
                    let name = path.file_name().map(PathBuf::from).unwrap_or_default();
                    return Ok(Some(Path::new("modules").join(name)));
                }
                Ok(Some(path.to_owned()))
            }
        }
    }
}

/// Extract the tar stream `reader` into `dest` (an empty directory).
pub fn extract(reader: impl Read, dest: &Path, map: &PathMap, limits: Limits, source: &str) -> Result<Extracted> {
    let mut archive = tar::Archive::new(reader);
    let mut extracted = Extracted::default();
    let mut count = 0usize;
    let broken = |reason: String| Error::Archive { source_name: source.to_owned(), reason };
    let entries = archive.entries().map_err(|e| broken(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| broken(format!("reading entry {}: {e}", count + 1)))?;
        count += 1;
        let raw = entry.path().map_err(|e| broken(format!("entry {count}: unreadable path: {e}")))?.into_owned();
        let hostile = |reason: String| Error::Hostile {
            source_name: source.to_owned(),
            entry: raw.display().to_string(),
            reason,
        };
        if count > limits.max_entries {
            return Err(hostile(format!("more than {} entries", limits.max_entries)));
        }
        check_relative(&raw).map_err(&hostile)?;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            continue;
        }
        let mode = entry.header().mode().map_err(|e| hostile(format!("unreadable mode: {e}")))?;
        if mode & 0o7000 != 0 {
            return Err(hostile(format!("mode {mode:o} sets setuid, setgid or sticky bits")));
        }
        let rel = normal(&raw);
        if rel.as_os_str().is_empty() {
            continue;
        }
        // A path under a link would write wherever the link points.
        for ancestor in rel.ancestors().skip(1) {
            if extracted.links.contains_key(&ancestor.display().to_string()) {
                return Err(hostile(format!("path goes through the link {}", ancestor.display())));
            }
        }
        match kind {
            tar::EntryType::Directory => {
                if let Some(target) = map.map(&rel, &mut extracted).map_err(&hostile)? {
                    let path = dest.join(&target);
                    std::fs::create_dir_all(&path).map_err(|e| Error::io("creating", &path, e))?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().map_err(|e| hostile(format!("unreadable size: {e}")))?;
                if size > limits.max_file_bytes {
                    return Err(hostile(format!(
                        "{size} bytes exceeds the per-file limit of {}",
                        limits.max_file_bytes
                    )));
                }
                if extracted.total_bytes + size > limits.max_total_bytes {
                    return Err(hostile(format!(
                        "archive exceeds the total limit of {} bytes",
                        limits.max_total_bytes
                    )));
                }
                let Some(target) = map.map(&rel, &mut extracted).map_err(&hostile)? else {
                    continue;
                };
                let key = target.display().to_string();
                if extracted.files.contains_key(&key) || extracted.links.contains_key(&key) {
                    return Err(hostile("duplicate entry".to_owned()));
                }
                let file_mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                let (sha256, written) =
                    write_file(&mut entry, &dest.join(&target), file_mode, size).map_err(|e| match e {
                        WriteError::Io(path, error) => Error::io("writing", &path, error),
                        WriteError::Read(error) => broken(format!("entry {}: {error}", raw.display())),
                    })?;
                extracted.total_bytes += written;
                extracted.files.insert(key, FileEntry { sha256, size: written, mode: file_mode });
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| hostile(format!("unreadable link target: {e}")))?
                    .ok_or_else(|| hostile("link without target".to_owned()))?
                    .into_owned();
                let Some(at) = map.map(&rel, &mut extracted).map_err(&hostile)? else {
                    continue;
                };
                if !link_stays_inside(&at, &target) {
                    return Err(hostile(format!("link to {} points outside the bundle", target.display())));
                }
                let key = at.display().to_string();
                if extracted.files.contains_key(&key) || extracted.links.contains_key(&key) {
                    return Err(hostile("duplicate entry".to_owned()));
                }
                let path = dest.join(&at);
                create_parent(&path)?;
                std::os::unix::fs::symlink(&target, &path).map_err(|e| Error::io("linking", &path, e))?;
                extracted.links.insert(key, target.display().to_string());
            }
            tar::EntryType::Link => return Err(hostile("hard links are not allowed in a bundle".to_owned())),
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(hostile("device entries are not allowed in a bundle".to_owned()));
            }
            tar::EntryType::Fifo => return Err(hostile("FIFO entries are not allowed in a bundle".to_owned())),
            other => return Err(hostile(format!("unsupported entry type {other:?}"))),
        }
    }
    Ok(extracted)
}

enum WriteError {
    Io(PathBuf, io::Error),
    Read(io::Error),
}

fn create_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
    }
    Ok(())
}

fn write_file(
    entry: &mut impl Read,
    path: &Path,
    mode: u32,
    size: u64,
) -> std::result::Result<(String, u64), WriteError> {
    let io = |e| WriteError::Io(path.to_owned(), e);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| WriteError::Io(parent.to_owned(), e))?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut written = 0u64;
    let mut flushed = 0u64;
    loop {
        let n = entry.read(&mut buffer).map_err(WriteError::Read)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        file.write_all(&buffer[..n]).map_err(io)?;
        written += n as u64;
        if written - flushed >= WRITEBACK_CHUNK {
            start_writeback(&file, flushed, written);
            flushed = written;
        }
    }
    start_writeback(&file, flushed, written);
    if written != size {
        return Err(WriteError::Read(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{written} of {size} bytes"),
        )));
    }
    // Synced with the whole tree before publishing (sync_tree): the kernel writes back meanwhile.
    Ok((hex::encode(hasher.finalize()), written))
}

/// Written bytes are handed to the disk in chunks of this size as the extraction goes on.
const WRITEBACK_CHUNK: u64 = 8 << 20;

/// Start writing `from..to` of `file` back to disk now, without waiting: the extraction goes on
/// while the disk works, and the fsync before publishing finds little left to do. (On Linux,
/// `POSIX_FADV_DONTNEED` starts writeback of dirty pages; the pages stay cached until clean.)
/// Advice only: a filesystem that ignores it loses nothing but the overlap.
fn start_writeback(file: &File, from: u64, to: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else { return };
    if len > 0 {
        let _ = nix::fcntl::posix_fadvise(file, offset, len, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
}

/// fsync every file and directory under `root` (and `root`), so the tree is durable before it is
/// published by a rename.
pub fn sync_tree(root: &Path) -> Result<()> {
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io("reading", &dir, e))? {
            let entry = entry.map_err(|e| Error::io("reading", &dir, e))?;
            let kind = entry.file_type().map_err(|e| Error::io("reading", &entry.path(), e))?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                let path = entry.path();
                File::open(&path).and_then(|f| f.sync_all()).map_err(|e| Error::io("syncing", &path, e))?;
            }
        }
        sync_dir(&dir)?;
    }
    Ok(())
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("syncing", dir, e))
}

/// Hash a file on disk.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io("reading", path, e))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).map_err(|e| Error::io("reading", path, e))?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_must_stay_inside() {
        assert!(link_stays_inside(Path::new("lib/libcuda.so"), Path::new("libcuda.so.1")));
        assert!(link_stays_inside(Path::new("lib64"), Path::new("lib")));
        assert!(link_stays_inside(Path::new("bin/x"), Path::new("../lib/y")));
        assert!(!link_stays_inside(Path::new("bin/x"), Path::new("../../etc/passwd")));
        assert!(!link_stays_inside(Path::new("lib64"), Path::new("/usr/lib")));
    }

    #[test]
    fn relative_paths_only() {
        assert!(check_relative(Path::new("bin/nvidia-smi")).is_ok());
        assert!(check_relative(Path::new("/etc/passwd")).is_err());
        assert!(check_relative(Path::new("bin/../../x")).is_err());
        assert!(check_relative(Path::new("")).is_err());
    }
}
