//! The device nodes `install` makes under the host's `/dev`: majors from `/proc/devices`, one
//! `/dev/nvidia<N>` per GPU, `nvidiactl` and the helper modules' nodes.

use std::path::PathBuf;

use nvidia_contract::layout::Layout;
use tracing::info;

use crate::node::kernel::Kernel;
use crate::{Error, Result};

/// Majors by name from `/proc/devices` (character devices).
pub fn char_majors(layout: &Layout) -> Result<Vec<(u64, String)>> {
    let path = layout.host("/proc/devices");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io("reading", &path, e))?;
    let mut majors = Vec::new();
    for line in text.lines() {
        if line.starts_with("Block devices") {
            break;
        }
        if let Some((major, name)) = line.trim().split_once(' ')
            && let Ok(major) = major.parse()
        {
            majors.push((major, name.trim().to_owned()));
        }
    }
    Ok(majors)
}

/// A device node the install makes: its name under `/dev`, the `/proc/devices` names its major
/// is read from, and its minor (`None`: one node per GPU, minor = the GPU's index).
pub(crate) struct NodeSpec {
    pub(crate) name: &'static str,
    pub(crate) major_of: &'static [&'static str],
    pub(crate) minor: Option<u64>,
}

const FRONTEND: &[&str] = &["nvidia-frontend", "nvidia"];
const UVM: &[&str] = &["nvidia-uvm"];

/// `/dev/nvidia<N>` per GPU, `nvidiactl`, and the nodes of the loaded helper modules.
pub(crate) fn node_specs(modules: &[String]) -> Vec<NodeSpec> {
    let mut specs = vec![
        NodeSpec { name: "nvidia", major_of: FRONTEND, minor: None },
        NodeSpec { name: "nvidiactl", major_of: FRONTEND, minor: Some(255) },
    ];
    if modules.iter().any(|m| m == "nvidia-modeset") {
        specs.push(NodeSpec { name: "nvidia-modeset", major_of: FRONTEND, minor: Some(254) });
    }
    if modules.iter().any(|m| m == "nvidia-uvm") {
        specs.push(NodeSpec { name: "nvidia-uvm", major_of: UVM, minor: Some(0) });
        specs.push(NodeSpec { name: "nvidia-uvm-tools", major_of: UVM, minor: Some(1) });
    }
    specs
}

/// Create the device nodes that are missing or wrong; `made` gets each node that did not exist
/// before (a rollback removes those; a replaced wrong node stays replaced).
pub(crate) fn make_device_nodes(
    layout: &Layout,
    kernel: &dyn Kernel,
    modules: &[String],
    made: &mut Vec<PathBuf>,
) -> Result<()> {
    let majors = char_majors(layout)?;
    let devices = layout.host("/proc/devices");
    let major = |names: &[&str]| -> Result<u64> {
        majors.iter().find(|(_, n)| names.contains(&n.as_str())).map(|(m, _)| *m).ok_or_else(|| Error::Device {
            path: devices.clone(),
            reason: format!("no {} major number: the module is not registered", names[0]),
        })
    };
    let gpus_dir = layout.host("/proc/driver/nvidia/gpus");
    let gpus = std::fs::read_dir(&gpus_dir).map(|d| d.count() as u64).unwrap_or(0);
    if gpus == 0 {
        return Err(Error::Device { path: gpus_dir, reason: "the driver lists no GPUs".to_owned() });
    }
    let mut nodes: Vec<(String, u64, u64)> = Vec::new();
    for spec in node_specs(modules) {
        let major = major(spec.major_of)?;
        match spec.minor {
            Some(minor) => nodes.push((spec.name.to_owned(), major, minor)),
            None => nodes.extend((0..gpus).map(|i| (format!("{}{i}", spec.name), major, i))),
        }
    }
    let dev = layout.host("/dev");
    for (name, major, minor) in nodes {
        let path = dev.join(&name);
        let existed = std::fs::symlink_metadata(&path).is_ok();
        if let Ok(meta) = std::fs::metadata(&path) {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let rdev = meta.rdev();
            if meta.file_type().is_char_device()
                && nix::sys::stat::major(rdev) == major
                && nix::sys::stat::minor(rdev) == minor
            {
                continue;
            }
            std::fs::remove_file(&path).map_err(|e| Error::io("replacing", &path, e))?;
        }
        kernel.mknod(&path, major, minor).map_err(|e| Error::Device { path: path.clone(), reason: e.to_string() })?;
        info!(device = %path.display(), major, minor, "device node created");
        if !existed {
            made.push(path);
        }
    }
    Ok(())
}
