//! Shared by the installer's integration tests: driver bundles built on disk, published to the
//! loopback S3 server, and a kernel seam that records what is asked of it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

#[allow(unused_imports)]
pub use integration_tests::kernel::{Call, SimKernel};
use integration_tests::s3::S3Server;
use nvidia_contract::layout::Layout;
use nvidia_installer::bundle::archive::Limits;
use nvidia_installer::bundle::manifest::Manifest;
use nvidia_installer::bundle::pack::{self, BundleInfo};
use nvidia_installer::node::stage::StageRequest;
use nvidia_installer::s3::{S3Options, Transfer};

pub const KERNEL: &str = "6.1.0-47-amd64";
pub const DRIVER: &str = "535.261.03";
pub const GARDENLINUX: &str = "1877.3";
pub const BUCKET: &str = "drivers";

/// A stand-in kernel module: an ELF object with the modinfo strings the installer reads.
pub fn module_bytes(name: &str, kernel: &str, depends: &str) -> Vec<u8> {
    let vermagic = format!("{kernel} SMP preempt mod_unload modversions ");
    integration_tests::fixtures::elf_module(&[
        ("license", "Dual MIT/GPL"),
        ("depends", depends),
        ("name", name),
        ("vermagic", &vermagic),
    ])
}

/// A driver directory with bin/, lib/ (with soname links) and modules/, plus `filler` bytes of
/// incompressible data in a library, like real driver files.
pub fn driver_dir(root: &Path, kernel: &str, driver: &str, filler: usize) -> PathBuf {
    let dir = root.join(format!("driver-{driver}"));
    std::fs::create_dir_all(dir.join("bin")).expect("bin");
    std::fs::create_dir_all(dir.join("lib")).expect("lib");
    std::fs::create_dir_all(dir.join("modules")).expect("modules");
    let smi = dir.join("bin/nvidia-smi");
    std::fs::write(&smi, format!("#!/bin/sh\necho \"NVIDIA-SMI {driver}  Driver Version: {driver}\"\n")).expect("smi");
    std::fs::set_permissions(&smi, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    for lib in ["libnvidia-ml", "libcuda"] {
        let mut data = vec![0u8; if lib == "libcuda" { filler } else { 4096 }];
        fastrand_fill(&mut data, driver.len() as u64 + lib.len() as u64);
        std::fs::write(dir.join(format!("lib/{lib}.so.{driver}")), data).expect("lib");
        std::os::unix::fs::symlink(format!("{lib}.so.{driver}"), dir.join(format!("lib/{lib}.so.1"))).expect("soname");
    }
    for (name, depends) in
        [("nvidia", ""), ("nvidia-uvm", "nvidia"), ("nvidia-modeset", "nvidia"), ("nvidia-drm", "nvidia-modeset")]
    {
        std::fs::write(dir.join(format!("modules/{name}.ko")), module_bytes(&name.replace('-', "_"), kernel, depends))
            .expect("module");
    }
    dir
}

fn fastrand_fill(data: &mut [u8], seed: u64) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Pack a driver directory into `out` and return the bucket's manifest.
pub fn pack_bundle(dir: &Path, kernel: &str, driver: &str, out: &Path) -> Manifest {
    let info = BundleInfo {
        driver_version: driver.to_owned(),
        kernel_release: kernel.to_owned(),
        flavor: "open".to_owned(),
        gardenlinux_version: Some(GARDENLINUX.to_owned()),
    };
    let manifest = pack::describe(dir, &info).expect("describe");
    pack::pack(dir, &manifest, out, 3).expect("pack")
}

pub fn options(server: &S3Server) -> S3Options {
    integration_tests::fixtures::s3_options(server, BUCKET)
}

pub fn request(server: &S3Server, kernel: &str, driver: &str) -> StageRequest {
    StageRequest {
        gardenlinux_version: GARDENLINUX.to_owned(),
        kernel_release: kernel.to_owned(),
        driver_version: driver.to_owned(),
        s3: options(server),
        transfer: Transfer {
            part_size: 256 * 1024,
            concurrency: 4,
            max_attempts: 6,
            backoff: std::time::Duration::from_millis(10),
            ..Transfer::default()
        },
        limits: Limits::default(),
        flavors: None,
        trust: None,
    }
}

/// Build, pack and publish a bundle; returns its bucket manifest.
pub async fn publish_bundle(server: &S3Server, work: &Path, kernel: &str, driver: &str, filler: usize) -> Manifest {
    let dir = driver_dir(work, kernel, driver, filler);
    let out = work.join(format!("nvidia-{driver}.tar.zst"));
    pack_bundle(&dir, kernel, driver, &out);
    let client = nvidia_installer::s3::Bucket::connect(&options(server)).await.expect("client");
    let published =
        nvidia_installer::compiler::publish::publish(&client, &out, GARDENLINUX, false, None, &Transfer::default())
            .await
            .expect("publish");
    published.manifest
}

/// A host root in a temp dir, with the files the installer reads from /proc.
pub fn host(dir: &Path) -> Layout {
    let layout = Layout::new(dir, "/opt/nvidia-installer");
    std::fs::create_dir_all(dir.join("proc/sys/kernel/random")).expect("proc");
    std::fs::write(dir.join("proc/sys/kernel/random/boot_id"), "5d1e6c2a-0d5e-4bd6-9a57-1f2b3c4d5e6f\n")
        .expect("boot id");
    std::fs::write(dir.join("proc/sys/kernel/osrelease"), format!("{KERNEL}\n")).expect("osrelease");
    std::fs::write(dir.join("proc/modules"), "").expect("modules");
    std::fs::write(dir.join("proc/devices"), "Character devices:\n  1 mem\n  4 tty\n\nBlock devices:\n  8 sd\n")
        .expect("devices");
    std::fs::create_dir_all(dir.join("dev")).expect("dev");
    layout
}

/// Debian's NVIDIA open kernel module sources (nvidia-open-kernel-source).
pub const REAL_SOURCES: &str = "/usr/src/nvidia-open-kernel.tar.xz";

/// Debian's NVIDIA user space, unpacked by scripts/test-deps.
pub fn real_userspace() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/nvidia-userspace");
    assert!(dir.join("bin/nvidia-smi").is_file(), "{} missing: run scripts/test-deps", dir.display());
    dir
}

/// Debian's GSP firmware (firmware-nvidia-gsp), unpacked by scripts/test-deps: a firmware root
/// holding `nvidia/<version>/gsp_*.bin`.
pub fn real_firmware() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/nvidia-firmware");
    assert!(dir.join(format!("nvidia/{DRIVER}")).is_dir(), "{} missing: run scripts/test-deps", dir.display());
    dir
}

/// The newest 6.12 cloud kernel headers under /usr/src.
pub fn cloud_612_headers() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/src")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-headers-6.12.") && n.ends_with("-cloud-amd64"))
        })
        .collect();
    found.sort();
    found.pop()
}

/// The patch the open modules need to build against 6.12.
pub fn patches_612() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/patches/6.12")
}

/// The subject of the test module-signing certificate.
pub const MODULE_SIGNER: &str = "nvidia-installer test modules";

/// A module-signing key and self-signed certificate (PEM), as a distribution's build would hold
/// them, made with openssl in `dir`.
pub fn module_signing_key(dir: &Path) -> (PathBuf, PathBuf) {
    let (key, cert) = (dir.join("module-signing.key"), dir.join("module-signing.crt"));
    let status = std::process::Command::new("openssl")
        .args(["req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-sha256"])
        .args(["-subj", &format!("/CN={MODULE_SIGNER}"), "-addext", "extendedKeyUsage=codeSigning"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl req");
    (key, cert)
}

/// `nvidia-installer compile` of the real open modules against `headers`, signed with a test key.
pub fn compile_real(headers: &Path, patches: Option<&Path>, out: &Path) -> std::process::Output {
    let (key, cert) = module_signing_key(out.parent().expect("output dir"));
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_nvidia-installer"));
    command
        .env("RUST_LOG", "info")
        .arg("compile")
        .args(["--driver-source", REAL_SOURCES, "--flavor", "open", "--gardenlinux-version", GARDENLINUX])
        .arg("--kernel-headers")
        .arg(headers)
        .arg("--userspace")
        .arg(real_userspace())
        .arg("--firmware")
        .arg(real_firmware())
        .arg("--module-signing-key")
        .arg(&key)
        .arg("--module-signing-cert")
        .arg(&cert)
        .arg("--output")
        .arg(out);
    if let Some(patches) = patches {
        command.arg("--patches").arg(patches);
    }
    command.output().expect("compile")
}

/// Where the real compile tests leave the bundle they built for `kernel`, so that the test that
/// boots that kernel need not build it again (it builds it itself when the file is missing).
pub fn real_bundle_path(kernel: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("real-bundles").join(format!("nvidia-{DRIVER}-{kernel}.tar.zst"))
}

pub fn keep_real_bundle(bundle: &Path, kernel: &str) {
    let kept = real_bundle_path(kernel);
    std::fs::create_dir_all(kept.parent().expect("parent")).expect("real-bundles dir");
    let partial = kept.with_extension("partial");
    std::fs::copy(bundle, &partial).expect("keeping the real bundle");
    std::fs::rename(&partial, &kept).expect("keeping the real bundle");
}
