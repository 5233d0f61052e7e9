//! Buckets outside us-east-1, as AWS serves them: the loopback S3 server answers a request signed
//! for another region than the bucket's with `301 PermanentRedirect` and `x-amz-bucket-region`.
//! With the original system's Secret keys only (no region), publish, stage and install find the
//! bucket's region; a wrong configured region is followed once with a warning; an error from the
//! wrong region names the right one.

mod common;

use std::process::Command;

use common::*;
use integration_tests::s3::{Method, S3Server};
use nvidia_installer::node::api::Reporter;
use nvidia_installer::node::install::{InstallRequest, install};
use nvidia_installer::node::stage::stage;

const REGION: &str = "eu-central-1";

fn without_region(server: &S3Server) -> nvidia_installer::s3::S3Options {
    nvidia_installer::s3::S3Options { region: None, ..options(server) }
}

/// The installer as the chart runs it with the seed's Secret: keys, bucket, endpoint; no region.
fn seed_secret_only(server: &S3Server, host_root: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nvidia-installer"));
    command
        .envs(server.env().into_iter().filter(|(name, _)| *name != "AWS_REGION"))
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("NVIDIA_INSTALLER_HOST_ROOT", host_root)
        .env("NVIDIA_INSTALLER_BUCKET", BUCKET)
        .env("GARDENLINUX_VERSION", GARDENLINUX)
        .env("KERNEL_RELEASE", KERNEL)
        .env("RUST_LOG", "info");
    command
}

#[tokio::test]
async fn publish_stage_and_install_find_a_bucket_in_another_region() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    server.set_bucket_region(BUCKET, REGION);
    let work = tempfile::tempdir().expect("work");

    // publish, as the compiler instance does, with no region: found, then used.
    let dir = driver_dir(work.path(), KERNEL, DRIVER, 256 << 10);
    let out = work.path().join("bundle.tar.zst");
    pack_bundle(&dir, KERNEL, DRIVER, &out);
    let output =
        seed_secret_only(&server, work.path()).args(["publish", "--bundle"]).arg(&out).output().expect("publish");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("found the bucket's region") && stderr.contains(REGION), "{stderr}");
    let redirects = server.log().entries().iter().filter(|e| e.status == Some(301)).count();
    assert!(redirects <= 1, "at most the one HeadBucket went to the default region: {redirects}");

    // stage, by the library and by the binary.
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let mut request = request(&server, KERNEL, DRIVER);
    request.s3 = without_region(&server);
    stage(&layout, &request).await.expect("stage without a region");
    let other = tempfile::tempdir().expect("host");
    host(other.path());
    let output =
        seed_secret_only(&server, other.path()).args(["stage", "--driver-version", DRIVER]).output().expect("stage");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    // install (through the kernel seam).
    let third = tempfile::tempdir().expect("host");
    let layout = host(third.path());
    let kernel = integration_tests::kernel::SimKernel::new(third.path());
    let request = InstallRequest {
        stage: request,
        modules: vec!["nvidia".to_owned()],
        compile: None,
        upgrade: Default::default(),
    };
    install(&layout, &request, &kernel, &Reporter::Log).await.expect("install without a region");

    // A configured region that is wrong is followed once, with a warning naming both.
    let fourth = tempfile::tempdir().expect("host");
    host(fourth.path());
    let output = seed_secret_only(&server, fourth.path())
        .env("AWS_REGION", "us-east-1")
        .args(["stage", "--driver-version", DRIVER])
        .output()
        .expect("stage");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("another region than configured") && stderr.contains("us-east-1") && stderr.contains(REGION),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_error_from_the_wrong_region_names_the_buckets_region() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    server.set_bucket_region(BUCKET, REGION);
    // A client that was not told, bypassing the discovery (as any S3 client without it).
    let config =
        integration_tests::s3::client_config(&server).region(aws_sdk_s3::config::Region::new("us-east-1")).build();
    let client = aws_sdk_s3::Client::from_conf(config);
    let error = nvidia_installer::s3::get_small(&client, BUCKET, "some/key", 1 << 20, &Default::default())
        .await
        .expect_err("wrong region");
    let message = error.to_string();
    assert!(message.contains("301") && message.contains(&format!("the bucket is in region {REGION}")), "{message}");
    assert!(server.log().matching(&Method::HEAD, "some/key").iter().all(|e| e.status == Some(301)));
}
