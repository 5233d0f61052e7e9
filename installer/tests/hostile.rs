//! Hostile archives are refused and write nothing outside the staging directory.

use std::path::Path;

use nvidia_installer::Error;
use nvidia_installer::bundle::archive::{Limits, PathMap, extract};

/// A raw tar entry: the name is written byte for byte (the tar crate refuses `..` itself).
fn entry(tar: &mut Vec<u8>, name: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<&str>) {
    let mut header = tar::Header::new_gnu();
    {
        let gnu = header.as_gnu_mut().expect("gnu header");
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
    }
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(data.len() as u64);
    header.set_mtime(0);
    header.set_cksum();
    tar.extend_from_slice(header.as_bytes());
    tar.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    tar.extend(std::iter::repeat_n(0u8, pad));
}

fn finish(mut tar: Vec<u8>) -> Vec<u8> {
    tar.extend(std::iter::repeat_n(0u8, 1024));
    tar
}

fn refused(tar: Vec<u8>, limits: Limits) -> (String, tempfile::TempDir) {
    let outer = tempfile::tempdir().expect("tempdir");
    let staging = outer.path().join("staging");
    std::fs::create_dir(&staging).expect("staging");
    let error = extract(&tar[..], &staging, &PathMap::Bundle, limits, "test.tar").expect_err("must be refused");
    assert!(matches!(error, Error::Hostile { .. }), "{error}");
    // Nothing beside the staging directory.
    let names: Vec<String> = std::fs::read_dir(outer.path())
        .expect("list")
        .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["staging"], "wrote outside the staging dir");
    (error.to_string(), outer)
}

fn ok_file(tar: &mut Vec<u8>) {
    entry(tar, "bin/nvidia-smi", tar::EntryType::Regular, 0o755, b"#!/bin/sh\n", None);
}

#[test]
fn absolute_paths() {
    let mut tar = Vec::new();
    ok_file(&mut tar);
    entry(&mut tar, "/etc/cron.d/evil", tar::EntryType::Regular, 0o644, b"x", None);
    let (message, _dir) = refused(finish(tar), Limits::default());
    assert!(message.contains("absolute path") && message.contains("/etc/cron.d/evil"), "{message}");
}

#[test]
fn parent_directory_components() {
    let mut tar = Vec::new();
    entry(&mut tar, "lib/../../escaped", tar::EntryType::Regular, 0o644, b"x", None);
    let (message, _dir) = refused(finish(tar), Limits::default());
    assert!(message.contains("'..'"), "{message}");
}

#[test]
fn links_out_of_the_bundle_and_writes_through_links() {
    let mut tar = Vec::new();
    entry(&mut tar, "lib/libc.so", tar::EntryType::Symlink, 0o777, b"", Some("/usr/lib/libc.so"));
    let (message, _dir) = refused(finish(tar), Limits::default());
    assert!(message.contains("points outside the bundle"), "{message}");

    let mut tar = Vec::new();
    entry(&mut tar, "lib/up", tar::EntryType::Symlink, 0o777, b"", Some("../../.."));
    let (message, _dir) = refused(finish(tar), Limits::default());
    assert!(message.contains("outside"), "{message}");

    let mut tar = Vec::new();
    entry(&mut tar, "lib/dir", tar::EntryType::Symlink, 0o777, b"", Some("."));
    entry(&mut tar, "lib/dir/x", tar::EntryType::Regular, 0o644, b"x", None);
    let (message, _dir) = refused(finish(tar), Limits::default());
    assert!(message.contains("through the link"), "{message}");

    // A link that climbs out through another link: with `lib/here -> .`, `lib/here/../..` is the
    // bundle's parent, though it reads as if it stayed inside.
    let mut tar = Vec::new();
    entry(&mut tar, "lib/here", tar::EntryType::Symlink, 0o777, b"", Some("."));
    entry(&mut tar, "lib/out", tar::EntryType::Symlink, 0o777, b"", Some("here/../.."));
    let (message, dir) = refused(finish(tar), Limits::default());
    assert!(message.contains("lib/out") && message.contains("points outside the bundle"), "{message}");
    assert!(!dir.path().join("staging/lib/out").exists());

    let mut tar = Vec::new();
    ok_file(&mut tar);
    entry(&mut tar, "bin/hard", tar::EntryType::Link, 0o644, b"", Some("bin/nvidia-smi"));
    let (message, _dir) = refused(finish(tar), Limits::default());
    assert!(message.contains("hard links"), "{message}");
}

#[test]
fn devices_fifos_and_setuid() {
    for (kind, word) in
        [(tar::EntryType::Char, "device"), (tar::EntryType::Block, "device"), (tar::EntryType::Fifo, "FIFO")]
    {
        let mut tar = Vec::new();
        entry(&mut tar, "bin/node", kind, 0o644, b"", None);
        let (message, _dir) = refused(finish(tar), Limits::default());
        assert!(message.contains(word), "{message}");
    }
    for mode in [0o4755, 0o2755, 0o1755] {
        let mut tar = Vec::new();
        entry(&mut tar, "bin/su", tar::EntryType::Regular, mode, b"x", None);
        let (message, _dir) = refused(finish(tar), Limits::default());
        assert!(message.contains("setuid"), "{message}");
    }
}

#[test]
fn sizes_and_counts_beyond_the_limits() {
    let mut tar = Vec::new();
    entry(&mut tar, "lib/big", tar::EntryType::Regular, 0o644, &[7u8; 4096], None);
    let limits = Limits { max_file_bytes: 1024, ..Limits::default() };
    let (message, _dir) = refused(finish(tar), limits);
    assert!(message.contains("per-file limit"), "{message}");

    let mut tar = Vec::new();
    for i in 0..4 {
        entry(&mut tar, &format!("lib/f{i}"), tar::EntryType::Regular, 0o644, &[1u8; 600], None);
    }
    let limits = Limits { max_total_bytes: 2000, ..Limits::default() };
    let (message, _dir) = refused(finish(tar), limits);
    assert!(message.contains("total limit"), "{message}");

    let mut tar = Vec::new();
    for i in 0..5 {
        entry(&mut tar, &format!("lib/f{i}"), tar::EntryType::Regular, 0o644, b"x", None);
    }
    let limits = Limits { max_entries: 3, ..Limits::default() };
    let (message, _dir) = refused(finish(tar), limits);
    assert!(message.contains("entries"), "{message}");
}

#[test]
fn unexpected_top_level_entries_and_duplicates() {
    let mut tar = Vec::new();
    entry(&mut tar, "etc/passwd", tar::EntryType::Regular, 0o644, b"x", None);
    let (message, _dir) = refused(finish(tar), Limits::default());
    assert!(message.contains("unexpected top-level"), "{message}");

    let mut tar = Vec::new();
    ok_file(&mut tar);
    ok_file(&mut tar);
    let (message, _dir) = refused(finish(tar), Limits::default());
    assert!(message.contains("duplicate"), "{message}");
}

#[test]
fn a_good_archive_extracts_with_digests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tar = Vec::new();
    ok_file(&mut tar);
    entry(&mut tar, "lib/libcuda.so.535.261.03", tar::EntryType::Regular, 0o644, b"elf", None);
    entry(&mut tar, "lib/libcuda.so.1", tar::EntryType::Symlink, 0o777, b"", Some("libcuda.so.535.261.03"));
    let extracted =
        extract(&finish(tar)[..], dir.path(), &PathMap::Bundle, Limits::default(), "good.tar").expect("extract");
    assert_eq!(extracted.files.len(), 2);
    assert_eq!(extracted.files["lib/libcuda.so.535.261.03"].sha256, hex_sha(b"elf"));
    assert_eq!(
        std::fs::read_link(dir.path().join("lib/libcuda.so.1")).expect("link"),
        Path::new("libcuda.so.535.261.03")
    );
}

fn hex_sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
