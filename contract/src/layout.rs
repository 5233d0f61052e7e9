//! Where things live on the host. Every path is under `--host-root` (the node's root as mounted in
//! the container; a temp dir in tests), so the same code runs privileged on a node and
//! unprivileged in a test.

use std::path::{Path, PathBuf};

/// The contract's default driver root.
pub const DRIVER_ROOT: &str = "/opt/nvidia-installer";

/// Paths of one host.
#[derive(Debug, Clone)]
pub struct Layout {
    host_root: PathBuf,
    root: PathBuf,
}

impl Layout {
    pub fn new(host_root: impl Into<PathBuf>, driver_root: &str) -> Self {
        let host_root = host_root.into();
        let root = host_root.join(driver_root.trim_start_matches('/'));
        Self { host_root, root }
    }

    pub fn host_root(&self) -> &Path {
        &self.host_root
    }
    /// `/opt/nvidia-installer` under the host root.
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }
    /// Relative to [`root`](Self::root): what `current` points at.
    pub fn bundle_relative(kernel: &str, driver: &str) -> PathBuf {
        Path::new("cache").join(kernel).join(driver)
    }
    pub fn bundle(&self, kernel: &str, driver: &str) -> PathBuf {
        self.root.join(Self::bundle_relative(kernel, driver))
    }
    pub fn current(&self) -> PathBuf {
        self.root.join("current")
    }
    pub fn ready(&self) -> PathBuf {
        self.root.join("ready")
    }
    /// Why the last install failed (JSON), read by `wait` to explain itself.
    pub fn last_error(&self) -> PathBuf {
        self.root.join("last-error")
    }
    /// What the last `install` run did (JSON: outcome, duration, bytes, retries, and running
    /// totals), read by `status` for its metrics.
    pub fn last_run(&self) -> PathBuf {
        self.root.join("last-run.json")
    }
    /// Staging directories: on the cache's filesystem, so publishing is a rename.
    pub fn staging(&self) -> PathBuf {
        self.root.join("staging")
    }
    pub fn lock(&self) -> PathBuf {
        self.root.join(".lock")
    }
    /// A path of the host, e.g. `/proc/devices`.
    pub fn host(&self, path: &str) -> PathBuf {
        self.host_root.join(path.trim_start_matches('/'))
    }
    /// The host's boot id; a ready marker from another boot is stale (modules are gone).
    /// Read under the host root when present there, else from this container's `/proc`, which
    /// shows the same host-wide value.
    pub fn boot_id(&self) -> Option<String> {
        let under_root = self.host("/proc/sys/kernel/random/boot_id");
        let text = std::fs::read_to_string(&under_root)
            .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/random/boot_id"))
            .ok()?;
        Some(text.trim().to_owned()).filter(|s| !s.is_empty())
    }
}

/// The running kernel's release (`uname -r`), read under the host root first.
pub fn running_kernel(layout: &Layout) -> Option<String> {
    let text = std::fs::read_to_string(layout.host("/proc/sys/kernel/osrelease"))
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/osrelease"))
        .ok()?;
    Some(text.trim().to_owned()).filter(|s| !s.is_empty())
}
