//! What the webhook injects: image, paths, timeout and the resource names that make a pod a GPU pod.

use std::time::Duration;

use nvidia_contract as contract;

/// Injection settings. The chart derives them from the same values as the installer DaemonSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// Image of `nvidia-installer`, run as the init container.
    pub installer_image: String,
    /// `imagePullPolicy` of the init container.
    pub image_pull_policy: String,
    /// Host directory with `current` and `ready` (the contract's `/opt/nvidia-installer`).
    pub driver_root: String,
    /// Where GPU containers see the bundle.
    pub mount_path: String,
    /// How long the init container waits for the node's driver.
    pub wait_timeout: Duration,
    /// Resource names that make a container a GPU container; a trailing `*` matches a prefix.
    pub gpu_resources: Vec<String>,
    /// Extend (or set) `LD_LIBRARY_PATH` so non-CUDA images find `libcuda.so.1`.
    pub set_library_path: bool,
}

impl InjectConfig {
    /// Settings with the contract's defaults and the given installer image.
    pub fn new(installer_image: impl Into<String>) -> Self {
        Self {
            installer_image: installer_image.into(),
            image_pull_policy: "IfNotPresent".to_owned(),
            driver_root: contract::DRIVER_ROOT.to_owned(),
            mount_path: contract::MOUNT_PATH.to_owned(),
            wait_timeout: contract::DEFAULT_WAIT_TIMEOUT,
            gpu_resources: contract::DEFAULT_GPU_RESOURCES.map(String::from).to_vec(),
            set_library_path: true,
        }
    }

    /// Whether `name` is one of the configured GPU resource names.
    pub fn is_gpu_resource(&self, name: &str) -> bool {
        self.gpu_resources.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == pattern,
        })
    }

    /// Host path of the `current` bundle link.
    pub fn current_path(&self) -> String {
        format!("{}/current", self.driver_root.trim_end_matches('/'))
    }

    /// The library directories added to `LD_LIBRARY_PATH`.
    pub fn library_path(&self) -> String {
        let root = self.mount_path.trim_end_matches('/');
        format!("{root}/lib:{root}/lib64")
    }

    /// Check the settings before serving with them.
    pub fn validate(&self) -> crate::Result<()> {
        let fail = |what: &str| Err(crate::Error::Config(what.to_owned()));
        if self.installer_image.trim().is_empty() {
            return fail("--installer-image is empty");
        }
        if !matches!(self.image_pull_policy.as_str(), "Always" | "IfNotPresent" | "Never") {
            return fail("--image-pull-policy must be Always, IfNotPresent or Never");
        }
        for (flag, path) in [("--driver-root", &self.driver_root), ("--mount-path", &self.mount_path)] {
            if !path.starts_with('/') || path.split('/').any(|part| part == "..") {
                return Err(crate::Error::Config(format!("{flag} {path:?} must be an absolute path without '..'")));
            }
        }
        if self.gpu_resources.is_empty() {
            return fail("--gpu-resources names no resource");
        }
        if self.wait_timeout.is_zero() {
            return fail("--wait-timeout must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_patterns_match_exact_names_and_prefixes() {
        let config = InjectConfig::new("img");
        assert!(config.is_gpu_resource("nvidia.com/gpu"));
        assert!(config.is_gpu_resource("nvidia.com/mig-1g.10gb"));
        assert!(!config.is_gpu_resource("nvidia.com/gpu.shared"));
        assert!(!config.is_gpu_resource("amd.com/gpu"));
    }

    #[test]
    fn validate_rejects_relative_and_traversing_paths() {
        let mut config = InjectConfig::new("img");
        assert!(config.validate().is_ok());
        config.mount_path = "usr/local/nvidia".into();
        assert!(config.validate().is_err());
        config.mount_path = "/usr/../etc".into();
        assert!(config.validate().is_err());
    }
}
