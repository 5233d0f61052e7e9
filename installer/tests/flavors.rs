//! Mixed GPU generations: a bucket holds both flavors of one driver version side by side, a
//! Turing node (T4) takes the open modules, a Volta node (V100) and a mixed node the proprietary
//! ones, and a node whose GPUs the published flavor cannot drive is refused before anything is
//! downloaded or loaded, with the GPU named.

mod common;

use std::path::Path;

use common::*;
use integration_tests::kernel::SimKernel;
use integration_tests::s3::{Method, S3Server};
use nvidia_installer::Error;
use nvidia_installer::node::api::Reporter;
use nvidia_installer::node::install::{InstallRequest, install};
use nvidia_installer::node::stage::stage;

const T4: (&str, u16) = ("0000:00:04.0", 0x1eb8);
const V100: (&str, u16) = ("0000:00:05.0", 0x1db4);

/// A host root whose sysfs shows these NVIDIA 3D controllers.
fn gpu_host(dir: &Path, gpus: &[(&str, u16)]) -> nvidia_contract::Layout {
    let layout = host(dir);
    for (address, device) in gpus {
        let path = dir.join("sys/bus/pci/devices").join(address);
        std::fs::create_dir_all(&path).expect("sysfs");
        std::fs::write(path.join("vendor"), "0x10de\n").expect("vendor");
        std::fs::write(path.join("device"), format!("0x{device:04x}\n")).expect("device");
        std::fs::write(path.join("class"), "0x030200\n").expect("class");
    }
    layout
}

/// Pack and publish the driver's bundle in `flavor`.
async fn publish_flavor(server: &S3Server, work: &Path, flavor: &str) {
    let dir = driver_dir(&work.join(flavor), KERNEL, DRIVER, 128 << 10);
    let info = nvidia_installer::bundle::pack::BundleInfo {
        driver_version: DRIVER.to_owned(),
        kernel_release: KERNEL.to_owned(),
        flavor: flavor.to_owned(),
        gardenlinux_version: Some(GARDENLINUX.to_owned()),
    };
    let manifest = nvidia_installer::bundle::pack::describe(&dir, &info).expect("describe");
    let out = work.join(format!("{flavor}.tar.zst"));
    nvidia_installer::bundle::pack::pack(&dir, &manifest, &out, 3).expect("pack");
    let bucket = nvidia_installer::s3::Bucket::connect(&options(server)).await.expect("bucket");
    nvidia_installer::compiler::publish::publish(&bucket, &out, GARDENLINUX, false, None, &Default::default())
        .await
        .expect("publish");
}

/// The node's flavors, as the install command works them out from its GPUs.
fn request_for(server: &S3Server, layout: &nvidia_contract::Layout) -> nvidia_installer::node::stage::StageRequest {
    let mut stage = request(server, KERNEL, DRIVER);
    let gpus = nvidia_installer::node::gpus::nvidia_gpus(layout);
    stage.flavors = nvidia_installer::node::gpus::flavors_for(&gpus, nvidia_installer::compiler::compile::Flavor::Auto)
        .expect("flavors");
    stage
}

#[tokio::test]
async fn each_node_takes_the_flavor_that_drives_its_gpus() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    publish_flavor(&server, work.path(), "open").await;
    publish_flavor(&server, work.path(), "proprietary").await;
    let keys = nvidia_installer::s3::BundleKeys::new(GARDENLINUX, KERNEL, DRIVER).expect("keys");
    let plain = server.get_object(BUCKET, &keys.manifest).expect("the plain keys");
    assert!(String::from_utf8_lossy(&plain).contains("\"flavor\": \"open\""), "the first flavor keeps the plain keys");

    for (gpus, flavor) in [(&[T4][..], "open"), (&[V100][..], "proprietary"), (&[T4, V100][..], "proprietary")] {
        let dir = tempfile::tempdir().expect("host");
        let layout = gpu_host(dir.path(), gpus);
        let staged = stage(&layout, &request_for(&server, &layout)).await.expect("stage");
        assert_eq!(staged.manifest.flavor, flavor, "{gpus:?}");
        assert!(staged.downloaded_from.as_deref().is_some_and(|k| k.contains(&format!("/{flavor}/"))), "{staged:?}");
        // And install loads it.
        let kernel = SimKernel::new(dir.path());
        let request = InstallRequest {
            stage: request_for(&server, &layout),
            modules: vec!["nvidia".into()],
            compile: None,
            upgrade: Default::default(),
        };
        install(&layout, &request, &kernel, &Reporter::Log).await.expect("install");
    }
}

#[tokio::test]
async fn a_gpu_the_published_flavor_cannot_drive_is_named_before_anything_is_loaded() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    publish_flavor(&server, work.path(), "open").await;
    let dir = tempfile::tempdir().expect("host");
    let layout = gpu_host(dir.path(), &[V100]);
    server.log().clear();
    let kernel = SimKernel::new(dir.path());
    let request = InstallRequest {
        stage: request_for(&server, &layout),
        modules: vec!["nvidia".into()],
        compile: None,
        upgrade: Default::default(),
    };
    let error = install(&layout, &request, &kernel, &Reporter::Log).await.expect_err("no flavor for a V100");
    assert!(matches!(error, Error::Flavor { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("proprietary") && message.contains("holds the open modules"), "{message}");
    assert!(kernel.calls().is_empty(), "nothing loaded");
    let archive_gets =
        server.log().matching(&Method::GET, ".tar.zst").into_iter().filter(|e| !e.path.ends_with(".json")).count();
    assert_eq!(archive_gets, 0, "nothing downloaded");

    // A bundle of the wrong flavor that is already in the cache (staged when nothing was known of
    // the GPUs) is refused too, naming the GPU.
    let mut any = request_for(&server, &layout);
    any.flavors = None;
    stage(&layout, &any).await.expect("stage without knowing the GPUs");
    let error = install(&layout, &request, &kernel, &Reporter::Log).await.expect_err("still no flavor for a V100");
    let message = error.to_string();
    assert!(message.contains("proprietary"), "{message}");
    assert!(kernel.calls().is_empty(), "nothing loaded");
}
