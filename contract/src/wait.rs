//! The `wait` invocation: rendered by the webhook into the injected init container, parsed by
//! `nvidia-installer wait`. One type, so that both sides cannot drift apart.

use std::time::Duration;

/// `nvidia-installer wait --host-root H --driver-root D --timeout T [--driver-version V]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitInvocation {
    /// Where the container sees the host (the driver root sits under it).
    pub host_root: String,
    /// The driver root on the host.
    pub driver_root: String,
    pub timeout: Duration,
    /// Wait for exactly this driver version (the pod's pin).
    pub driver_version: Option<String>,
}

impl WaitInvocation {
    /// What the webhook injects: the host's driver root mounted under [`WAIT_HOST_ROOT`](crate::WAIT_HOST_ROOT).
    pub fn for_pod(driver_root: &str, timeout: Duration, driver_version: Option<&str>) -> Self {
        Self {
            host_root: crate::WAIT_HOST_ROOT.to_owned(),
            driver_root: driver_root.to_owned(),
            timeout,
            driver_version: driver_version.map(str::to_owned),
        }
    }

    /// The subcommand and its flags, as the container's `args` (the command is
    /// [`INSTALLER_BINARY`](crate::INSTALLER_BINARY)).
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "wait".to_owned(),
            "--host-root".to_owned(),
            self.host_root.clone(),
            "--driver-root".to_owned(),
            self.driver_root.clone(),
            "--timeout".to_owned(),
            humantime::format_duration(self.timeout).to_string(),
        ];
        if let Some(version) = &self.driver_version {
            args.extend(["--driver-version".to_owned(), version.clone()]);
        }
        args
    }

    /// Where the container mounts the host's driver root.
    pub fn driver_root_mount(&self) -> String {
        format!("{}{}", self.host_root.trim_end_matches('/'), self.driver_root.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_name_every_field() {
        let wait = WaitInvocation::for_pod("/opt/nvidia-installer", Duration::from_secs(600), Some("550.54.14"));
        assert_eq!(
            wait.args(),
            [
                "wait",
                "--host-root",
                "/host",
                "--driver-root",
                "/opt/nvidia-installer",
                "--timeout",
                "10m",
                "--driver-version",
                "550.54.14"
            ]
        );
        assert_eq!(wait.driver_root_mount(), "/host/opt/nvidia-installer");
    }
}
