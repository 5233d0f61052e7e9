//! Signed bundles: `publish` signs each manifest (signify's format) before writing it; with trusted
//! keys, `stage` refuses before extracting anything a bundle that is unsigned, signed by another
//! key, or whose manifest changed after signing, naming bucket, key and key id. The signatures
//! are checked by hand with the independent `signify-openbsd`, and its signatures by the installer.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use integration_tests::s3::S3Server;
use nvidia_installer::bundle::signature::{self, PublicKey, SecretKey};
use nvidia_installer::node::stage::{Trust, stage};
use nvidia_installer::s3::BundleKeys;

/// A key pair made by `signify-openbsd -G -n`: (secret key path, public key file text).
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let (public, secret) = (dir.join(format!("{name}.pub")), dir.join(format!("{name}.sec")));
    let status = Command::new("signify-openbsd")
        .args(["-G", "-n", "-c", name, "-p"])
        .arg(&public)
        .arg("-s")
        .arg(&secret)
        .status()
        .expect("signify-openbsd (scripts/test-deps installs it)");
    assert!(status.success());
    (secret, std::fs::read_to_string(public).expect("public key"))
}

fn trust(public: &str, allow_unsigned: bool) -> Option<Trust> {
    Some(Trust { keys: vec![PublicKey::parse(public).expect("public key")], allow_unsigned })
}

/// Pack the driver into `work` (once; later calls publish the same bundle) and publish it.
async fn publish_signed(server: &S3Server, work: &Path, key: Option<&Path>) {
    let out = work.join("bundle.tar.zst");
    if !out.exists() {
        let dir = driver_dir(work, KERNEL, DRIVER, 128 << 10);
        pack_bundle(&dir, KERNEL, DRIVER, &out);
    }
    let secret = key.map(|k| SecretKey::read(k).expect("secret key"));
    let bucket = nvidia_installer::s3::Bucket::connect(&options(server)).await.expect("bucket");
    nvidia_installer::compiler::publish::publish(
        &bucket,
        &out,
        GARDENLINUX,
        false,
        secret.as_ref(),
        &Default::default(),
    )
    .await
    .expect("publish");
}

#[tokio::test]
async fn signatures_check_both_ways_with_the_independent_tool() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    let (secret, public) = keygen(work.path(), "nvidia-bundles");
    publish_signed(&server, work.path(), Some(&secret)).await;
    let keys = BundleKeys::new(GARDENLINUX, KERNEL, DRIVER).expect("keys");
    let flavored = BundleKeys::flavored(GARDENLINUX, KERNEL, DRIVER, "open").expect("keys");
    for manifest_key in [&keys.manifest, &flavored.manifest] {
        let manifest = work.path().join("manifest.json");
        let sig = work.path().join("manifest.json.sig");
        std::fs::write(&manifest, server.get_object(BUCKET, manifest_key).expect("manifest")).expect("write");
        std::fs::write(&sig, server.get_object(BUCKET, &signature::key_of(manifest_key)).expect("signature"))
            .expect("write");
        // The project's signature, checked by signify.
        let output = Command::new("signify-openbsd")
            .args(["-V", "-p"])
            .arg(work.path().join("nvidia-bundles.pub"))
            .arg("-m")
            .arg(&manifest)
            .arg("-x")
            .arg(&sig)
            .output()
            .expect("signify");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        // signify's signature, checked by the project.
        let theirs = work.path().join("theirs.sig");
        let status = Command::new("signify-openbsd")
            .args(["-S", "-s"])
            .arg(&secret)
            .arg("-m")
            .arg(&manifest)
            .arg("-x")
            .arg(&theirs)
            .status()
            .expect("signify");
        assert!(status.success());
        let key = PublicKey::parse(&public).expect("public");
        let text = std::fs::read_to_string(&theirs).expect("sig");
        assert_eq!(
            signature::verify(&[key], &text, &std::fs::read(&manifest).expect("manifest")),
            Ok(signature::signer(&text).expect("signer"))
        );
    }
}

#[tokio::test]
async fn only_bundles_signed_by_a_trusted_key_are_staged() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    let (secret, public) = keygen(work.path(), "release");
    let (_, stranger) = keygen(work.path(), "stranger");
    publish_signed(&server, work.path(), Some(&secret)).await;
    let key_id = PublicKey::parse(&public).expect("public").id.to_string();

    // Trusted: staged, and the key is named.
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let mut request = request(&server, KERNEL, DRIVER);
    request.trust = trust(&public, false);
    let staged = stage(&layout, &request).await.expect("signed by a trusted key");
    assert_eq!(staged.signed_by.map(|k| k.to_string()), Some(key_id.clone()));
    // A cache hit checks the signature kept beside the manifest.
    let again = stage(&layout, &request).await.expect("cache hit");
    assert_eq!((again.downloaded_from, again.signed_by.map(|k| k.to_string())), (None, Some(key_id.clone())));

    // Rotating: the new key beside the old one still takes it.
    let mut rotating = request.clone();
    rotating.trust = Some(Trust {
        keys: vec![PublicKey::parse(&stranger).expect("key"), PublicKey::parse(&public).expect("key")],
        allow_unsigned: false,
    });
    let other_host = tempfile::tempdir().expect("host");
    stage(&host(other_host.path()), &rotating).await.expect("one of two trusted keys");

    // Another key only: refused before anything is extracted, naming bucket, key and key id.
    let refused_host = tempfile::tempdir().expect("host");
    let refused_layout = host(refused_host.path());
    let mut strangers = request.clone();
    strangers.trust = trust(&stranger, false);
    let error = stage(&refused_layout, &strangers).await.expect_err("untrusted key").to_string();
    // (The request names no flavor: the plain keys.)
    let keys = BundleKeys::new(GARDENLINUX, KERNEL, DRIVER).expect("keys");
    assert!(
        error.contains(&format!("s3://{BUCKET}/{}", keys.manifest))
            && error.contains(&key_id)
            && error.contains("not trusted"),
        "{error}"
    );
    assert!(
        !refused_layout.staging().exists()
            || std::fs::read_dir(refused_layout.staging()).expect("staging").count() == 0
    );
    assert!(!refused_layout.bundle(KERNEL, DRIVER).exists());

    // The manifest changed after signing (a bucket writer without the key): refused.
    for key in [&keys.manifest, &BundleKeys::flavored(GARDENLINUX, KERNEL, DRIVER, "open").expect("keys").manifest] {
        let text = String::from_utf8(server.get_object(BUCKET, key).expect("manifest")).expect("utf8");
        server.put_object(BUCKET, key, text.replace("\"open\"", "\"proprietary\""));
    }
    let fresh = tempfile::tempdir().expect("host");
    let error = stage(&host(fresh.path()), &request).await.expect_err("changed").to_string();
    assert!(error.contains("changed after it was signed"), "{error}");
}

#[tokio::test]
async fn unsigned_and_legacy_bundles_need_explicit_permission_once_keys_are_trusted() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    let (_, public) = keygen(work.path(), "release");
    publish_signed(&server, work.path(), None).await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let mut request = request(&server, KERNEL, DRIVER);
    request.trust = trust(&public, false);
    let error = stage(&layout, &request).await.expect_err("unsigned").to_string();
    assert!(error.contains("not signed") && error.contains(".manifest.json.sig"), "{error}");
    request.trust = trust(&public, true);
    let staged = stage(&layout, &request).await.expect("unsigned allowed");
    assert_eq!(staged.signed_by, None);

    // The original system's layout carries no signature at all.
    let legacy = tempfile::tempdir().expect("legacy");
    let tarball = legacy.path().join("legacy.tar.gz");
    let status = Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(driver_dir(legacy.path(), KERNEL, "550.54.14", 1024))
        .args(["bin", "lib"])
        .status()
        .expect("tar");
    assert!(status.success());
    server.put_file(BUCKET, &format!("gardenlinux-{GARDENLINUX}-nvidia-550.54.14.tar.gz"), &tarball);
    let mut legacy_request = request.clone();
    legacy_request.driver_version = "550.54.14".into();
    legacy_request.trust = trust(&public, false);
    let other = tempfile::tempdir().expect("host");
    let error = stage(&host(other.path()), &legacy_request).await.expect_err("legacy").to_string();
    assert!(error.contains("carry no signature") && error.contains("allowUnsigned"), "{error}");
}

/// Keys turned on for bundles already staged: the bucket's new signature is checked against the
/// cached bytes, and the bundle in use stays where it is (no deletion, no download).
#[tokio::test]
async fn trusting_a_key_later_keeps_the_cached_bundle_when_its_bytes_are_the_signed_ones() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    let (secret, public) = keygen(work.path(), "release");
    publish_signed(&server, work.path(), None).await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    stage(&layout, &request(&server, KERNEL, DRIVER)).await.expect("staged unsigned, no keys");
    let inode = std::fs::metadata(layout.bundle(KERNEL, DRIVER).join("bin/nvidia-smi"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("inode");

    // The same bundle republished with the key: only its signatures are written.
    publish_signed(&server, work.path(), Some(&secret)).await;
    server.log().clear();
    let mut trusted = request(&server, KERNEL, DRIVER);
    trusted.trust = trust(&public, false);
    let staged = stage(&layout, &trusted).await.expect("signed now");
    assert_eq!(staged.downloaded_from, None, "the cached bundle stays");
    assert!(staged.signed_by.is_some());
    let archive_gets = server
        .log()
        .entries()
        .into_iter()
        .filter(|e| e.path.ends_with(".tar.zst") && e.method == integration_tests::s3::Method::GET)
        .count();
    assert_eq!(archive_gets, 0, "no archive downloaded");
    let still = std::fs::metadata(layout.bundle(KERNEL, DRIVER).join("bin/nvidia-smi"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("inode");
    assert_eq!(still, inode, "the files in use were not replaced");
}
