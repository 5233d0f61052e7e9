//! What the chart must say as the contract does: the defaults it shares with the binaries and the
//! name rule in its values schema. The chart's tests compare the chart against this.

use serde_json::{Value, json};

use crate::names::NameKind;

/// The values the contract owns, keyed by their place in the chart:
/// `values` (path in `values.yaml` → default), `schema` (path in `values.schema.json`'s
/// properties → pattern) and `helpers` (named template in `_helpers.tpl` → output).
pub fn owned_values() -> Value {
    json!({
        "values": {
            "injection.mountPath": crate::MOUNT_PATH,
            "injection.waitTimeout": crate::DEFAULT_WAIT_TIMEOUT_TEXT,
            "injection.gpuResources": crate::DEFAULT_GPU_RESOURCES,
            "nvidiaInstaller.modules": crate::DEFAULT_MODULES,
        },
        "schema": {
            "nvidiaInstaller.driverVersion": NameKind::DriverVersion.pattern_or_empty(),
            "gardenlinuxVersion": NameKind::GardenlinuxVersion.pattern_or_empty(),
            "nvidiaInstaller.kernelRelease": NameKind::KernelRelease.pattern_or_empty(),
        },
        "helpers": {
            "nvidia-installer.driverRoot": crate::DRIVER_ROOT,
        },
    })
}
