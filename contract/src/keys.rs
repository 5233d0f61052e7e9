//! Where a bundle lives in the bucket.
//!
//! `gardenlinux-<GL>/<kernel-release>/nvidia-<driver>.tar.zst`, its manifest beside it
//! (`….manifest.json`, written last), and the original system's
//! `gardenlinux-<GL>-nvidia-<driver>.tar.gz`, which is still read.

use crate::names::{self, NameError, NameKind};

/// The object keys of one bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleKeys {
    pub archive: String,
    pub manifest: String,
    pub legacy: String,
}

impl BundleKeys {
    /// The keys for (Garden Linux version, kernel release, driver version); each must follow
    /// [the name rule](crate::names), so no key can climb or hide under another prefix.
    pub fn new(gardenlinux: &str, kernel: &str, driver: &str) -> Result<Self, NameError> {
        names::check(NameKind::GardenlinuxVersion, gardenlinux)?;
        names::check(NameKind::KernelRelease, kernel)?;
        names::check(NameKind::DriverVersion, driver)?;
        let archive = format!("gardenlinux-{gardenlinux}/{kernel}/nvidia-{driver}.tar.zst");
        Ok(Self {
            manifest: format!("{archive}.manifest.json"),
            archive,
            legacy: format!("gardenlinux-{gardenlinux}-nvidia-{driver}.tar.gz"),
        })
    }

    /// The keys of one flavor of the bundle, beside the plain ones, so that a bucket can hold
    /// both flavors of a driver version: `gardenlinux-<GL>/<kernel>/<flavor>/nvidia-<driver>.tar.zst`
    /// (a kernel release holds no `/`, so these never meet the plain keys).
    pub fn flavored(gardenlinux: &str, kernel: &str, driver: &str, flavor: &str) -> Result<Self, NameError> {
        let plain = Self::new(gardenlinux, kernel, driver)?;
        names::check(NameKind::Flavor, flavor)?;
        let archive = format!("gardenlinux-{gardenlinux}/{kernel}/{flavor}/nvidia-{driver}.tar.zst");
        Ok(Self { manifest: format!("{archive}.manifest.json"), archive, legacy: plain.legacy })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_contract() {
        let keys = BundleKeys::new("1877.3", "6.12.43+deb12-cloud-amd64", "535.261.03").expect("valid");
        assert_eq!(keys.archive, "gardenlinux-1877.3/6.12.43+deb12-cloud-amd64/nvidia-535.261.03.tar.zst");
        assert_eq!(
            keys.manifest,
            "gardenlinux-1877.3/6.12.43+deb12-cloud-amd64/nvidia-535.261.03.tar.zst.manifest.json"
        );
        assert_eq!(keys.legacy, "gardenlinux-1877.3-nvidia-535.261.03.tar.gz");
    }

    #[test]
    fn flavored_keys_sit_beside_the_plain_ones() {
        let keys = BundleKeys::flavored("1877.3", "6.1.0-47-amd64", "535.261.03", "proprietary").expect("valid");
        assert_eq!(keys.archive, "gardenlinux-1877.3/6.1.0-47-amd64/proprietary/nvidia-535.261.03.tar.zst");
        assert_eq!(keys.manifest, format!("{}.manifest.json", keys.archive));
        assert!(BundleKeys::flavored("1877.3", "6.1.0-47-amd64", "535.261.03", "../x").is_err());
    }

    #[test]
    fn names_that_would_escape_the_prefix_are_refused() {
        let error = BundleKeys::new("1877.0/../other", "6.1.0-47-amd64", "535.261.03").expect_err("climbs");
        assert_eq!(error.kind, NameKind::GardenlinuxVersion);
        assert!(BundleKeys::new("1877.0", "6.1.0 47", "535").is_err());
        assert!(BundleKeys::new("1877.0", "6.1.0-47-amd64", "../535").is_err());
    }
}
