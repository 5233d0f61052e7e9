//! Durable file operations: what must survive a crash or a power cut once it returns.
//!
//! Everything that publishes state on the host (a staged bundle, `current`, the ready marker)
//! goes through these: write beside, fsync, rename, fsync the directory.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Write `bytes` to `path` atomically: a temp file beside it, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::io("writing", path, std::io::Error::other("the path has no parent directory")))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut file = File::create(&tmp).map_err(|e| Error::io("writing", &tmp, e))?;
        file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| Error::io("writing", &tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io("renaming into", path, e))?;
    sync_dir(dir)
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

/// fsync a directory: the entries created, renamed or removed in it are then durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("syncing", dir, e))
}
