//! Durable file operations: what must survive a crash or a power cut once it returns.
//!
//! Everything that publishes state on the host (a staged bundle, `current`, the ready marker)
//! goes through these: write beside, fsync, rename, fsync the directory. State written this way
//! is read back with [`read_regular`], which neither follows links nor blocks on a FIFO.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
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

/// Read a small state file: without following a link at its name, without blocking (a FIFO or a
/// device is refused, not opened for reading), and only when it is a regular file of at most
/// `limit` bytes. `Ok(None)` when there is nothing at `path`.
pub fn read_regular(path: &Path, limit: u64) -> io::Result<Option<Vec<u8>>> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "a symbolic link, not a regular file"));
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file"));
    }
    if meta.len() > limit {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} bytes, more than {limit}", meta.len())));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("more than {limit} bytes")));
    }
    Ok(Some(bytes))
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
