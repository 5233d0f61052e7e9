//! `install` through the kernel seam: exactly what is asked of the kernel, in which order, and
//! what the node is left with on success and on every kind of failure.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use integration_tests::s3::S3Server;
use nvidia_installer::Error;
use nvidia_installer::node::api::Reporter;
use nvidia_installer::node::install::{InstallRequest, dry_run, install};
use nvidia_installer::node::ready::{self, Readiness};

fn modules(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

async fn setup() -> (S3Server, tempfile::TempDir) {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    publish_bundle(&server, work.path(), KERNEL, DRIVER, 64 * 1024).await;
    (server, work)
}

#[tokio::test]
async fn loads_in_order_makes_device_nodes_runs_smi_and_marks_ready() {
    let (server, _work) = setup().await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let kernel = SimKernel::new(host_dir.path());
    let reports = Arc::new(Mutex::new(Vec::new()));
    let request = InstallRequest {
        stage: request(&server, KERNEL, DRIVER),
        modules: modules(&["nvidia-modeset", "nvidia-uvm", "nvidia"]),
        compile: None,
        upgrade: Default::default(),
    };
    let marker = install(&layout, &request, &kernel, &Reporter::Record(reports.clone())).await.expect("install");
    assert_eq!(marker.driver_version, DRIVER);
    assert_eq!(marker.boot_id, layout.boot_id());
    let bundle = format!("/opt/nvidia-installer/cache/{KERNEL}/{DRIVER}");
    assert_eq!(
        kernel.calls(),
        vec![
            Call::Load("nvidia".into()),
            Call::Load("nvidia_uvm".into()),
            Call::Load("nvidia_modeset".into()),
            Call::Mknod("dev/nvidia0".into(), 195, 0),
            Call::Mknod("dev/nvidia1".into(), 195, 1),
            Call::Mknod("dev/nvidiactl".into(), 195, 255),
            Call::Mknod("dev/nvidia-modeset".into(), 195, 254),
            Call::Mknod("dev/nvidia-uvm".into(), 511, 0),
            Call::Mknod("dev/nvidia-uvm-tools".into(), 511, 1),
            Call::Run(format!("{bundle}/bin/nvidia-smi")),
        ]
    );
    assert!(matches!(ready::check(&layout, Some(DRIVER)), Readiness::Ready(_)));
    let reports = reports.lock().expect("reports").clone();
    assert_eq!(reports.len(), 1);
    assert!(reports[0].ready && reports[0].reason == "DriverReady");
    assert_eq!(reports[0].label_patch()["metadata"]["labels"]["nvidia-installer.gardenlinux.io/driver-ready"], "true");

    // Idempotent: the same version already loaded loads nothing again.
    let again = SimKernel::new(host_dir.path());
    install(&layout, &request, &again, &Reporter::Log).await.expect("install again");
    assert!(again.calls().iter().all(|c| !matches!(c, Call::Load(_))), "{:?}", again.calls());
}

#[tokio::test]
async fn no_gpu_unloads_what_was_loaded_and_leaves_no_marker() {
    let (server, _work) = setup().await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let mut kernel = SimKernel::new(host_dir.path());
    kernel.fail = Some(("nvidia_uvm".into(), nix::libc::ENODEV));
    let reports = Arc::new(Mutex::new(Vec::new()));
    let request = InstallRequest {
        stage: request(&server, KERNEL, DRIVER),
        modules: modules(&["nvidia", "nvidia-uvm", "nvidia-modeset"]),
        compile: None,
        upgrade: Default::default(),
    };
    let error = install(&layout, &request, &kernel, &Reporter::Record(reports.clone())).await.expect_err("no gpu");
    let message = error.to_string();
    assert!(message.contains("nvidia-uvm") && message.contains("No NVIDIA GPU"), "{message}");
    assert_eq!(
        kernel.calls(),
        vec![Call::Load("nvidia".into()), Call::Load("nvidia_uvm".into()), Call::Unload("nvidia".into())]
    );
    assert!(ready::read_marker(&layout).is_none());
    match ready::check(&layout, None) {
        Readiness::NotReady(reason) => {
            assert!(reason.contains("installer failed") && reason.contains("No NVIDIA GPU"), "{reason}")
        }
        Readiness::Ready(_) => panic!("ready after a failure"),
    }
    let reports = reports.lock().expect("reports").clone();
    assert!(!reports[0].ready && reports[0].reason == "DriverInstallFailed");
    assert_eq!(reports[0].label_patch()["metadata"]["labels"]["nvidia-installer.gardenlinux.io/driver-ready"], "false");
    let event = nvidia_installer::node::api::event("gpu-node-1", &reports[0]);
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.regarding.as_ref().and_then(|r| r.name.as_deref()), Some("gpu-node-1"));
}

#[tokio::test]
async fn a_failing_nvidia_smi_removes_the_device_nodes_and_unloads_what_was_loaded() {
    let (server, _work) = setup().await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let mut kernel = SimKernel::new(host_dir.path());
    kernel.fail = Some(("nvidia-smi".into(), 9));
    kernel.gpus = 1;
    let reports = Arc::new(Mutex::new(Vec::new()));
    let request = InstallRequest {
        stage: request(&server, KERNEL, DRIVER),
        modules: modules(&["nvidia", "nvidia-uvm"]),
        compile: None,
        upgrade: Default::default(),
    };
    let error = install(&layout, &request, &kernel, &Reporter::Record(reports.clone())).await.expect_err("smi fails");
    let message = error.to_string();
    assert!(message.contains("nvidia-smi") && message.contains("couldn't communicate"), "{message}");
    let smi = format!("/opt/nvidia-installer/cache/{KERNEL}/{DRIVER}/bin/nvidia-smi");
    assert_eq!(
        kernel.calls(),
        vec![
            Call::Load("nvidia".into()),
            Call::Load("nvidia_uvm".into()),
            Call::Mknod("dev/nvidia0".into(), 195, 0),
            Call::Mknod("dev/nvidiactl".into(), 195, 255),
            Call::Mknod("dev/nvidia-uvm".into(), 511, 0),
            Call::Mknod("dev/nvidia-uvm-tools".into(), 511, 1),
            Call::Run(smi),
            Call::Unload("nvidia_uvm".into()),
            Call::Unload("nvidia".into()),
        ]
    );
    for node in ["nvidia0", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"] {
        assert!(!host_dir.path().join("dev").join(node).exists(), "/dev/{node} left behind");
    }
    assert!(ready::read_marker(&layout).is_none());
    let reports = reports.lock().expect("reports").clone();
    assert!(!reports[0].ready && reports[0].reason == "DriverInstallFailed");
}

#[tokio::test]
async fn modules_loaded_before_the_run_stay_loaded_when_it_fails() {
    let (server, _work) = setup().await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let request = InstallRequest {
        stage: request(&server, KERNEL, DRIVER),
        modules: modules(&["nvidia"]),
        compile: None,
        upgrade: Default::default(),
    };
    let first = SimKernel::new(host_dir.path());
    install(&layout, &request, &first, &Reporter::Log).await.expect("first install");
    // The same driver, already loaded, and now nvidia-smi fails: nothing of the earlier run is undone.
    let mut kernel = SimKernel::new(host_dir.path());
    kernel.fail = Some(("nvidia-smi".into(), 9));
    install(&layout, &request, &kernel, &Reporter::Log).await.expect_err("smi fails");
    let calls = kernel.calls();
    assert!(calls.iter().any(|c| matches!(c, Call::Run(p) if p.ends_with("/bin/nvidia-smi"))), "{calls:?}");
    assert!(!calls.iter().any(|c| matches!(c, Call::Load(_) | Call::Unload(_))), "{calls:?}");
    assert!(std::fs::read_to_string(host_dir.path().join("proc/modules")).expect("modules").starts_with("nvidia "));
    // The device nodes were there before the run: a failure leaves them (the simulated nodes are
    // files, so this run replaced them as wrong ones; replaced is not removed).
    for node in ["nvidia0", "nvidia1", "nvidiactl"] {
        assert!(host_dir.path().join("dev").join(node).exists(), "/dev/{node} removed");
    }
    assert!(ready::read_marker(&layout).is_none());
}

#[tokio::test]
async fn another_loaded_version_is_a_clear_error_and_keeps_the_node_serving_it() {
    let (server, _work) = setup().await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    std::fs::create_dir_all(host_dir.path().join("sys/module/nvidia")).expect("sys");
    std::fs::write(host_dir.path().join("sys/module/nvidia/version"), "525.147.05\n").expect("version");
    let kernel = SimKernel::new(host_dir.path());
    let reports = Arc::new(Mutex::new(Vec::new()));
    let request = InstallRequest {
        stage: request(&server, KERNEL, DRIVER),
        modules: modules(&["nvidia"]),
        compile: None,
        upgrade: Default::default(),
    };
    let error =
        install(&layout, &request, &kernel, &Reporter::Record(reports.clone())).await.expect_err("other version");
    assert!(matches!(error, Error::OtherVersionLoaded { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("525.147.05") && message.contains(DRIVER) && message.contains("drain"), "{message}");
    assert!(kernel.calls().is_empty(), "nothing asked of the kernel: {:?}", kernel.calls());
    assert_eq!(reports.lock().expect("reports")[0].reason, "DriverUpdatePending");
}

#[tokio::test]
async fn a_module_for_another_kernel_is_refused_before_loading() {
    let (server, _work) = setup().await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    std::fs::write(host_dir.path().join("proc/sys/kernel/osrelease"), "6.1.0-99-amd64\n").expect("osrelease");
    let kernel = SimKernel::new(host_dir.path());
    // The bundle for KERNEL staged under the name of the running kernel would be a packaging
    // mistake; the vermagic check catches it.
    let mut stage = request(&server, KERNEL, DRIVER);
    stage.kernel_release = KERNEL.into();
    let staged = nvidia_installer::node::stage::stage(&layout, &stage).await.expect("stage");
    let from = staged.bundle.clone();
    let to = layout.bundle("6.1.0-99-amd64", DRIVER);
    std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
    std::fs::rename(&from, &to).expect("move");
    let mut manifest = nvidia_installer::bundle::manifest::Manifest::read(&to.join("manifest.json")).expect("manifest");
    manifest.kernel_release = "6.1.0-99-amd64".into();
    std::fs::write(to.join("manifest.json"), manifest.to_json()).expect("write");
    let mut request = InstallRequest {
        stage: request(&server, "6.1.0-99-amd64", DRIVER),
        modules: modules(&["nvidia"]),
        compile: None,
        upgrade: Default::default(),
    };
    request.stage.kernel_release = "6.1.0-99-amd64".into();
    let error = install(&layout, &request, &kernel, &Reporter::Log).await.expect_err("vermagic");
    assert!(error.to_string().contains(&format!("built for kernel {KERNEL}")), "{error}");
    assert!(kernel.calls().is_empty());
}

/// A bundle in a fresh bucket whose nvidia.ko depends on the in-tree drm module, as on Debian's
/// 6.1 kernel.
async fn publish_needing_drm() -> (S3Server, tempfile::TempDir) {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    let dir = driver_dir(work.path(), KERNEL, DRIVER, 4096);
    std::fs::write(dir.join("modules/nvidia.ko"), module_bytes("nvidia", KERNEL, "drm")).expect("module");
    let out = work.path().join("b.tar.zst");
    pack_bundle(&dir, KERNEL, DRIVER, &out);
    let client = nvidia_installer::s3::Bucket::connect(&options(&server)).await.expect("client");
    nvidia_installer::compiler::publish::publish(&client, &out, GARDENLINUX, false, None, &Default::default())
        .await
        .expect("publish");
    (server, work)
}

#[tokio::test]
async fn in_tree_dependencies_are_loaded_first_from_the_kernel() {
    let (server, _work) = publish_needing_drm().await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let drm = host_dir.path().join(format!("lib/modules/{KERNEL}/kernel/drivers/gpu/drm"));
    std::fs::create_dir_all(&drm).expect("drm dir");
    std::fs::write(drm.join("drm.ko"), module_bytes("drm", KERNEL, "drm_panel_orientation_quirks")).expect("drm");
    std::fs::write(
        drm.join("drm_panel_orientation_quirks.ko"),
        module_bytes("drm_panel_orientation_quirks", KERNEL, ""),
    )
    .expect("quirks");
    std::fs::write(
        host_dir.path().join(format!("lib/modules/{KERNEL}/modules.dep")),
        "kernel/drivers/gpu/drm/drm.ko: kernel/drivers/gpu/drm/drm_panel_orientation_quirks.ko\nkernel/drivers/gpu/drm/drm_panel_orientation_quirks.ko:\n",
    )
    .expect("modules.dep");
    let kernel = SimKernel::new(host_dir.path());
    let request = InstallRequest {
        stage: request(&server, KERNEL, DRIVER),
        modules: modules(&["nvidia"]),
        compile: None,
        upgrade: Default::default(),
    };
    // The dry run plans the same order and touches nothing.
    let plan = dry_run(&layout, &request).await.expect("dry run");
    let planned: Vec<(&str, bool)> = plan.modules.iter().map(|m| (m.name.as_str(), m.in_tree)).collect();
    assert_eq!(planned, vec![("drm_panel_orientation_quirks", true), ("drm", true), ("nvidia", false)]);
    assert_eq!(plan.modules[1].path, drm.join("drm.ko"));
    assert!(kernel.calls().is_empty());
    install(&layout, &request, &kernel, &Reporter::Log).await.expect("install");
    let loads: Vec<Call> = kernel.calls().into_iter().filter(|c| matches!(c, Call::Load(_))).collect();
    assert_eq!(
        loads,
        vec![Call::Load("drm_panel_orientation_quirks".into()), Call::Load("drm".into()), Call::Load("nvidia".into())]
    );
}

#[tokio::test]
async fn an_in_tree_dependency_is_planned_away_from_the_node_but_install_needs_it() {
    let (server, _work) = publish_needing_drm().await;
    // A host root without the kernel's modules (as local-flow's temp dir).
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let request = InstallRequest {
        stage: request(&server, KERNEL, DRIVER),
        modules: modules(&["nvidia"]),
        compile: None,
        upgrade: Default::default(),
    };
    let plan = dry_run(&layout, &request).await.expect("dry run");
    let dep = host_dir.path().join(format!("lib/modules/{KERNEL}/modules.dep"));
    assert_eq!(plan.modules[0].name, "drm");
    assert_eq!(plan.modules[0].path, dep);
    let text = plan.to_string();
    assert!(text.contains("finit_module drm and the modules it depends on, as listed in"), "{text}");
    assert!(text.contains("not readable here"), "{text}");
    // The install itself must find it, and says where it looked.
    let kernel = SimKernel::new(host_dir.path());
    let error = install(&layout, &request, &kernel, &Reporter::Log).await.expect_err("no modules.dep");
    assert!(error.to_string().contains(&dep.display().to_string()), "{error}");
    assert!(kernel.calls().is_empty(), "{:?}", kernel.calls());
}

#[tokio::test]
async fn allow_compilation_builds_here_when_the_bucket_has_no_bundle() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().expect("dir");
    // Module sources whose build is quick, and a configured header tree.
    let src = dir.path().join("nvidia-open-kernel");
    std::fs::create_dir_all(&src).expect("src");
    std::fs::write(src.join("Kbuild"), format!("ccflags-y += -DNV_VERSION_STRING=\\\"{DRIVER}\\\"\n")).expect("kbuild");
    std::fs::write(src.join("conftest.sh"), "#!/bin/sh\n").expect("conftest");
    std::fs::write(
        src.join("Makefile"),
        format!("modules:\n\tfor m in nvidia nvidia-uvm nvidia-modeset; do printf 'vermagic={KERNEL} SMP \\0name=%s\\0' $$m > $$m.info && objcopy -I binary -O elf64-x86-64 --rename-section .data=.modinfo $$m.info $$m.ko; done\n"),
    )
    .expect("makefile");
    let headers = dir.path().join("headers");
    std::fs::create_dir_all(headers.join("include/config")).expect("headers");
    std::fs::write(headers.join(".config"), "").expect("config");
    std::fs::write(headers.join("include/config/kernel.release"), KERNEL).expect("release");
    let user = driver_dir(dir.path(), KERNEL, DRIVER, 1024);
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let kernel = SimKernel::new(host_dir.path());
    let stage = request(&server, KERNEL, DRIVER);
    let compile = nvidia_installer::compiler::compile::CompileRequest {
        driver_source: src.display().to_string(),
        driver_sha256: None,
        userspace: Some(user),
        kernel_headers: Some(headers),
        kernel_release: Some(KERNEL.into()),
        flavor: nvidia_installer::compiler::compile::Flavor::Auto,
        patches: None,
        firmware: None,
        allow_http: false,
        module_signing: None,
        output: layout.root().join("compile/bundle.tar.zst"),
        driver_version: Some(DRIVER.into()),
        gardenlinux_version: Some(GARDENLINUX.into()),
        jobs: 1,
    };
    let request =
        InstallRequest { stage, modules: modules(&["nvidia"]), compile: Some(compile), upgrade: Default::default() };
    let marker = install(&layout, &request, &kernel, &Reporter::Log).await.expect("install with compilation");
    assert_eq!(marker.driver_version, DRIVER);
    assert!(layout.current().join("modules/nvidia.ko").is_file());
    assert_eq!(kernel.calls()[0], Call::Load("nvidia".into()));
}

#[tokio::test]
async fn dry_run_stages_and_lists_every_kernel_operation_without_performing_any() {
    let (server, _work) = setup().await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let request = InstallRequest {
        stage: request(&server, KERNEL, DRIVER),
        modules: modules(&["nvidia", "nvidia-uvm", "nvidia-modeset"]),
        compile: None,
        upgrade: Default::default(),
    };
    let plan = dry_run(&layout, &request).await.expect("dry run");
    assert!(layout.current().join("bin/nvidia-smi").is_file(), "staging is real");
    let bundle = layout.bundle(KERNEL, DRIVER);
    let loads: Vec<_> = plan.modules.iter().map(|m| (m.name.as_str(), m.path.clone(), m.loaded)).collect();
    assert_eq!(
        loads,
        vec![
            ("nvidia", bundle.join("modules/nvidia.ko"), false),
            ("nvidia-uvm", bundle.join("modules/nvidia-uvm.ko"), false),
            ("nvidia-modeset", bundle.join("modules/nvidia-modeset.ko"), false),
        ]
    );
    let text = plan.to_string();
    let host_bundle = format!("/opt/nvidia-installer/cache/{KERNEL}/{DRIVER}");
    for expected in [
        format!("  1. finit_module {} (nvidia, from the bundle)", bundle.join("modules/nvidia.ko").display()),
        "mknod /dev/nvidia<N> c <major of \"nvidia-frontend\" in /proc/devices> <N>, one per GPU".to_owned(),
        "mknod /dev/nvidiactl c <major of \"nvidia-frontend\" in /proc/devices> 255".to_owned(),
        "mknod /dev/nvidia-uvm-tools c <major of \"nvidia-uvm\" in /proc/devices> 1".to_owned(),
        format!("run {host_bundle}/bin/nvidia-smi with LD_LIBRARY_PATH={host_bundle}/lib"),
        format!("write the ready marker {}", layout.ready().display()),
    ] {
        assert!(text.contains(&expected), "{expected:?} missing from:\n{text}");
    }
    assert!(!layout.ready().exists(), "a dry run marks nothing ready");
    assert_eq!(std::fs::read_dir(host_dir.path().join("dev")).expect("dev").count(), 0, "no device node made");

    // Once the driver is loaded, the plan says so instead of loading it again.
    let kernel = SimKernel::new(host_dir.path());
    install(&layout, &request, &kernel, &Reporter::Log).await.expect("install");
    let plan = dry_run(&layout, &request).await.expect("dry run after install");
    assert!(plan.modules.iter().all(|m| m.loaded), "{:?}", plan.modules);
    assert!(plan.to_string().contains("  1. skip nvidia: already loaded"), "{plan}");
}

/// Publish a bundle whose `firmware/nvidia/<driver>/` holds `gsp_tu10x.bin`; returns its bytes.
async fn publish_with_firmware(server: &S3Server, work: &std::path::Path) -> Vec<u8> {
    let dir = driver_dir(work, KERNEL, DRIVER, 64 * 1024);
    let firmware = dir.join(format!("firmware/nvidia/{DRIVER}"));
    std::fs::create_dir_all(&firmware).expect("firmware dir");
    let bytes = b"GSP firmware stand-in".repeat(100);
    std::fs::write(firmware.join("gsp_tu10x.bin"), &bytes).expect("firmware");
    let out = work.join("firmware-bundle.tar.zst");
    let manifest = pack_bundle(&dir, KERNEL, DRIVER, &out);
    assert!(manifest.files.contains_key(&format!("firmware/nvidia/{DRIVER}/gsp_tu10x.bin")), "listed with its digest");
    let bucket = nvidia_installer::s3::Bucket::connect(&options(server)).await.expect("bucket");
    nvidia_installer::compiler::publish::publish(&bucket, &out, GARDENLINUX, false, None, &Default::default())
        .await
        .expect("publish");
    bytes
}

/// A bucket with the firmware bundle, and a host root whose `firmware_class.path` holds `parameter`.
struct FirmwareHost {
    server: S3Server,
    _work: tempfile::TempDir,
    firmware: Vec<u8>,
    host_dir: tempfile::TempDir,
    layout: nvidia_contract::Layout,
    parameter: std::path::PathBuf,
    request: InstallRequest,
}

async fn firmware_host(parameter_value: &str) -> FirmwareHost {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    let firmware = publish_with_firmware(&server, work.path()).await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let parameter = host_dir.path().join("sys/module/firmware_class/parameters/path");
    std::fs::create_dir_all(parameter.parent().expect("parent")).expect("sys");
    std::fs::write(&parameter, parameter_value).expect("parameter");
    let request = InstallRequest {
        stage: request(&server, KERNEL, DRIVER),
        modules: modules(&["nvidia"]),
        compile: None,
        upgrade: Default::default(),
    };
    FirmwareHost { server, _work: work, firmware, host_dir, layout, parameter, request }
}

#[tokio::test]
async fn the_bundles_firmware_is_findable_before_nvidia_loads_and_after_current_moves() {
    let FirmwareHost { server: _server, _work, firmware, host_dir, layout, parameter, request } =
        firmware_host("").await;

    // The dry run says what will be done, and does nothing.
    let plan = dry_run(&layout, &request).await.expect("dry run");
    let text = plan.to_string();
    assert!(
        text.contains(&format!("link /opt/nvidia-installer/firmware/nvidia/{DRIVER} -> ../../cache/{KERNEL}/{DRIVER}/firmware/nvidia/{DRIVER}"))
            && text.contains("then write /opt/nvidia-installer/firmware to /sys/module/firmware_class/parameters/path"),
        "{text}"
    );
    let first_step = text.lines().next().unwrap_or_default();
    assert!(first_step.contains("firmware"), "firmware comes before the first module load: {text}");
    assert_eq!(std::fs::read_to_string(&parameter).expect("parameter"), "");

    // Without the installer's step, the stand-in nvidia finds no firmware and fails.
    let mut bare = SimKernel::new(host_dir.path());
    bare.firmware = Some(format!("nvidia/{DRIVER}/gsp_tu10x.bin"));
    assert!(
        nvidia_installer::node::kernel::Kernel::load(&bare, &layout.current().join("modules/nvidia.ko"), "").is_err()
    );

    let mut kernel = SimKernel::new(host_dir.path());
    kernel.firmware = Some(format!("nvidia/{DRIVER}/gsp_tu10x.bin"));
    install(&layout, &request, &kernel, &Reporter::Log).await.expect("install");
    assert_eq!(std::fs::read_to_string(&parameter).expect("parameter"), "/opt/nvidia-installer/firmware");
    let found = kernel.firmware_found.lock().expect("found").clone();
    assert_eq!(found.len(), 1);
    assert_eq!(std::fs::read(&found[0]).expect("firmware"), firmware, "the loader read the bundle's file");

    // `current` moving to another bundle does not take the loaded driver's firmware away.
    std::os::unix::fs::symlink("cache/elsewhere", layout.root().join(".moved")).expect("link");
    std::fs::rename(layout.root().join(".moved"), layout.current()).expect("move current");
    let link = layout.root().join(format!("firmware/nvidia/{DRIVER}/gsp_tu10x.bin"));
    assert_eq!(std::fs::read(link).expect("still there"), firmware);
}

#[tokio::test]
async fn a_firmware_path_set_by_someone_else_is_never_silently_replaced() {
    let FirmwareHost { server: _server, _work, firmware, host_dir, layout, parameter, request } =
        firmware_host("/var/lib/firmware\n").await;

    let kernel = SimKernel::new(host_dir.path());
    let error = install(&layout, &request, &kernel, &Reporter::Log).await.expect_err("someone else's path");
    let message = error.to_string();
    assert!(
        message.contains("is set to \"/var/lib/firmware\" by someone else") && message.contains("gsp_tu10x.bin"),
        "{message}"
    );
    assert!(kernel.calls().is_empty(), "nothing loaded: {:?}", kernel.calls());
    assert_eq!(std::fs::read_to_string(&parameter).expect("parameter"), "/var/lib/firmware\n", "left as it was");

    // Where that path (or /lib/firmware) already holds the files, nothing needs to change.
    let theirs = host_dir.path().join(format!("var/lib/firmware/nvidia/{DRIVER}"));
    std::fs::create_dir_all(&theirs).expect("dir");
    std::fs::write(theirs.join("gsp_tu10x.bin"), &firmware).expect("firmware");
    let mut kernel = SimKernel::new(host_dir.path());
    kernel.firmware = Some(format!("nvidia/{DRIVER}/gsp_tu10x.bin"));
    install(&layout, &request, &kernel, &Reporter::Log).await.expect("install");
    assert_eq!(std::fs::read_to_string(&parameter).expect("parameter"), "/var/lib/firmware\n");
    assert!(!layout.root().join("firmware").exists(), "no link needed");
}

#[tokio::test]
async fn a_kernel_that_enforces_signatures_gets_no_unsigned_module() {
    let (server, _work) = setup().await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let parameter = host_dir.path().join("sys/module/module/parameters/sig_enforce");
    std::fs::create_dir_all(parameter.parent().expect("parent")).expect("sys");
    std::fs::write(&parameter, "Y\n").expect("sig_enforce");
    let kernel = SimKernel::new(host_dir.path());
    let request = InstallRequest {
        stage: request(&server, KERNEL, DRIVER),
        modules: modules(&["nvidia"]),
        compile: None,
        upgrade: Default::default(),
    };
    let error = install(&layout, &request, &kernel, &Reporter::Log).await.expect_err("unsigned");
    let message = error.to_string();
    assert!(
        message.contains("the kernel requires signed modules") && message.contains("--module-signing-key"),
        "{message}"
    );
    assert!(kernel.calls().is_empty(), "nothing loaded: {:?}", kernel.calls());

    // What tells a signed module: the kernel's marker at its end.
    let nvidia = layout.current().join("modules/nvidia.ko");
    assert!(!nvidia_installer::bundle::modinfo::is_signed(&nvidia).expect("read"));
    let signed = host_dir.path().join("signed.ko");
    let mut bytes = std::fs::read(&nvidia).expect("module");
    bytes.extend_from_slice(b"\x30\x82signature~Module signature appended~\n");
    std::fs::write(&signed, bytes).expect("signed");
    assert!(nvidia_installer::bundle::modinfo::is_signed(&signed).expect("read"));
}
