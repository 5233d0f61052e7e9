//! Fuzz-style property tests on stable Rust: arbitrary and mutated bytes into the manifest parser
//! and the archive checks (tar entries, zstd and gzip streams). Whatever comes in: no panic, an
//! error or a result, and nothing written outside the staging directory.

use std::io::Write;
use std::path::Path;

use nvidia_installer::bundle::archive::{Limits, PathMap, extract};
use nvidia_installer::bundle::manifest::Manifest;
use proptest::prelude::*;

const CASES: u32 = 1000;

/// A small valid bundle tar: a program, a library with its soname link, a module, a manifest.
fn valid_tar() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8], mode: u32| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_cksum();
        builder.append_data(&mut header, path, data).expect("append");
    };
    add("bin/nvidia-smi", b"#!/bin/sh\necho ok\n", 0o755);
    add("lib/libcuda.so.550.54.14", &[7u8; 700], 0o644);
    add("modules/nvidia.ko", b"\x7fELF\0vermagic=6.1.0 SMP\0", 0o644);
    add("manifest.json", br#"{"schemaVersion":1}"#, 0o644);
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    header.set_mode(0o777);
    header.set_cksum();
    builder.append_link(&mut header, "lib/libcuda.so.1", "libcuda.so.550.54.14").expect("link");
    builder.into_inner().expect("tar")
}

fn valid_manifest() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 1, "driverVersion": "550.54.14", "kernelRelease": "6.1.0-47-amd64", "flavor": "open",
        "modules": [{"name": "nvidia", "path": "modules/nvidia.ko", "vermagic": "6.1.0-47-amd64 SMP", "depends": ["drm"]}],
        "files": {"modules/nvidia.ko": {"sha256": "ab", "size": 3, "mode": 420}, "bin/nvidia-smi": {"sha256": "cd", "size": 1}},
        "links": {"lib/libcuda.so.1": "libcuda.so.550.54.14"},
        "archive": {"sha256": "ef", "size": 10}
    }))
    .expect("json")
}

/// `bytes` with `flips` (offset, xor) applied and cut at `cut` (a fraction of the length).
fn mutate(mut bytes: Vec<u8>, flips: &[(usize, u8)], cut: Option<f64>) -> Vec<u8> {
    let len = bytes.len();
    for &(at, xor) in flips {
        if len > 0 {
            bytes[at % len] ^= xor;
        }
    }
    if let Some(cut) = cut {
        bytes.truncate((len as f64 * cut) as usize);
    }
    bytes
}

/// Extract into `outer/staging` with the bundle layout and the original system's, and check
/// that nothing appeared beside it and every link stays inside.
fn extract_confined(reader: impl std::io::Read, legacy: bool) {
    let outer = tempfile::tempdir().expect("tempdir");
    let staging = outer.path().join("staging");
    std::fs::create_dir(&staging).expect("staging");
    let limits = Limits { max_entries: 64, max_file_bytes: 1 << 20, max_total_bytes: 4 << 20 };
    let map = if legacy { PathMap::Legacy { kernel: "6.1.0-47-amd64".to_owned() } } else { PathMap::Bundle };
    let _ = extract(reader, &staging, &map, limits, "fuzz");
    let beside: Vec<_> = std::fs::read_dir(outer.path()).expect("outer").flatten().map(|e| e.file_name()).collect();
    assert_eq!(beside, vec![std::ffi::OsString::from("staging")], "something was written beside the staging dir");
    assert_links_stay_inside(&staging, &staging);
}

fn assert_links_stay_inside(root: &Path, dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("dir").flatten() {
        let path = entry.path();
        let kind = entry.file_type().expect("type");
        if kind.is_symlink() {
            let target = std::fs::read_link(&path).expect("link");
            assert!(!target.is_absolute(), "absolute link {}", path.display());
            if let Ok(resolved) = path.parent().expect("parent").join(&target).canonicalize() {
                let root = root.canonicalize().expect("root");
                assert!(resolved.starts_with(&root), "{} leaves the bundle", path.display());
            }
        } else if kind.is_dir() {
            assert_links_stay_inside(root, &path);
        } else {
            assert!(kind.is_file(), "{} is neither file, dir nor link", path.display());
        }
    }
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 1).expect("zstd")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

fn flips() -> impl Strategy<Value = Vec<(usize, u8)>> {
    prop::collection::vec((any::<usize>(), 1u8..=255), 0..12)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_manifest_parser_never_panics(
        raw in prop::collection::vec(any::<u8>(), 0..2048),
        flips in flips(),
        cut in prop::option::of(0.0f64..1.0),
    ) {
        let _ = Manifest::parse(&raw, "fuzz");
        let mutated = mutate(valid_manifest(), &flips, cut);
        if let Ok(manifest) = Manifest::parse(&mutated, "fuzz") {
            // What parses keeps to the rules the node relies on.
            for module in &manifest.modules {
                prop_assert!(module.path.starts_with("modules/") && manifest.files.contains_key(&module.path));
            }
            for path in manifest.files.keys().chain(manifest.links.keys()) {
                prop_assert!(!path.starts_with('/') && !path.split('/').any(|c| c == ".."), "{}", path);
            }
        }
    }

    #[test]
    fn tar_entry_checks_never_panic_or_escape(
        raw in prop::collection::vec(any::<u8>(), 0..4096),
        flips in flips(),
        cut in prop::option::of(0.0f64..1.0),
        legacy in any::<bool>(),
    ) {
        extract_confined(&raw[..], legacy);
        extract_confined(&mutate(valid_tar(), &flips, cut)[..], legacy);
    }

    #[test]
    fn compressed_streams_never_panic_or_escape(
        raw in prop::collection::vec(any::<u8>(), 0..2048),
        flips in flips(),
        cut in prop::option::of(0.0f64..1.0),
        gz in any::<bool>(),
    ) {
        let compressed = if gz { gzip(&valid_tar()) } else { zstd(&valid_tar()) };
        for bytes in [raw, mutate(compressed, &flips, cut)] {
            if gz {
                extract_confined(flate2::read::GzDecoder::new(&bytes[..]), true);
            } else if let Ok(decoder) = zstd::Decoder::new(&bytes[..]) {
                extract_confined(decoder, false);
            }
        }
    }
}
