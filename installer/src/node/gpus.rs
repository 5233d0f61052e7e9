//! The node's NVIDIA GPUs, read from sysfs under the host root, and which flavor of the kernel
//! modules can drive them: NVIDIA's open modules run only on Turing and newer GPUs (PCI device
//! ids from 0x1e00 on; the newest older GPUs, Volta, end at 0x1df6), the proprietary ones on
//! those and older GPUs.

use nvidia_contract::layout::Layout;

use crate::compiler::compile::Flavor;
use crate::{Error, Result};

/// NVIDIA's PCI vendor id.
const NVIDIA: u16 = 0x10de;
/// The first Turing device id.
const FIRST_TURING: u16 = 0x1e00;
/// From Blackwell on (device ids from 0x2900), and on Grace Hopper (GH200: 0x2342, 0x2348 in
/// pci.ids), NVIDIA supports only the open kernel modules.
const FIRST_OPEN_ONLY: u16 = 0x2900;
const GRACE_HOPPER: [u16; 2] = [0x2342, 0x2348];

/// One NVIDIA display controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// PCI address, e.g. `0000:00:04.0`.
    pub address: String,
    pub device: u16,
}

impl Gpu {
    pub fn turing_or_newer(&self) -> bool {
        self.device >= FIRST_TURING
    }

    /// Whether only the open modules drive it.
    pub fn open_only(&self) -> bool {
        self.device >= FIRST_OPEN_ONLY || GRACE_HOPPER.contains(&self.device)
    }
}

impl std::fmt::Display for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({NVIDIA:04x}:{:04x})", self.address, self.device)
    }
}

fn hex(text: &str) -> Option<u32> {
    u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// The NVIDIA VGA and 3D controllers in `/sys/bus/pci/devices` (their audio, USB and NVSwitch
/// functions are not GPUs).
pub fn nvidia_gpus(layout: &Layout) -> Vec<Gpu> {
    let devices = layout.host("/sys/bus/pci/devices");
    let Ok(entries) = std::fs::read_dir(&devices) else { return Vec::new() };
    let read = |dir: &std::path::Path, file: &str| std::fs::read_to_string(dir.join(file)).ok().and_then(|t| hex(&t));
    let mut gpus: Vec<Gpu> = entries
        .flatten()
        .filter_map(|entry| {
            let dir = entry.path();
            let vendor = read(&dir, "vendor")?;
            let class = read(&dir, "class")?;
            let device = u16::try_from(read(&dir, "device")?).ok()?;
            let display = matches!(class >> 8, 0x0300 | 0x0302);
            (vendor == u32::from(NVIDIA) && display)
                .then(|| Gpu { address: entry.file_name().to_string_lossy().into_owned(), device })
        })
        .collect();
    gpus.sort_by(|a, b| a.address.cmp(&b.address));
    gpus
}

/// The flavors that can drive every one of `gpus`, best first; `None` when no GPU is seen (any
/// flavor will do). `asked` narrows it; asking for one that cannot drive a GPU is an error naming
/// the GPU.
pub fn flavors_for(gpus: &[Gpu], asked: Flavor) -> Result<Option<Vec<String>>> {
    let older: Vec<String> = gpus.iter().filter(|g| !g.turing_or_newer()).map(ToString::to_string).collect();
    let open_only: Vec<String> = gpus.iter().filter(|g| g.open_only()).map(ToString::to_string).collect();
    if !older.is_empty() && !open_only.is_empty() {
        return Err(Error::Flavor {
            reason: format!(
                "no kernel module flavor drives all of this node's GPUs: {} need the proprietary modules, {} the open ones",
                older.join(", "),
                open_only.join(", ")
            ),
        });
    }
    let flavors: Vec<&str> = match asked {
        Flavor::Proprietary if !open_only.is_empty() => {
            return Err(Error::Flavor {
                reason: format!(
                    "GPU {} is supported by NVIDIA's open kernel modules only; use the open flavor",
                    open_only.join(", ")
                ),
            });
        }
        Flavor::Auto if !open_only.is_empty() => vec!["open"],
        Flavor::Open if !older.is_empty() => {
            return Err(Error::Flavor {
                reason: format!(
                    "GPU {} is older than Turing: NVIDIA's open kernel modules cannot drive it; use the proprietary flavor",
                    older.join(", ")
                ),
            });
        }
        Flavor::Open => vec!["open"],
        Flavor::Proprietary => vec!["proprietary"],
        Flavor::Auto if gpus.is_empty() => return Ok(None),
        Flavor::Auto if !older.is_empty() => vec!["proprietary"],
        Flavor::Auto => vec!["open", "proprietary"],
    };
    Ok(Some(flavors.into_iter().map(str::to_owned).collect()))
}

/// Refuse a bundle of a flavor that cannot drive one of `gpus`, before anything loads.
pub fn check_bundle(gpus: &[Gpu], flavor: &str, driver: &str) -> Result<()> {
    let open_only: Vec<String> = gpus.iter().filter(|g| g.open_only()).map(ToString::to_string).collect();
    if flavor != "open" && !open_only.is_empty() {
        return Err(Error::Flavor {
            reason: format!(
                "GPU {} is supported by NVIDIA's open kernel modules only, but driver {driver}'s bundle holds the {flavor} ones; publish the open flavor",
                open_only.join(", ")
            ),
        });
    }
    let older: Vec<String> = gpus.iter().filter(|g| !g.turing_or_newer()).map(ToString::to_string).collect();
    if flavor == "open" && !older.is_empty() {
        return Err(Error::Flavor {
            reason: format!(
                "GPU {} is older than Turing and needs the proprietary kernel modules, but driver {driver}'s bundle holds the open ones; publish the proprietary flavor",
                older.join(", ")
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sysfs tree with the given (address, vendor, device, class) functions.
    fn host(functions: &[(&str, u16, u16, u32)]) -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().expect("dir");
        for (address, vendor, device, class) in functions {
            let path = dir.path().join("sys/bus/pci/devices").join(address);
            std::fs::create_dir_all(&path).expect("dir");
            std::fs::write(path.join("vendor"), format!("0x{vendor:04x}\n")).expect("vendor");
            std::fs::write(path.join("device"), format!("0x{device:04x}\n")).expect("device");
            std::fs::write(path.join("class"), format!("0x{class:06x}\n")).expect("class");
        }
        let layout = Layout::new(dir.path(), "/opt/nvidia-installer");
        (dir, layout)
    }

    const T4: (&str, u16, u16, u32) = ("0000:00:04.0", 0x10de, 0x1eb8, 0x030200);
    const V100: (&str, u16, u16, u32) = ("0000:00:05.0", 0x10de, 0x1db4, 0x030200);
    const T4_AUDIO: (&str, u16, u16, u32) = ("0000:00:04.1", 0x10de, 0x10fa, 0x040300);
    const INTEL_VGA: (&str, u16, u16, u32) = ("0000:00:02.0", 0x8086, 0x1234, 0x030000);

    #[test]
    fn a_t4_node_prefers_the_open_modules() {
        let (_dir, layout) = host(&[T4, T4_AUDIO, INTEL_VGA]);
        let gpus = nvidia_gpus(&layout);
        assert_eq!(gpus, vec![Gpu { address: "0000:00:04.0".into(), device: 0x1eb8 }]);
        assert_eq!(flavors_for(&gpus, Flavor::Auto).expect("flavors"), Some(vec!["open".into(), "proprietary".into()]));
        assert!(check_bundle(&gpus, "open", "535.261.03").is_ok());
    }

    #[test]
    fn a_v100_node_needs_the_proprietary_modules_and_says_so() {
        let (_dir, layout) = host(&[V100]);
        let gpus = nvidia_gpus(&layout);
        assert_eq!(flavors_for(&gpus, Flavor::Auto).expect("flavors"), Some(vec!["proprietary".into()]));
        let error = flavors_for(&gpus, Flavor::Open).expect_err("open cannot").to_string();
        assert!(error.contains("0000:00:05.0 (10de:1db4)") && error.contains("older than Turing"), "{error}");
        let error = check_bundle(&gpus, "open", "535.261.03").expect_err("refused").to_string();
        assert!(error.contains("needs the proprietary kernel modules") && error.contains("535.261.03"), "{error}");
    }

    #[test]
    fn a_mixed_node_takes_what_drives_all_of_its_gpus() {
        let (_dir, layout) = host(&[T4, V100]);
        let gpus = nvidia_gpus(&layout);
        assert_eq!(gpus.len(), 2);
        assert_eq!(flavors_for(&gpus, Flavor::Auto).expect("flavors"), Some(vec!["proprietary".into()]));
        assert!(check_bundle(&gpus, "proprietary", "535.261.03").is_ok());
    }

    #[test]
    fn blackwell_and_grace_hopper_take_the_open_modules_only() {
        let (_dir, layout) = host(&[("0000:00:06.0", 0x10de, 0x2901, 0x030200)]);
        let gpus = nvidia_gpus(&layout);
        assert_eq!(flavors_for(&gpus, Flavor::Auto).expect("flavors"), Some(vec!["open".into()]));
        assert!(
            flavors_for(&gpus, Flavor::Proprietary)
                .expect_err("open only")
                .to_string()
                .contains("open kernel modules only")
        );
        assert!(check_bundle(&gpus, "proprietary", "570.172.08").is_err());
        let (_dir, layout) = host(&[V100, ("0000:00:06.0", 0x10de, 0x2342, 0x030200)]);
        let error = flavors_for(&nvidia_gpus(&layout), Flavor::Auto).expect_err("no flavor for both").to_string();
        assert!(error.contains("no kernel module flavor drives all"), "{error}");
    }

    #[test]
    fn no_gpu_seen_accepts_any_flavor() {
        let (_dir, layout) = host(&[INTEL_VGA]);
        assert_eq!(flavors_for(&nvidia_gpus(&layout), Flavor::Auto).expect("flavors"), None);
    }
}
