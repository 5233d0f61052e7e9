//! Names from the project's public contract (design.md): keep them stable.

/// Prefix of every label and annotation the project reads or writes.
pub const PREFIX: &str = "nvidia-installer.gardenlinux.io/";
/// Namespace label that enables injection (`=enabled`).
pub const INJECT_LABEL: &str = "nvidia-installer.gardenlinux.io/inject";
/// Pod annotation: `"false"` opts a GPU pod out, `"true"` opts in a pod without GPU resources.
pub const INJECT_ANNOTATION: &str = "nvidia-installer.gardenlinux.io/inject";
/// Pod annotation pinning the driver version the init container waits for.
pub const DRIVER_VERSION_ANNOTATION: &str = "nvidia-installer.gardenlinux.io/driver-version";
/// Pod annotation set by the webhook: what was injected.
pub const INJECTED_ANNOTATION: &str = "nvidia-installer.gardenlinux.io/injected";
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
/// Where the init container sees the host: the driver root sits at `HOST_ROOT` + driver root.
pub const WAIT_HOST_ROOT: &str = "/host";
