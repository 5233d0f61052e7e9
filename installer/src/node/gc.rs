//! `gc`: remove cached bundles other than `current`, keeping the newest `keep` of the others.

use std::path::PathBuf;

use tracing::info;

use crate::node::lock::HostLock;
use crate::{Error, Result};
use nvidia_contract::layout::Layout;

/// Returns the removed bundle directories.
pub async fn gc(layout: &Layout, keep: usize) -> Result<Vec<PathBuf>> {
    let _lock = HostLock::acquire(layout).await?;
    let current = std::fs::canonicalize(layout.current()).ok();
    let mut others: Vec<(std::time::SystemTime, PathBuf)> = crate::node::cache::staged(layout)
        .into_iter()
        .filter(|b| std::fs::canonicalize(&b.path).ok() != current)
        .map(|b| (std::fs::metadata(&b.path).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), b.path))
        .collect();
    others.sort_by_key(|b| std::cmp::Reverse(b.0));
    let mut removed = Vec::new();
    for (_, path) in others.into_iter().skip(keep) {
        info!(bundle = %path.display(), "removing cached bundle");
        std::fs::remove_dir_all(&path).map_err(|e| Error::io("removing", &path, e))?;
        if let Some(parent) = path.parent() {
            // Drop the kernel directory when it is empty.
            let _ = std::fs::remove_dir(parent);
        }
        removed.push(path);
    }
    Ok(removed)
}
