//! What someone who could write the host cache, the ready marker or a bundle's names could make
//! the node do: a modified or added file is staged again from the bucket before anything runs it,
//! a marker that is not a small regular file is reported as corrupt (and never blocks `wait`),
//! module paths must stay among the verified files, and names never become keys or paths
//! outside the rule.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use integration_tests::s3::S3Server;
use nvidia_installer::bundle::manifest::Manifest;
use nvidia_installer::bundle::pack::{self, BundleInfo};
use nvidia_installer::node::ready::{self, Readiness};
use nvidia_installer::node::stage::stage;

#[tokio::test]
async fn a_modified_or_added_file_in_the_cache_is_staged_again_from_the_bucket() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    publish_bundle(&server, work.path(), KERNEL, DRIVER, 1 << 20).await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let first = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect("stage");
    let bundle = first.bundle.clone();
    let smi = bundle.join("bin/nvidia-smi");
    let original = std::fs::read(&smi).expect("smi");

    // Same size, other bytes: what a size check alone would miss.
    let mut evil = original.clone();
    evil[original.len() - 2] ^= 0x20;
    std::fs::write(&smi, &evil).expect("overwrite");
    let again = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect("stage again");
    assert!(again.downloaded_from.is_some(), "a modified nvidia-smi must not be a cache hit");
    assert_eq!(std::fs::read(&smi).expect("smi"), original, "the bucket's nvidia-smi is back");

    // A module and NVML, the same.
    for path in ["modules/nvidia.ko", &format!("lib/libnvidia-ml.so.{DRIVER}")] {
        let file = bundle.join(path);
        let mut bytes = std::fs::read(&file).expect("read");
        bytes[0] ^= 1;
        std::fs::write(&file, bytes).expect("overwrite");
        let again = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect("stage again");
        assert!(again.downloaded_from.is_some(), "{path} modified must not be a cache hit");
    }

    // A file the manifest does not list, where LD_LIBRARY_PATH would find it.
    std::fs::write(bundle.join("lib/libc.so.6"), b"not libc").expect("plant");
    let again = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect("stage again");
    assert!(again.downloaded_from.is_some(), "an added library must not be a cache hit");
    assert!(!bundle.join("lib/libc.so.6").exists(), "the planted file is gone");

    // `lib/` replaced by a link to a copy of it with a library planted beside the real ones: every
    // listed file is still found, by path, with its digest; the link is what gives it away.
    let planted = host_dir.path().join("planted");
    std::fs::create_dir_all(&planted).expect("planted");
    for entry in std::fs::read_dir(bundle.join("lib")).expect("lib").flatten() {
        let to = planted.join(entry.file_name());
        match std::fs::read_link(entry.path()) {
            Ok(target) => std::os::unix::fs::symlink(target, to).expect("link"),
            Err(_) => std::fs::copy(entry.path(), to).map(|_| ()).expect("copy"),
        }
    }
    std::fs::write(planted.join("libc.so.6"), b"not libc").expect("plant");
    std::fs::rename(bundle.join("lib"), host_dir.path().join("lib-moved")).expect("move lib");
    std::os::unix::fs::symlink(&planted, bundle.join("lib")).expect("link lib");
    let again = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect("stage again");
    assert!(again.downloaded_from.is_some(), "a directory replaced by a link must not be a cache hit");
    assert!(bundle.join("lib").symlink_metadata().expect("lib").is_dir(), "a real lib/ is back");

    // Untouched, it is a cache hit without a request.
    let gets = server.log().entries().len();
    let hit = stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect("cache hit");
    assert_eq!(hit.downloaded_from, None);
    assert_eq!(server.log().entries().len(), gets, "a cache hit asks the bucket nothing");
}

#[test]
fn a_marker_that_is_not_a_small_regular_file_is_corrupt_and_never_blocks() {
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    std::fs::create_dir_all(layout.root()).expect("root");
    let corrupt = |layout: &nvidia_contract::Layout| match ready::check(layout, None) {
        Readiness::NotReady(reason) => reason,
        Readiness::Ready(marker) => panic!("ready with {marker:?}"),
    };

    nix::unistd::mkfifo(&layout.ready(), nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("fifo");
    let reason = corrupt(&layout);
    assert!(reason.starts_with(&format!("corrupt ready marker at {}", layout.ready().display())), "{reason}");
    assert!(reason.contains("not a regular file"), "{reason}");
    // The wait binary returns by its timeout with that reason (it used to hang on the FIFO).
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_nvidia-installer"))
        .args(["wait", "--timeout", "1s", "--host-root"])
        .arg(host_dir.path())
        .output()
        .expect("wait runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("corrupt ready marker"), "{output:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "wait returned long after its timeout");
    std::fs::remove_file(layout.ready()).expect("rm");

    // 200 MB (sparse): refused by its size, not read.
    let big = std::fs::File::create(layout.ready()).expect("create");
    big.set_len(200 << 20).expect("grow");
    assert!(corrupt(&layout).contains("more than"));
    std::fs::remove_file(layout.ready()).expect("rm");

    // A link to a marker elsewhere is not followed.
    let elsewhere = host_dir.path().join("elsewhere");
    std::fs::write(&elsewhere, br#"{"driverVersion":"1","kernelRelease":"k","sha256":"","readyAt":""}"#)
        .expect("write");
    std::os::unix::fs::symlink(&elsewhere, layout.ready()).expect("link");
    assert!(corrupt(&layout).contains("symbolic link"));
    std::fs::remove_file(layout.ready()).expect("rm");

    // Bad content.
    std::fs::write(layout.ready(), b"{not json").expect("write");
    assert!(corrupt(&layout).starts_with("corrupt ready marker"));
    let status = Command::new(env!("CARGO_BIN_EXE_nvidia-installer"))
        .args(["status", "--host-root"])
        .arg(host_dir.path())
        .output()
        .expect("status runs");
    assert!(String::from_utf8_lossy(&status.stdout).contains("corrupt ready marker"), "{status:?}");
}

#[test]
fn module_paths_must_stay_among_the_verified_files() {
    let base = serde_json::json!({
        "schemaVersion": 1, "driverVersion": "1.0", "kernelRelease": "k", "flavor": "open",
        "files": {"modules/nvidia.ko": {"sha256": "00", "size": 1}},
    });
    let with_module = |path: &str, name: &str| {
        let mut manifest = base.clone();
        manifest["modules"] = serde_json::json!([{"name": name, "path": path, "vermagic": "k"}]);
        Manifest::parse(&serde_json::to_vec(&manifest).expect("json"), "test")
    };
    assert!(with_module("modules/nvidia.ko", "nvidia").is_ok());
    for (path, name, why) in [
        ("/lib/modules/k/evil.ko", "nvidia", "absolute"),
        ("modules/../../evil.ko", "nvidia", "'..'"),
        ("bin/nvidia.ko", "nvidia", "under modules/"),
        ("modules/other.ko", "nvidia", "not among the bundle's verified files"),
        ("modules/nvidia.ko", "nvidia; rm", "not a module name"),
    ] {
        let error = with_module(path, name).expect_err(path).to_string();
        assert!(error.contains(why), "{path}: {error}");
    }
}

#[test]
fn names_outside_the_rule_never_become_keys_or_paths() {
    let work = tempfile::tempdir().expect("work");
    let dir = driver_dir(work.path(), KERNEL, DRIVER, 1024);
    let info = |driver: &str, kernel: &str, gardenlinux: &str, flavor: &str| BundleInfo {
        driver_version: driver.to_owned(),
        kernel_release: kernel.to_owned(),
        flavor: flavor.to_owned(),
        gardenlinux_version: Some(gardenlinux.to_owned()),
    };
    assert!(pack::describe(&dir, &info(DRIVER, KERNEL, GARDENLINUX, "open")).is_ok());
    for (bad, what) in [
        (info("../535", KERNEL, GARDENLINUX, "open"), "driver version"),
        (info(DRIVER, KERNEL, "1877.0/../other", "open"), "Garden Linux version"),
        (info(DRIVER, KERNEL, "1877 3", "open"), "Garden Linux version"),
        (info(DRIVER, KERNEL, GARDENLINUX, "../open"), "flavor"),
    ] {
        let error = pack::describe(&dir, &bad).expect_err(what).to_string();
        assert!(error.contains(what), "{error}");
    }
    // The command line says the same before it touches anything.
    let output = Command::new(env!("CARGO_BIN_EXE_nvidia-installer"))
        .args(["stage", "--driver-version", "535", "--gardenlinux-version", "../x", "--kernel-release", KERNEL])
        .args(["--bucket", "b", "--host-root"])
        .arg(work.path())
        .output()
        .expect("stage runs");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("Garden Linux version \"../x\" is not valid"),
        "{output:?}"
    );
}
