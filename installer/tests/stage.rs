//! `stage` against a real S3 server on loopback (signed requests, TLS): both key layouts, cache
//! hits, verification failures, hostile archives, missing objects and injected S3 faults.

mod common;

use std::path::Path;

use common::*;
use integration_tests::s3::{Fault, Method, S3Server};
use nvidia_contract::layout::Layout;
use nvidia_installer::Error;
use nvidia_installer::node::stage::stage;

fn assert_nothing_published(layout: &Layout) {
    assert!(!layout.bundle(KERNEL, DRIVER).exists(), "a bundle was published");
    assert!(std::fs::symlink_metadata(layout.current()).is_err(), "current was switched");
    let leftovers: Vec<_> =
        std::fs::read_dir(layout.staging()).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(leftovers.is_empty(), "staging leftovers: {leftovers:?}");
}

fn archive_gets(server: &S3Server) -> Vec<integration_tests::s3::LogEntry> {
    server
        .log()
        .matching(&Method::GET, ".tar.zst")
        .into_iter()
        .filter(|e| !e.path.ends_with(".manifest.json"))
        .collect()
}

#[tokio::test]
async fn stages_verifies_switches_current_and_then_hits_the_cache() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    let manifest = publish_bundle(&server, work.path(), KERNEL, DRIVER, 3 << 20).await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());

    let staged = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect("stage");
    assert!(staged.current && staged.downloaded_from.as_deref().is_some_and(|k| k.ends_with(".tar.zst")));
    let bundle = layout.bundle(KERNEL, DRIVER);
    assert_eq!(std::fs::read_link(layout.current()).expect("current"), Path::new("cache").join(KERNEL).join(DRIVER));
    for file in [
        "bin/nvidia-smi",
        "lib/libnvidia-ml.so.1",
        "lib64/libnvidia-ml.so.1",
        "lib/libcuda.so.1",
        "modules/nvidia.ko",
        "modules/nvidia-uvm.ko",
    ] {
        assert!(layout.current().join(file).is_file(), "{file} missing");
    }
    for (path, entry) in &manifest.files {
        assert_eq!(nvidia_installer::bundle::sha256_file(&bundle.join(path)).expect("hash"), entry.sha256, "{path}");
    }
    let archive_size = manifest.archive.as_ref().expect("archive").size;
    let gets = archive_gets(&server);
    assert!(gets.len() > 1, "parallel ranged GETs expected, got {}", gets.len());
    assert!(gets.iter().all(|e| e.range.is_some()));
    assert_eq!(gets.iter().map(|e| e.bytes_sent).sum::<u64>(), archive_size);

    server.log().clear();
    let again = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect("stage again");
    assert_eq!(again.downloaded_from, None, "cache hit");
    assert!(server.log().is_empty(), "a cache hit makes no request: {:?}", server.log().entries());
}

#[tokio::test]
async fn a_damaged_cache_is_staged_again() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    publish_bundle(&server, work.path(), KERNEL, DRIVER, 1 << 20).await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect("stage");
    std::fs::write(layout.bundle(KERNEL, DRIVER).join("lib/libcuda.so.535.261.03"), b"short").expect("damage");
    let again = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect("stage again");
    assert!(again.downloaded_from.is_some(), "damaged bundle re-downloaded");
}

#[tokio::test]
async fn the_legacy_layout_is_read_and_mapped() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let _work = tempfile::tempdir().expect("work");
    // The original system's archive: bin/, lib/, lib/modules/<kernel>/…
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let mut add = |path: &str, data: &[u8], mode: u32| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        builder.append_data(&mut header, path, data).expect("append");
    };
    add("bin/nvidia-smi", b"#!/bin/sh\necho ok\n", 0o755);
    add("lib/libnvidia-ml.so.1", b"nvml", 0o644);
    add(&format!("lib/modules/{KERNEL}/kernel/drivers/video/nvidia.ko"), &module_bytes("nvidia", KERNEL, ""), 0o644);
    add(
        &format!("lib/modules/{KERNEL}/kernel/drivers/video/nvidia-uvm.ko"),
        &module_bytes("nvidia_uvm", KERNEL, "nvidia"),
        0o644,
    );
    let gz = builder.into_inner().expect("tar").finish().expect("gz");
    server.put_object(BUCKET, &format!("gardenlinux-{GARDENLINUX}-nvidia-{DRIVER}.tar.gz"), gz);
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());

    let staged = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect("stage legacy");
    assert_eq!(staged.manifest.flavor, "legacy");
    assert!(layout.current().join("modules/nvidia.ko").is_file());
    assert!(layout.current().join("modules/nvidia-uvm.ko").is_file());
    assert!(layout.current().join("lib/libnvidia-ml.so.1").is_file());
    assert!(!layout.current().join("lib/modules").exists(), "modules moved out of lib/");
    assert_eq!(staged.manifest.modules.len(), 2);

    // The same legacy archive does not serve another kernel.
    let other = tempfile::tempdir().expect("host");
    let layout = host(other.path());
    let error = stage(&layout, &request(&server, "6.12.0-1-cloud-amd64", DRIVER)).await.expect_err("wrong kernel");
    let message = error.to_string();
    assert!(message.contains("6.12.0-1-cloud-amd64") && message.contains(KERNEL), "{message}");
}

#[tokio::test]
async fn a_missing_bundle_names_the_bucket_and_every_key_tried() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let error = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect_err("missing");
    let message = error.to_string();
    assert!(matches!(error, Error::NotFound { .. }), "{message}");
    for key in [
        format!("gardenlinux-{GARDENLINUX}/{KERNEL}/nvidia-{DRIVER}.tar.zst.manifest.json"),
        format!("gardenlinux-{GARDENLINUX}-nvidia-{DRIVER}.tar.gz"),
    ] {
        assert!(message.contains(&key), "{message}");
    }
    assert!(message.contains(BUCKET));
    assert_nothing_published(&layout);
}

#[tokio::test]
async fn a_checksum_mismatch_publishes_nothing() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    let manifest = publish_bundle(&server, work.path(), KERNEL, DRIVER, 1 << 20).await;
    let key = format!("gardenlinux-{GARDENLINUX}/{KERNEL}/nvidia-{DRIVER}.tar.zst");
    // Same size, one byte different near the end (inside the compressed stream's checksum area).
    let mut bytes = server.get_object(BUCKET, &key).expect("archive");
    let at = bytes.len() - 3;
    bytes[at] ^= 0xff;
    server.put_object(BUCKET, &key, bytes);
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let error = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect_err("mismatch");
    let message = error.to_string();
    assert!(message.contains(&key), "{message}");
    assert!(
        matches!(error, Error::Checksum { .. } | Error::Archive { .. }),
        "a damaged archive is refused by its digest or by the decoder: {message}"
    );
    assert_nothing_published(&layout);

    // An intact archive whose digest is not the one the manifest promises.
    let manifest_key = format!("{key}.manifest.json");
    let mut wrong = manifest.clone();
    if let Some(archive) = wrong.archive.as_mut() {
        archive.sha256 = "0".repeat(64);
    }
    server.put_object(
        BUCKET,
        &key,
        std::fs::read(work.path().join(format!("nvidia-{DRIVER}.tar.zst"))).expect("original"),
    );
    server.put_object(BUCKET, &manifest_key, wrong.to_json());
    let error = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect_err("digest mismatch");
    assert!(matches!(error, Error::Checksum { .. }), "{error}");
    assert!(error.to_string().contains(&"0".repeat(64)) && error.to_string().contains(&key), "{error}");
    assert_nothing_published(&layout);
}

#[tokio::test]
async fn a_file_that_differs_from_its_manifest_entry_publishes_nothing() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    let dir = driver_dir(work.path(), KERNEL, DRIVER, 4096);
    let info = nvidia_installer::bundle::pack::BundleInfo {
        driver_version: DRIVER.into(),
        kernel_release: KERNEL.into(),
        flavor: "open".into(),
        gardenlinux_version: Some(GARDENLINUX.into()),
    };
    let manifest = nvidia_installer::bundle::pack::describe(&dir, &info).expect("describe");
    // The file changes after it was described: the archive holds other bytes than listed.
    std::fs::write(dir.join("bin/nvidia-smi"), "#!/bin/sh\necho tampered\n").expect("tamper");
    let mut listed = manifest.clone();
    listed.files.get_mut("bin/nvidia-smi").expect("smi").size = "#!/bin/sh\necho tampered\n".len() as u64;
    let out = work.path().join("bundle.tar.zst");
    let packed = nvidia_installer::bundle::pack::pack(&dir, &listed, &out, 3).expect("pack");
    let keys = nvidia_installer::s3::BundleKeys::new(GARDENLINUX, KERNEL, DRIVER).expect("valid names");
    server.put_file(BUCKET, &keys.archive, &out);
    server.put_object(BUCKET, &keys.manifest, packed.to_json());
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let error = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect_err("tampered");
    assert!(matches!(error, Error::Checksum { .. }) && error.to_string().contains("bin/nvidia-smi"), "{error}");
    assert_nothing_published(&layout);
}

#[tokio::test]
async fn a_truncated_archive_publishes_nothing() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    let dir = driver_dir(work.path(), KERNEL, DRIVER, 1 << 20);
    let out = work.path().join("bundle.tar.zst");
    let manifest = pack_bundle(&dir, KERNEL, DRIVER, &out);
    let mut bytes = std::fs::read(&out).expect("read");
    bytes.truncate(bytes.len() / 2);
    // A manifest that matches the truncated bytes, as a publisher cut short would have written.
    let mut truncated = manifest.clone();
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    truncated.archive =
        Some(nvidia_installer::bundle::manifest::ArchiveEntry { sha256: digest, size: bytes.len() as u64 });
    let keys = nvidia_installer::s3::BundleKeys::new(GARDENLINUX, KERNEL, DRIVER).expect("valid names");
    server.put_object(BUCKET, &keys.archive, bytes);
    server.put_object(BUCKET, &keys.manifest, truncated.to_json());
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let error = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect_err("truncated");
    assert!(matches!(error, Error::Archive { .. }), "{error}");
    assert!(error.to_string().contains(&keys.archive), "{error}");
    assert_nothing_published(&layout);
}

#[tokio::test]
async fn a_hostile_archive_with_a_valid_digest_is_refused() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    let dir = driver_dir(work.path(), KERNEL, DRIVER, 4096);
    let out = work.path().join("bundle.tar.zst");
    let manifest = pack_bundle(&dir, KERNEL, DRIVER, &out);
    // Rebuild the archive with a link out of the bundle added, and describe it honestly.
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    header.set_mode(0o777);
    tar.append_link(&mut header, "lib/libevil.so", "/etc/shadow").expect("link");
    let zst = zstd::encode_all(&tar.into_inner().expect("tar")[..], 3).expect("zstd");
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&zst))
    };
    let mut described = manifest.clone();
    described.archive =
        Some(nvidia_installer::bundle::manifest::ArchiveEntry { sha256: digest, size: zst.len() as u64 });
    let keys = nvidia_installer::s3::BundleKeys::new(GARDENLINUX, KERNEL, DRIVER).expect("valid names");
    server.put_object(BUCKET, &keys.archive, zst);
    server.put_object(BUCKET, &keys.manifest, described.to_json());
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let error = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect_err("hostile");
    assert!(matches!(error, Error::Hostile { .. }) && error.to_string().contains("/etc/shadow"), "{error}");
    assert_nothing_published(&layout);
}

#[tokio::test]
async fn transient_faults_are_retried_and_cut_bodies_resume_their_range() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    publish_bundle(&server, work.path(), KERNEL, DRIVER, 2 << 20).await;
    server.log().clear();
    let faults = server.faults();
    faults.inject_suffix_times(Method::GET, ".tar.zst", Fault::SlowDown, 2);
    faults.inject_suffix_times(Method::GET, ".tar.zst", Fault::InternalError, 1);
    faults.inject_suffix_times(Method::GET, ".tar.zst", Fault::Reset, 1);
    faults.inject_suffix_times(Method::GET, ".tar.zst", Fault::CutBody { after: 100_000 }, 1);
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let staged = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect("stage through faults");
    assert!(staged.current);
    assert_eq!(faults.pending(), 0, "every fault was hit");
    let gets = archive_gets(&server);
    let cut = gets.iter().find(|e| matches!(e.fault, Some(Fault::CutBody { .. }))).expect("the cut request");
    let range = cut.range.clone().expect("range");
    let start: u64 = range.trim_start_matches("bytes=").split('-').next().and_then(|s| s.parse().ok()).expect("start");
    let resumed = format!("bytes={}-", start + 100_000);
    assert!(
        gets.iter().any(|e| e.range.as_deref().is_some_and(|r| r.starts_with(&resumed)) && e.status == Some(206)),
        "the cut range resumed at {resumed}: {gets:?}"
    );
}

#[tokio::test]
async fn permanent_faults_fail_at_once_with_a_clear_message() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    publish_bundle(&server, work.path(), KERNEL, DRIVER, 1 << 20).await;
    server.log().clear();
    server.faults().inject_suffix_times(Method::GET, ".tar.zst", Fault::AccessDenied, 100);
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let mut request = request(&server, KERNEL, DRIVER);
    request.transfer.concurrency = 1;
    let error = stage(&layout, &request).await.expect_err("403");
    let message = error.to_string();
    assert!(message.contains("403") && message.contains("AccessDenied") && message.contains(BUCKET), "{message}");
    let denied = archive_gets(&server).into_iter().filter(|e| e.status == Some(403)).count();
    assert_eq!(denied, 1, "a 403 is not retried");
    assert_nothing_published(&layout);
}

#[tokio::test]
async fn a_newer_bundle_waits_beside_a_ready_driver() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    publish_bundle(&server, work.path(), KERNEL, DRIVER, 4096).await;
    publish_bundle(&server, work.path(), KERNEL, "550.163.01", 4096).await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect("stage");
    let marker = nvidia_installer::node::ready::ReadyMarker {
        driver_version: DRIVER.into(),
        kernel_release: KERNEL.into(),
        sha256: String::new(),
        ready_at: nvidia_installer::node::ready::now_rfc3339(),
        boot_id: layout.boot_id(),
        bundle: String::new(),
        signed_by: None,
    };
    nvidia_installer::node::ready::write_marker(&layout, &marker).expect("marker");
    let newer = stage(&layout, &request(&server, KERNEL, "550.163.01")).await.expect("stage newer");
    assert!(!newer.current);
    assert_eq!(newer.held_back_by.as_deref(), Some(DRIVER));
    assert!(layout.bundle(KERNEL, "550.163.01").join("manifest.json").is_file());
    assert_eq!(std::fs::read_link(layout.current()).expect("current"), Path::new("cache").join(KERNEL).join(DRIVER));
}

#[tokio::test]
async fn a_trickling_server_is_cut_off_retried_and_named_and_the_lock_is_released() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    publish_bundle(&server, work.path(), KERNEL, DRIVER, 1 << 20).await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    // A few kilobytes a second: every read makes progress, no part ever completes in time.
    server.set_bandwidth_limit(Some(4 * 1024));
    let mut slow = request(&server, KERNEL, DRIVER);
    slow.transfer.stall_timeout = std::time::Duration::from_millis(400);
    slow.transfer.max_attempts = 2;
    let error = stage(&layout, &slow).await.expect_err("stalls");
    let message = error.to_string();
    let key = nvidia_installer::s3::BundleKeys::new(GARDENLINUX, KERNEL, DRIVER).expect("valid names").archive;
    assert!(message.contains(&format!("s3://{BUCKET}/{key}")), "{message}");
    assert!(message.contains("gave up after 2 attempts: stalled"), "{message}");
    assert!(message.contains("bytes of this part received"), "{message}");
    assert_nothing_published(&layout);
    // The host lock went with the failed stage: the next one runs (and, at full speed, succeeds).
    server.set_bandwidth_limit(None);
    let staged = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect("stage after the stall");
    assert!(staged.current);
}
