//! `publish` against the loopback S3 server: manifest last, no overwrite without --force, and a
//! failed upload never leaves a manifest behind.

mod common;

use common::*;
use integration_tests::s3::{Fault, Method, S3Server};
use nvidia_installer::compiler::publish::publish;
use nvidia_installer::s3::{BundleKeys, Transfer};

#[tokio::test]
async fn publishes_manifest_last_and_refuses_to_overwrite() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    let dir = driver_dir(work.path(), KERNEL, DRIVER, 40 << 20);
    let out = work.path().join("bundle.tar.zst");
    pack_bundle(&dir, KERNEL, DRIVER, &out);
    let client = nvidia_installer::s3::Bucket::connect(&options(&server)).await.expect("client");
    let published = publish(&client, &out, GARDENLINUX, false, None, &Transfer::default()).await.expect("publish");
    let keys = BundleKeys::new(GARDENLINUX, KERNEL, DRIVER).expect("valid names");
    assert_eq!(published.archive_key, keys.archive);
    assert_eq!(server.get_object(BUCKET, &keys.archive).expect("archive"), std::fs::read(&out).expect("read"));
    // Large archives go up in parts; the manifest is the last object written.
    let puts: Vec<_> =
        server.log().entries().into_iter().filter(|e| e.method == Method::PUT || e.method == Method::POST).collect();
    assert!(
        puts.iter().any(|e| e.query.as_deref().is_some_and(|q| q.contains("partNumber"))),
        "multipart upload: {puts:?}"
    );
    assert!(puts.last().expect("puts").path.ends_with(".manifest.json"), "manifest last: {puts:?}");

    // The very same bundle again is a no-op; another bundle under the same keys is refused.
    let again = publish(&client, &out, GARDENLINUX, false, None, &Transfer::default()).await.expect("same bundle");
    assert!(again.unchanged);
    let other_dir = work.path().join("other");
    let other = driver_dir(&other_dir, KERNEL, DRIVER, 1 << 20);
    let other_out = work.path().join("other.tar.zst");
    pack_bundle(&other, KERNEL, DRIVER, &other_out);
    let error =
        publish(&client, &other_out, GARDENLINUX, false, None, &Transfer::default()).await.expect_err("overwrite");
    assert!(error.to_string().contains("describes another bundle") && error.to_string().contains("--force"), "{error}");
    let forced = publish(&client, &other_out, GARDENLINUX, true, None, &Transfer::default()).await.expect("forced");
    assert!(!forced.unchanged);
}

#[tokio::test]
async fn a_failed_upload_leaves_no_manifest() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    let dir = driver_dir(work.path(), KERNEL, DRIVER, 64 * 1024);
    let out = work.path().join("bundle.tar.zst");
    pack_bundle(&dir, KERNEL, DRIVER, &out);
    let client = nvidia_installer::s3::Bucket::connect(&options(&server)).await.expect("client");
    let keys = BundleKeys::new(GARDENLINUX, KERNEL, DRIVER).expect("valid names");

    server.faults().inject_suffix_times(Method::PUT, ".tar.zst", Fault::InternalError, 10);
    let error = publish(&client, &out, GARDENLINUX, false, None, &Transfer::default()).await.expect_err("upload fails");
    // The bundle goes up under its flavor's keys first.
    let flavored = BundleKeys::flavored(GARDENLINUX, KERNEL, DRIVER, "open").expect("valid names");
    assert!(error.to_string().contains(&flavored.archive), "{error}");
    assert!(server.get_object(BUCKET, &keys.manifest).is_none(), "no manifest without its archive");
    assert!(server.get_object(BUCKET, &flavored.manifest).is_none(), "no manifest without its archive");
    server.faults().clear();

    // Replacing: the old manifest goes first, so a failure leaves none rather than a stale one.
    publish(&client, &out, GARDENLINUX, false, None, &Transfer::default()).await.expect("publish");
    server.faults().inject_suffix_times(Method::PUT, ".tar.zst", Fault::InternalError, 10);
    publish(&client, &out, GARDENLINUX, true, None, &Transfer::default()).await.expect_err("forced upload fails");
    assert!(server.get_object(BUCKET, &keys.manifest).is_none());
}

#[tokio::test]
async fn a_refused_forced_publish_leaves_the_bucket_as_it_was() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    publish_bundle(&server, work.path(), KERNEL, DRIVER, 1 << 20).await;
    let keys = BundleKeys::new(GARDENLINUX, KERNEL, DRIVER).expect("valid names");
    let before = (server.get_object(BUCKET, &keys.manifest), server.get_object(BUCKET, &keys.archive));
    assert!(before.0.is_some() && before.1.is_some());

    // The same driver packed for another Garden Linux version, published over it with --force.
    let other = work.path().join("other");
    let dir = driver_dir(&other, KERNEL, DRIVER, 1 << 20);
    let info = nvidia_installer::bundle::pack::BundleInfo {
        driver_version: DRIVER.to_owned(),
        kernel_release: KERNEL.to_owned(),
        flavor: "open".to_owned(),
        gardenlinux_version: Some("1592.9".to_owned()),
    };
    let manifest = nvidia_installer::bundle::pack::describe(&dir, &info).expect("describe");
    let out = other.join("bundle.tar.zst");
    nvidia_installer::bundle::pack::pack(&dir, &manifest, &out, 3).expect("pack");
    let bucket = nvidia_installer::s3::Bucket::connect(&options(&server)).await.expect("bucket");
    let requests = server.log().entries().len();
    let error = publish(&bucket, &out, GARDENLINUX, true, None, &Transfer::default()).await.expect_err("refused");
    assert!(error.to_string().contains("packed for Garden Linux 1592.9, not 1877.3"), "{error}");
    assert_eq!(server.log().entries().len(), requests, "the bucket was not asked anything");
    assert_eq!((server.get_object(BUCKET, &keys.manifest), server.get_object(BUCKET, &keys.archive)), before);
}

#[tokio::test]
async fn a_bundle_that_would_not_stage_is_not_published_even_with_force() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    publish_bundle(&server, work.path(), KERNEL, DRIVER, 256 << 10).await;
    let keys = BundleKeys::new(GARDENLINUX, KERNEL, DRIVER).expect("valid names");
    let before = server.get_object(BUCKET, &keys.manifest);

    // Its manifest lists a digest its nvidia-smi does not have.
    let dir = driver_dir(&work.path().join("bad"), KERNEL, DRIVER, 256 << 10);
    let info = nvidia_installer::bundle::pack::BundleInfo {
        driver_version: DRIVER.to_owned(),
        kernel_release: KERNEL.to_owned(),
        flavor: "open".to_owned(),
        gardenlinux_version: Some(GARDENLINUX.to_owned()),
    };
    let mut manifest = nvidia_installer::bundle::pack::describe(&dir, &info).expect("describe");
    manifest.files.get_mut("bin/nvidia-smi").expect("smi").sha256 = "0".repeat(64);
    let out = work.path().join("bad.tar.zst");
    nvidia_installer::bundle::pack::pack(&dir, &manifest, &out, 3).expect("pack");

    let bucket = nvidia_installer::s3::Bucket::connect(&options(&server)).await.expect("bucket");
    let requests = server.log().entries().len();
    let error = publish(&bucket, &out, GARDENLINUX, true, None, &Transfer::default()).await.expect_err("refused");
    assert!(error.to_string().contains("bin/nvidia-smi") && error.to_string().contains("sha256 mismatch"), "{error}");
    assert_eq!(server.log().entries().len(), requests, "the bucket was not asked anything");
    assert_eq!(server.get_object(BUCKET, &keys.manifest), before, "the live bundle stays");
    let scratch: Vec<_> = std::fs::read_dir(work.path())
        .expect("work")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".verify-"))
        .collect();
    assert!(scratch.is_empty(), "the scratch directory is gone");
}
