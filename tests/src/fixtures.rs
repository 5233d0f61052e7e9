//! What the cross-component tests and `local-flow` set up the same way: the workspace's binaries,
//! a driver directory in the bundle layout, a host root, and a bundle published to the loopback
//! S3 server.

use std::io;
use std::path::{Path, PathBuf};

use nvidia_installer::bundle::pack::{self, BundleInfo};
use nvidia_installer::s3::{S3Options, Transfer};

use crate::s3::S3Server;

/// The boot id written into host roots (the ready marker records it).
pub const BOOT_ID: &str = "5d1e6c2a-0d5e-4bd6-9a57-1f2b3c4d5e6f";

/// A binary of the workspace, built beside the running test (`target/<profile>/`).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let path = exe.parent().and_then(Path::parent).expect("target dir").join(name);
    assert!(path.is_file(), "{} not built: run `cargo test --workspace`", path.display());
    path
}

/// A driver directory in the bundle layout: an executable `bin/nvidia-smi`, `libnvidia-ml` and
/// `libcuda` of `lib_bytes` incompressible bytes each with their soname links, and the three
/// modules carrying the modinfo strings (`vermagic`, `depends`) that `install` checks and plans
/// from. The libraries and modules hold no driver code.
pub fn sample_driver(dir: &Path, kernel: &str, driver: &str, lib_bytes: usize) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    for sub in ["bin", "lib", "modules"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let smi = dir.join("bin/nvidia-smi");
    std::fs::write(&smi, format!("#!/bin/sh\necho \"sample bundle: NVIDIA driver {driver} for kernel {kernel}\"\n"))?;
    std::fs::set_permissions(&smi, std::fs::Permissions::from_mode(0o755))?;
    for (seed, lib) in [(1u64, "libnvidia-ml"), (2, "libcuda")] {
        let mut data = vec![0u8; lib_bytes];
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ seed;
        for chunk in data.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(dir.join(format!("lib/{lib}.so.{driver}")), data)?;
        std::os::unix::fs::symlink(format!("{lib}.so.{driver}"), dir.join(format!("lib/{lib}.so.1")))?;
    }
    for (name, depends) in [("nvidia", ""), ("nvidia-uvm", "nvidia"), ("nvidia-modeset", "nvidia")] {
        let vermagic = format!("{kernel} SMP preempt mod_unload modversions ");
        let module = elf_module(&[
            ("license", "Dual MIT/GPL"),
            ("version", driver),
            ("depends", depends),
            ("name", &name.replace('-', "_")),
            ("vermagic", &vermagic),
        ]);
        std::fs::write(dir.join(format!("modules/{name}.ko")), module)?;
    }
    Ok(())
}

/// The files `install` and `wait` read under a host root: the kernel release, the boot id,
/// `/proc/modules` and `/proc/devices` (nothing loaded), and an empty `/dev`.
pub fn host_root(host: &Path, kernel: &str) -> io::Result<()> {
    std::fs::create_dir_all(host.join("proc/sys/kernel/random"))?;
    std::fs::write(host.join("proc/sys/kernel/osrelease"), format!("{kernel}\n"))?;
    std::fs::write(host.join("proc/sys/kernel/random/boot_id"), format!("{BOOT_ID}\n"))?;
    std::fs::write(host.join("proc/modules"), "")?;
    std::fs::write(host.join("proc/devices"), "Character devices:\n  1 mem\n  4 tty\n\nBlock devices:\n  8 sd\n")?;
    std::fs::create_dir_all(host.join("dev"))
}

/// Options for `bucket` on the loopback server (its private CA included).
pub fn s3_options(server: &S3Server, bucket: &str) -> S3Options {
    S3Options {
        bucket: bucket.into(),
        region: Some(server.region().into()),
        endpoint: Some(server.endpoint().into()),
        access_key_id: Some(server.access_key().into()),
        secret_access_key: Some(server.secret_key().into()),
        ca_file: Some(server.ca_file().to_owned()),
        app_name: None,
    }
}

/// Pack [`sample_driver`] under `work` and publish it to `bucket` (which must exist); returns
/// the options that reach it.
pub async fn publish_sample(
    server: &S3Server,
    bucket: &str,
    work: &Path,
    info: &BundleInfo,
    lib_bytes: usize,
) -> S3Options {
    let dir = work.join("driver");
    sample_driver(&dir, &info.kernel_release, &info.driver_version, lib_bytes).expect("sample driver");
    let manifest = pack::describe(&dir, info).expect("describe");
    let bundle = work.join("bundle.tar.zst");
    pack::pack(&dir, &manifest, &bundle, 3).expect("pack");
    let options = s3_options(server, bucket);
    let client = nvidia_installer::s3::Bucket::connect(&options).await.expect("s3 client");
    let gardenlinux = info.gardenlinux_version.as_deref().expect("a Garden Linux version");
    nvidia_installer::compiler::publish::publish(&client, &bundle, gardenlinux, false, None, &Transfer::default())
        .await
        .expect("publish");
    options
}

/// A kernel module as the installer reads one: an ELF relocatable object (x86-64) whose
/// `.modinfo` section holds `fields` as the kernel's build writes them (`key=value`, NUL after each).
pub fn elf_module(fields: &[(&str, &str)]) -> Vec<u8> {
    use object::write::Object;
    use object::{Architecture, BinaryFormat, Endianness, SectionKind};
    let mut module = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
    let info: Vec<u8> = fields.iter().flat_map(|(key, value)| format!("{key}={value}\0").into_bytes()).collect();
    let section = module.add_section(Vec::new(), b".modinfo".to_vec(), SectionKind::ReadOnlyString);
    module.append_section_data(section, &info, 1);
    module.write().expect("an ELF object")
}
