//! The compiler instance: the FIFO protocol between `modulus` and `dev-serve` in two processes
//! (with fake module sources whose Makefile is quick), and — marked slow, run in CI — the real
//! NVIDIA open modules from Debian built against real kernel headers.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use integration_tests::s3::{Method, S3Server};

fn bin() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nvidia-installer"));
    command.env("RUST_LOG", "info");
    command
}

/// A configured kernel build tree, as far as the compile step looks at it.
fn fake_headers(root: &Path) -> PathBuf {
    let headers = root.join("headers");
    std::fs::create_dir_all(headers.join("include/config")).expect("headers");
    std::fs::write(headers.join(".config"), "CONFIG_MODULES=y\n").expect("config");
    std::fs::write(headers.join("include/config/kernel.release"), format!("{KERNEL}\n")).expect("release");
    headers
}

/// Module sources whose `make modules` runs `recipe`.
fn fake_sources(root: &Path, recipe: &str) -> PathBuf {
    let src = root.join("nvidia-open-kernel");
    std::fs::create_dir_all(&src).expect("src");
    std::fs::write(src.join("Kbuild"), format!("ccflags-y += -DNV_VERSION_STRING=\\\"{DRIVER}\\\"\n")).expect("kbuild");
    std::fs::write(src.join("conftest.sh"), "#!/bin/sh\n").expect("conftest");
    std::fs::write(src.join("Makefile"), format!("modules:\n\t{recipe}\n")).expect("makefile");
    src
}

fn userspace(root: &Path) -> PathBuf {
    let dir = driver_dir(root, KERNEL, DRIVER, 1024);
    std::fs::remove_dir_all(dir.join("modules")).expect("modules");
    dir
}

/// A make that builds ELF objects whose `.modinfo` sections say what a kernel module's would.
const MAKE_MODULES: &str = "for m in nvidia nvidia-uvm nvidia-modeset; do printf 'vermagic=6.1.0-47-amd64 SMP preempt mod_unload modversions \\0name=%s\\0' $$m > $$m.info && objcopy -I binary -O elf64-x86-64 --rename-section .data=.modinfo $$m.info $$m.ko; done";

fn modulus(cmd: &Path, out: &Path, source: &Path, headers: &Path, extra: &[&str]) -> Command {
    let mut command = bin();
    command
        .arg("modulus")
        .arg("--cmd-dir")
        .arg(cmd)
        .arg("--out-dir")
        .arg(out)
        .arg("--driver-source")
        .arg(source)
        .arg("--kernel-headers")
        .arg(headers)
        .args(extra);
    command
}

fn dev_serve(cmd: &Path, work: &Path) -> Child {
    bin()
        .arg("dev-serve")
        .arg("--cmd-dir")
        .arg(cmd)
        .arg("--work-dir")
        .arg(work)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dev-serve")
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn modulus_and_dev_build_and_publish_through_the_fifos() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().expect("dir");
    let (cmd, out) = (dir.path().join("cmd"), dir.path().join("out"));
    std::fs::create_dir_all(&cmd).expect("cmd");
    std::fs::create_dir_all(&out).expect("out");
    let sources = fake_sources(dir.path(), MAKE_MODULES);
    let headers = fake_headers(dir.path());
    let user = userspace(dir.path());
    let _dev = Killed(dev_serve(&cmd, &dir.path().join("work")));
    let output = modulus(
        &cmd,
        &out,
        &sources,
        &headers,
        &[
            "--userspace",
            user.to_str().expect("utf8"),
            "--gardenlinux-version",
            GARDENLINUX,
            "--publish",
            "--bucket",
            BUCKET,
            "--dev-wait",
            "20s",
        ],
    )
    .envs(server.env())
    .output()
    .expect("modulus");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let bundle = out.join("nvidia-bundle.tar.zst");
    let manifest = nvidia_installer::bundle::pack::read_inner_manifest(&bundle).expect("bundle");
    assert_eq!((manifest.driver_version.as_str(), manifest.kernel_release.as_str()), (DRIVER, KERNEL));
    let mut names: Vec<&str> = manifest.modules.iter().map(|m| m.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, vec!["nvidia", "nvidia-modeset", "nvidia-uvm"]);
    let keys = nvidia_installer::s3::BundleKeys::new(GARDENLINUX, KERNEL, DRIVER).expect("valid names");
    assert!(server.get_object(BUCKET, &keys.manifest).is_some(), "published");
}

#[test]
fn a_missing_dev_container_is_reported_not_waited_on() {
    let dir = tempfile::tempdir().expect("dir");
    let cmd = dir.path().join("cmd");
    std::fs::create_dir_all(&cmd).expect("cmd");
    let sources = fake_sources(dir.path(), "true");
    let headers = fake_headers(dir.path());
    let output = modulus(&cmd, dir.path(), &sources, &headers, &["--dev-wait", "1s"]).output().expect("modulus");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("dev container") && stderr.contains("heartbeat"), "{stderr}");
}

#[test]
fn a_dev_side_that_never_answers_times_out() {
    let dir = tempfile::tempdir().expect("dir");
    let cmd = dir.path().join("cmd");
    std::fs::create_dir_all(&cmd).expect("cmd");
    let pipes = nvidia_installer::compiler::fifo::Pipes::new(&cmd);
    pipes.create().expect("fifos");
    // A dev side that is alive, takes the request, and never answers.
    let heartbeat = pipes.heartbeat.clone();
    let request = pipes.request.clone();
    std::thread::spawn(move || {
        let reader = std::thread::spawn(move || std::fs::read_to_string(request));
        for _ in 0..100 {
            let _ = std::fs::write(&heartbeat, "1\n");
            std::thread::sleep(Duration::from_millis(200));
        }
        drop(reader);
    });
    let sources = fake_sources(dir.path(), "true");
    let headers = fake_headers(dir.path());
    let started = Instant::now();
    let output = modulus(&cmd, dir.path(), &sources, &headers, &["--timeout", "2s"]).output().expect("modulus");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no answer within 2s"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20), "it gave up");
}

#[test]
fn a_dev_container_dying_mid_build_is_noticed() {
    let dir = tempfile::tempdir().expect("dir");
    let cmd = dir.path().join("cmd");
    std::fs::create_dir_all(&cmd).expect("cmd");
    let started_marker = dir.path().join("build-started");
    let sources = fake_sources(dir.path(), &format!("touch {} && sleep 120", started_marker.display()));
    let headers = fake_headers(dir.path());
    let mut dev = dev_serve(&cmd, &dir.path().join("work"));
    let user = userspace(dir.path());
    let modulus = modulus(
        &cmd,
        dir.path(),
        &sources,
        &headers,
        &["--userspace", user.to_str().expect("utf8"), "--dev-wait", "20s"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("modulus");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started_marker.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(started_marker.exists(), "the build never started");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(dev.id() as i32), nix::sys::signal::Signal::SIGKILL)
        .expect("kill");
    let _ = dev.wait();
    // `make` and `sleep` were children of the dead dev; take them down as a container stop would.
    let _ = Command::new("pkill").args(["-f", &started_marker.display().to_string()]).status();
    let output = modulus.wait_with_output().expect("modulus");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("stopped during the build") || stderr.contains("without an exit code"), "{stderr}");
}

#[test]
fn a_failing_build_reports_the_compilers_first_error() {
    let dir = tempfile::tempdir().expect("dir");
    let cmd = dir.path().join("cmd");
    std::fs::create_dir_all(&cmd).expect("cmd");
    let sources = fake_sources(
        dir.path(),
        "echo 'cc -Werror=implicit-function-declaration -c x.c'; echo \"nvidia/nv-pci.c:223:9: error: too few arguments to function 'pci_resize_resource'\" >&2; echo 'later.c:1:1: error: second' >&2; exit 2",
    );
    let headers = fake_headers(dir.path());
    let user = userspace(dir.path());
    let _dev = Killed(dev_serve(&cmd, &dir.path().join("work")));
    let output = modulus(
        &cmd,
        dir.path(),
        &sources,
        &headers,
        &["--userspace", user.to_str().expect("utf8"), "--dev-wait", "20s"],
    )
    .output()
    .expect("modulus");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "building the modules for kernel {KERNEL} failed: nvidia/nv-pci.c:223:9: error: too few arguments"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("exit code 1"), "{stderr}");
}

// ---- the real thing: Debian's NVIDIA open kernel module sources and kernel headers ----

#[tokio::test]
#[ignore = "slow (about 4 minutes on 2 cores); needs nvidia-open-kernel-source and linux-headers-6.1.0-47-amd64 (scripts/test-deps installs them)"]
async fn real_open_modules_for_debian_6_1_publish_and_stage() {
    let dir = tempfile::tempdir().expect("dir");
    let out = dir.path().join("bundle.tar.zst");
    let output = compile_real(Path::new("/usr/src/linux-headers-6.1.0-47-amd64"), None, &out);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    keep_real_bundle(&out, KERNEL);
    let manifest = nvidia_installer::bundle::pack::read_inner_manifest(&out).expect("bundle");
    assert_eq!(manifest.driver_version, DRIVER);
    assert_eq!(manifest.kernel_release, KERNEL);
    for module in ["nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm"] {
        let entry = manifest.modules.iter().find(|m| m.name == module).unwrap_or_else(|| panic!("{module} missing"));
        assert!(entry.vermagic.starts_with("6.1.0-47-amd64 "), "{module}: {}", entry.vermagic);
    }
    let nvidia = manifest.modules.iter().find(|m| m.name == "nvidia").expect("nvidia");
    assert_eq!(nvidia.depends, vec!["drm"], "nvidia.ko on Debian 6.1 depends on the in-tree drm");
    assert!(manifest.files["modules/nvidia.ko"].size < 40 << 20, "debug info stripped");
    assert!(manifest.files.contains_key("bin/nvidia-smi"));
    assert!(
        manifest.files.contains_key("lib/libnvidia-ml.so.535.261.03")
            && manifest.files.contains_key("lib/libcuda.so.535.261.03")
    );
    assert!(
        manifest.links.contains_key("lib/libnvidia-ml.so.1") && manifest.links.contains_key("lib/libcuda.so.1"),
        "{:?}",
        manifest.links
    );
    // Debian's real GSP firmware for this driver (firmware-nvidia-gsp), with its digests.
    for (file, size) in [("gsp_ga10x.bin", 38_254_112), ("gsp_tu10x.bin", 23_873_824)] {
        let entry = &manifest.files[&format!("firmware/nvidia/{DRIVER}/{file}")];
        assert_eq!(entry.size, size, "{file}");
        assert_eq!(entry.sha256.len(), 64, "{file}");
    }

    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let client = nvidia_installer::s3::Bucket::connect(&options(&server)).await.expect("client");
    nvidia_installer::compiler::publish::publish(&client, &out, GARDENLINUX, false, None, &Default::default())
        .await
        .expect("publish");
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let output = Command::new(env!("CARGO_BIN_EXE_nvidia-installer"))
        .arg("stage")
        .envs(server.env())
        .env("NVIDIA_INSTALLER_HOST_ROOT", host_dir.path())
        .env("NVIDIA_INSTALLER_BUCKET", BUCKET)
        .env("NVIDIA_DRIVER_VERSION", DRIVER)
        .env("GARDENLINUX_VERSION", GARDENLINUX)
        .output()
        .expect("stage");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let staged = layout.current();
    for module in ["nvidia", "nvidia-uvm", "nvidia-modeset"] {
        let path = staged.join(format!("modules/{module}.ko"));
        let info = nvidia_installer::bundle::modinfo::modinfo(&path).expect("modinfo");
        assert_eq!(nvidia_installer::bundle::modinfo::vermagic_release(&info.vermagic), KERNEL);
        // Signed for kernels that enforce signatures: kmod's modinfo reads the appended signature.
        let field = |name: &str| {
            let output = Command::new("modinfo").args(["-F", name]).arg(&path).output().expect("modinfo (kmod)");
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        };
        assert_eq!(field("signer"), MODULE_SIGNER, "{module}");
        assert_eq!(field("sig_hashalgo"), "sha256", "{module}");
        assert!(nvidia_installer::bundle::modinfo::is_signed(&path).expect("read"), "{module}");
    }
    assert!(staged.join("lib64/libnvidia-ml.so.1").exists() && staged.join("bin/nvidia-smi").is_file());
}

#[test]
#[ignore = "slow (two builds, about 8 minutes on 2 cores); needs nvidia-open-kernel-source and the 6.12 cloud headers (scripts/test-deps installs them)"]
fn the_6_12_cloud_kernel_needs_the_patch_and_builds_with_it() {
    let headers = cloud_612_headers().expect("linux-headers-6.12.*-cloud-amd64 under /usr/src: run scripts/test-deps");
    let dir = tempfile::tempdir().expect("dir");
    let out = dir.path().join("bundle.tar.zst");
    let output = compile_real(&headers, None, &out);
    assert!(!output.status.success(), "6.12 builds without the patch?");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("nv-pci.c")
            && stderr.contains("error: too few arguments to function")
            && stderr.contains("pci_resize_resource"),
        "{stderr}"
    );
    assert!(stderr.contains("full log:"), "{stderr}");

    let output = compile_real(&headers, Some(&patches_612()), &out);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let manifest = nvidia_installer::bundle::pack::read_inner_manifest(&out).expect("bundle");
    let release =
        headers.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("linux-headers-")).expect("release");
    keep_real_bundle(&out, release);
    assert!(manifest.modules.iter().all(|m| m.vermagic.starts_with(&format!("{release} "))), "{:?}", manifest.modules);
}

/// An installer shaped like NVIDIA's `.run` (a self-extracting script that honours `-x --target`),
/// with both module flavors and the user-space files at its top level.
fn fake_run(dir: &Path, version: &str) -> PathBuf {
    let tree = dir.join("run-tree");
    for (flavor, binary) in [("kernel-open", false), ("kernel", true)] {
        let src = tree.join(flavor);
        std::fs::create_dir_all(src.join("nvidia")).expect("src");
        std::fs::write(src.join("Kbuild"), format!("ccflags-y += -DNV_VERSION_STRING=\\\"{version}\\\"\n"))
            .expect("kbuild");
        std::fs::write(src.join("conftest.sh"), "#!/bin/sh\n").expect("conftest");
        std::fs::write(src.join("Makefile"), format!("modules:\n\t{MAKE_MODULES}\n\techo {flavor} > built-from\n"))
            .expect("makefile");
        if binary {
            std::fs::write(src.join("nvidia/nv-kernel.o_binary"), b"blob").expect("blob");
        }
    }
    std::fs::write(tree.join(".manifest"), format!("NVIDIA driver\n{version}\n")).expect("manifest");
    std::fs::write(tree.join("nvidia-smi"), "#!/bin/sh\necho smi\n").expect("smi");
    std::fs::create_dir_all(tree.join("firmware")).expect("firmware");
    std::fs::write(tree.join("firmware/gsp_tu10x.bin"), vec![9u8; 4096]).expect("firmware");
    for lib in ["libcuda", "libnvidia-ml", "libnvidia-ptxjitcompiler"] {
        std::fs::write(tree.join(format!("{lib}.so.{version}")), vec![1u8; 2048]).expect("lib");
    }
    let tarball = dir.join("payload.tar");
    let status = Command::new("tar").arg("-cf").arg(&tarball).arg("-C").arg(&tree).arg(".").status().expect("tar");
    assert!(status.success());
    let run = dir.join(format!("NVIDIA-Linux-x86_64-{version}.run"));
    let script = format!(
        "#!/bin/sh\n# fake makeself: -x --target DIR\ntarget=''\nwhile [ $# -gt 0 ]; do case \"$1\" in --target) target=\"$2\"; shift;; esac; shift; done\nmkdir -p \"$target\" && tar -xf {} -C \"$target\"\n",
        tarball.display()
    );
    std::fs::write(&run, script).expect("run");
    run
}

#[test]
fn a_run_installer_is_extracted_and_auto_picks_the_flavor_by_branch() {
    let dir = tempfile::tempdir().expect("dir");
    let run = fake_run(dir.path(), DRIVER);
    let headers = fake_headers(dir.path());
    let out = dir.path().join("bundle.tar.zst");
    let sha = nvidia_installer::bundle::sha256_file(&run).expect("sha");
    let compile = |extra: &[&str]| {
        bin()
            .arg("compile")
            .arg("--driver-source")
            .arg(&run)
            .arg("--kernel-headers")
            .arg(&headers)
            .arg("--output")
            .arg(&out)
            .args(extra)
            .output()
            .expect("compile")
    };
    let output = compile(&["--driver-sha256", &sha]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let manifest = nvidia_installer::bundle::pack::read_inner_manifest(&out).expect("bundle");
    assert_eq!(manifest.flavor, "proprietary", "535 is below the 560 branch");
    assert_eq!(manifest.driver_version, DRIVER, "version from the .run's manifest");
    for file in ["bin/nvidia-smi", "lib/libcuda.so.535.261.03", "lib/libnvidia-ml.so.535.261.03"] {
        assert!(manifest.files.contains_key(file), "{file}: {:?}", manifest.files.keys());
    }
    assert_eq!(manifest.links.get("lib/libcuda.so.1").map(String::as_str), Some("libcuda.so.535.261.03"));
    assert_eq!(
        manifest.files.get(&format!("firmware/nvidia/{DRIVER}/gsp_tu10x.bin")).map(|f| f.size),
        Some(4096),
        "the .run's firmware, where nvidia.ko asks for it"
    );

    let output = compile(&["--flavor", "open"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(nvidia_installer::bundle::pack::read_inner_manifest(&out).expect("bundle").flavor, "open");

    let output = compile(&["--driver-sha256", &"0".repeat(64)]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("sha256 mismatch") && stderr.contains(".run"), "{stderr}");
}

/// The compiler instance as the seed's values run it, twice against the same bucket (a restarted
/// pod): the first run builds and publishes, the second finds the bundle and builds nothing.
/// Publishing the very same bundle again is a no-op, not an error.
#[tokio::test]
async fn a_restarted_compiler_instance_builds_once() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().expect("dir");
    let (cmd, out) = (dir.path().join("cmd"), dir.path().join("out"));
    std::fs::create_dir_all(&cmd).expect("cmd");
    std::fs::create_dir_all(&out).expect("out");
    let builds = dir.path().join("builds");
    let sources = fake_sources(dir.path(), &format!("{MAKE_MODULES}; echo build >> {}", builds.display()));
    let headers = fake_headers(dir.path());
    let user = userspace(dir.path());
    let run = || {
        let _dev = Killed(dev_serve(&cmd, &dir.path().join("work")));
        let extra = [
            "--userspace",
            user.to_str().expect("utf8"),
            "--gardenlinux-version",
            GARDENLINUX,
            "--driver-version",
            DRIVER,
            "--kernel-release",
            KERNEL,
            "--publish",
            "--bucket",
            BUCKET,
            "--dev-wait",
            "20s",
        ];
        modulus(&cmd, &out, &sources, &headers, &extra).envs(server.env()).output().expect("modulus")
    };
    let first = run();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(String::from_utf8_lossy(&first.stdout).contains("published s3://"));
    let second = run();
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    assert!(String::from_utf8_lossy(&second.stdout).contains("already published"), "{second:?}");
    assert_eq!(std::fs::read_to_string(&builds).expect("builds").lines().count(), 1, "one build for two runs");

    // The same bundle published again by hand: done already, nothing written.
    let puts = server.log().matching(&Method::PUT, "").len();
    let again = bin()
        .args(["publish", "--gardenlinux-version", GARDENLINUX, "--bundle"])
        .arg(out.join("nvidia-bundle.tar.zst"))
        .env("NVIDIA_INSTALLER_BUCKET", BUCKET)
        .envs(server.env())
        .output()
        .expect("publish");
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stdout).contains("already published, unchanged"));
    assert_eq!(server.log().matching(&Method::PUT, "").len(), puts, "nothing written");
}

/// A `.run` fetched over HTTPS (a presigned URL of the loopback S3 server, trusted through
/// SSL_CERT_FILE as any system CA would be), its digest taken as it arrives; plain http refused.
#[tokio::test]
async fn a_run_installer_is_downloaded_over_https_and_checked() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().expect("dir");
    let run = fake_run(dir.path(), DRIVER);
    let sha = nvidia_installer::bundle::sha256_file(&run).expect("sha");
    server.put_file(BUCKET, "nvidia/NVIDIA-Linux-x86_64-535.261.03.run", &run);
    let client = integration_tests::s3::client(&server);
    let presigned = client
        .get_object()
        .bucket(BUCKET)
        .key("nvidia/NVIDIA-Linux-x86_64-535.261.03.run")
        .presigned(
            aws_sdk_s3::presigning::PresigningConfig::expires_in(std::time::Duration::from_secs(600)).expect("presign"),
        )
        .await
        .expect("presigned")
        .uri()
        .to_owned();
    let headers = fake_headers(dir.path());
    let out = dir.path().join("bundle.tar.zst");
    let compile = |source: &str, sha: &str| {
        bin()
            .args(["compile", "--driver-source", source, "--driver-sha256", sha, "--flavor", "open"])
            .arg("--kernel-headers")
            .arg(&headers)
            .arg("--output")
            .arg(&out)
            .env("SSL_CERT_FILE", server.ca_file())
            .output()
            .expect("compile")
    };
    let output = compile(&presigned, &sha);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("driver source downloaded"), "{stderr}");
    assert_eq!(nvidia_installer::bundle::pack::read_inner_manifest(&out).expect("bundle").driver_version, DRIVER);

    let output = compile(&presigned, &"0".repeat(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("sha256 mismatch"), "{output:?}");
    let plain = presigned.replacen("https://", "http://", 1);
    let output = compile(&plain, &sha);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("plain http:// is refused"), "{stderr}");
}
