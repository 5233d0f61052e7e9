//! The public contract of nvidia-installer (`design.md`) as code, shared by `nvidia-installer`,
//! `nvidia-webhook`, the tests and (through [`chart::owned_values`]) the chart's own tests.
//!
//! - names of labels, annotations, volumes and containers (this file);
//! - [`layout`]: where things live on a host;
//! - [`keys`]: where bundles live in the bucket;
//! - [`names`]: the one rule for names that become object keys, paths or label values;
//! - [`wait`]: the `wait` invocation the webhook injects and the installer parses;
//! - [`logging`]: the log set-up both binaries use.
//!
//! Keep the names stable: extend, don't rename.

use std::time::Duration;

pub mod chart;
pub mod keys;
pub mod layout;
pub mod logging;
pub mod names;
pub mod wait;

pub use keys::BundleKeys;
pub use layout::Layout;
pub use names::{NameError, NameKind};
pub use wait::WaitInvocation;

/// Prefix of every label and annotation the project reads or writes.
pub const PREFIX: &str = "nvidia-installer.gardenlinux.io/";
/// Namespace label that enables injection (`=enabled`).
pub const INJECT_LABEL: &str = "nvidia-installer.gardenlinux.io/inject";
/// Value of [`INJECT_LABEL`] that enables injection.
pub const INJECT_LABEL_VALUE: &str = "enabled";
/// Pod annotation: `"false"` opts a GPU pod out, `"true"` opts in a pod without GPU resources.
pub const INJECT_ANNOTATION: &str = "nvidia-installer.gardenlinux.io/inject";
/// Pod annotation pinning the driver version the init container waits for.
pub const DRIVER_VERSION_ANNOTATION: &str = "nvidia-installer.gardenlinux.io/driver-version";
/// Pod annotation set by the webhook: what was injected.
pub const INJECTED_ANNOTATION: &str = "nvidia-installer.gardenlinux.io/injected";
/// Node label: the driver version installed on the node.
pub const DRIVER_VERSION_LABEL: &str = "nvidia-installer.gardenlinux.io/driver-version";
/// Node label: `true` once the driver is loaded and checked, `false` after a failed install.
pub const DRIVER_READY_LABEL: &str = "nvidia-installer.gardenlinux.io/driver-ready";
/// Node label: where a live driver upgrade stands (`upgrade-required`, `cordoned`, `draining`,
/// `unloading`, `installing`, `validating`, `done`, `failed`); `kubectl get nodes -L` shows a rollout.
pub const UPGRADE_STATE_LABEL: &str = "nvidia-installer.gardenlinux.io/upgrade-state";
/// Node annotation: the driver version the upgrade moves to.
pub const UPGRADE_TARGET_ANNOTATION: &str = "nvidia-installer.gardenlinux.io/upgrade-target";
/// Node annotation: why the upgrade failed or what it waits for, in words.
pub const UPGRADE_REASON_ANNOTATION: &str = "nvidia-installer.gardenlinux.io/upgrade-reason";
/// Node annotation: when the upgrade state last changed (RFC 3339), for its timeouts.
pub const UPGRADE_SINCE_ANNOTATION: &str = "nvidia-installer.gardenlinux.io/upgrade-since";
/// Node annotation: the upgrade controller cordoned the node (and only then uncordons it).
pub const UPGRADE_CORDONED_ANNOTATION: &str = "nvidia-installer.gardenlinux.io/upgrade-cordoned";

/// Host directory holding the cache, the `current` link and the `ready` marker.
pub const DRIVER_ROOT: &str = "/opt/nvidia-installer";
/// Where workload containers see the driver bundle.
pub const MOUNT_PATH: &str = "/usr/local/nvidia";
/// Name of the injected init container.
pub const INIT_CONTAINER: &str = "nvidia-driver-wait";
/// Volume with the host's driver root (read-only, for the init container).
pub const ROOT_VOLUME: &str = "nvidia-installer-root";
/// Volume with the current driver bundle (read-only, for GPU containers).
pub const DRIVER_VOLUME: &str = "nvidia-driver";
/// Volume names the webhook injects; a pod that already uses one is refused.
pub const INJECTED_VOLUMES: [&str; 2] = [ROOT_VOLUME, DRIVER_VOLUME];
/// Where the init container sees the host: the driver root sits at `WAIT_HOST_ROOT` + driver root.
pub const WAIT_HOST_ROOT: &str = "/host";
/// The installer's binary name in its image.
pub const INSTALLER_BINARY: &str = "nvidia-installer";
/// The user and group the non-root containers run as.
pub const NONROOT_UID: i64 = 65532;

/// How long `wait` waits for the node's driver unless told otherwise.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(600);
/// [`DEFAULT_WAIT_TIMEOUT`] as written in flags and the chart's values.
pub const DEFAULT_WAIT_TIMEOUT_TEXT: &str = "10m";
/// Resource names that make a container a GPU container; a trailing `*` matches a prefix.
pub const DEFAULT_GPU_RESOURCES: [&str; 2] = ["nvidia.com/gpu", "nvidia.com/mig-*"];
/// Kernel modules `install` loads, in dependency order, unless told otherwise.
pub const DEFAULT_MODULES: [&str; 3] = ["nvidia", "nvidia-uvm", "nvidia-modeset"];
/// [`DEFAULT_MODULES`] as one flag value.
pub const DEFAULT_MODULES_TEXT: &str = "nvidia,nvidia-uvm,nvidia-modeset";

/// Exit codes of `nvidia-installer`, for scripts and probes.
pub mod exit {
    /// Any failure not listed below.
    pub const FAILURE: u8 = 1;
    /// `status`: the node's driver is not ready (the JSON says why).
    pub const NOT_READY: u8 = 3;
    /// `wait`: the timeout passed before the driver was ready (as `timeout(1)` exits).
    pub const WAIT_TIMEOUT: u8 = 124;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_written_as_text_say_the_same_as_the_typed_ones() {
        assert_eq!(humantime::parse_duration(DEFAULT_WAIT_TIMEOUT_TEXT).ok(), Some(DEFAULT_WAIT_TIMEOUT));
        assert_eq!(DEFAULT_MODULES_TEXT.split(',').collect::<Vec<_>>(), DEFAULT_MODULES);
    }

    #[test]
    fn every_label_and_annotation_carries_the_prefix() {
        for name in [
            INJECT_LABEL,
            INJECT_ANNOTATION,
            DRIVER_VERSION_ANNOTATION,
            INJECTED_ANNOTATION,
            DRIVER_VERSION_LABEL,
            DRIVER_READY_LABEL,
        ] {
            assert!(name.starts_with(PREFIX), "{name}");
        }
    }
}
