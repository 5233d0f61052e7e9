//! The one rule for names that become object keys, host paths or label values: driver version,
//! Garden Linux version, kernel release and flavor.
//!
//! Each is a single path component that starts with a letter or digit (so never `.`, `..`, `-x`
//! or empty), has no `/`, no space and nothing a shell or a URL would treat specially. Driver
//! and Garden Linux versions are also Kubernetes label values (the node label
//! `driver-version=<v>`, the seed's `os-version=<v>`): at most 63 characters, ending with a letter
//! or digit, without `+`. Kernel releases may hold `+` (Debian's `6.12.43+deb12-cloud-amd64`).
//!
//! [`NameKind::pattern`] is the same rule as a regular expression, for the chart's values schema
//! (`chart::owned_values` emits it; a test checks that both agree on every input).

/// What a name names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NameKind {
    DriverVersion,
    GardenlinuxVersion,
    KernelRelease,
    Flavor,
}

/// A name that breaks [`the rule`](self).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} {value:?} is not valid: {}", kind.what(), kind.rule())]
pub struct NameError {
    pub kind: NameKind,
    pub value: String,
}

/// The flavors a bundle can have: NVIDIA's open or proprietary kernel modules, or `legacy` for a
/// bundle of the original system (mapped on staging).
pub const FLAVORS: [&str; 3] = ["open", "proprietary", "legacy"];

const LABEL_SAFE: &str = "[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?";
const KERNEL: &str = "[A-Za-z0-9][A-Za-z0-9._+-]{0,127}";

impl NameKind {
    pub const ALL: [NameKind; 4] = [Self::DriverVersion, Self::GardenlinuxVersion, Self::KernelRelease, Self::Flavor];

    /// In words, for messages.
    pub fn what(self) -> &'static str {
        match self {
            Self::DriverVersion => "driver version",
            Self::GardenlinuxVersion => "Garden Linux version",
            Self::KernelRelease => "kernel release",
            Self::Flavor => "flavor",
        }
    }

    /// The rule in words, for messages.
    pub fn rule(self) -> &'static str {
        match self {
            Self::DriverVersion | Self::GardenlinuxVersion => {
                "expected 1 to 63 letters, digits, '.', '-' or '_', starting and ending with a letter or digit"
            }
            Self::KernelRelease => {
                "expected 1 to 128 letters, digits, '.', '-', '_' or '+', starting with a letter or digit"
            }
            Self::Flavor => "expected open, proprietary or legacy",
        }
    }

    /// The rule as an anchored regular expression (JSON Schema / ECMA-262 syntax).
    pub fn pattern(self) -> String {
        match self {
            Self::DriverVersion | Self::GardenlinuxVersion => format!("^{LABEL_SAFE}$"),
            Self::KernelRelease => format!("^{KERNEL}$"),
            Self::Flavor => format!("^({})$", FLAVORS.join("|")),
        }
    }

    /// The rule for a value that may also be left empty (a chart value with a default).
    pub fn pattern_or_empty(self) -> String {
        let pattern = self.pattern();
        let body = pattern.trim_start_matches('^').trim_end_matches('$');
        format!("^({body})?$")
    }
}

/// Check `value` against the rule for `kind`.
pub fn check(kind: NameKind, value: &str) -> Result<(), NameError> {
    if is_valid(kind, value) { Ok(()) } else { Err(NameError { kind, value: value.to_owned() }) }
}

/// Whether `value` follows the rule for `kind`.
pub fn is_valid(kind: NameKind, value: &str) -> bool {
    let bytes = value.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else { return false };
    match kind {
        NameKind::DriverVersion | NameKind::GardenlinuxVersion => {
            bytes.len() <= 63
                && first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        }
        NameKind::KernelRelease => {
            bytes.len() <= 128
                && first.is_ascii_alphanumeric()
                && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'+'))
        }
        NameKind::Flavor => FLAVORS.contains(&value),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn regex(kind: NameKind) -> regex::Regex {
        regex::Regex::new(&kind.pattern()).expect("the pattern compiles")
    }

    #[test]
    fn real_names_pass_and_traversal_fails() {
        for (kind, good) in [
            (NameKind::DriverVersion, "535.261.03"),
            (NameKind::DriverVersion, "450.80.02"),
            (NameKind::GardenlinuxVersion, "1877.3"),
            (NameKind::GardenlinuxVersion, "184.0.0"),
            (NameKind::KernelRelease, "6.12.43+deb12-cloud-amd64"),
            (NameKind::KernelRelease, "6.1.0-47-amd64"),
            (NameKind::Flavor, "open"),
        ] {
            assert_eq!(check(kind, good), Ok(()), "{good}");
            assert!(regex(kind).is_match(good), "{good}");
        }
        for kind in NameKind::ALL {
            for bad in ["", ".", "..", "../other", "a/b", "-rf", "a b", "550+gl1\n", "x\0", "é"] {
                let error = check(kind, bad).expect_err(bad);
                assert!(error.to_string().contains(kind.what()), "{error}");
                assert!(!regex(kind).is_match(bad), "{kind:?} {bad:?}");
            }
        }
        assert!(check(NameKind::DriverVersion, "550+gl1").is_err(), "label values have no '+'");
        assert!(check(NameKind::DriverVersion, &"5".repeat(64)).is_err(), "label values are at most 63");
        assert!(check(NameKind::Flavor, "closed").is_err());
    }

    #[test]
    fn empty_is_allowed_only_by_the_or_empty_pattern() {
        for kind in NameKind::ALL {
            let or_empty = regex::Regex::new(&kind.pattern_or_empty()).expect("compiles");
            assert!(or_empty.is_match(""));
            assert!(!or_empty.is_match("../x"));
        }
    }

    proptest! {
        /// The code and the schema's pattern accept exactly the same names.
        #[test]
        fn code_and_pattern_agree(value in "[A-Za-z0-9._+/ -]{0,70}|[a-z0-9.+-]{120,135}|open|legacy|proprietary") {
            for kind in NameKind::ALL {
                prop_assert_eq!(is_valid(kind, &value), regex(kind).is_match(&value), "{:?} {:?}", kind, value);
            }
        }
    }
}
