//! Module loading on real kernels. Debian's 6.1 and 6.12 cloud kernels boot in QEMU (software
//! emulation: no KVM needed) into an initramfs holding a statically linked `nvidia-installer`, a
//! static busybox, the kernel's own `modules.dep` with the in-tree modules the driver needs, and a
//! host cache that the real `stage` filled from the loopback S3 server with two bundles:
//!  - the real NVIDIA open modules that `compile` built for that kernel: the guest has no GPU, so
//!    `install` must load the in-tree dependencies itself, fail with a clear "no GPU" error, leave
//!    no ready marker and no module loaded (its in-tree dependencies included);
//!  - a tiny stand-in driver built from `tests/fixtures/kmod` against the same headers, which
//!    loads: dependency order, device nodes from `/proc/devices`, `nvidia-smi`, the ready marker,
//!    "already loaded" on a second run, and a clear refusal to install another version over it.
//!
//! Slow (a real build of the open modules when the compile tests have not left one, and two
//! emulated boots): ignored by default, run in CI with `--include-ignored`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use common::*;
use integration_tests::s3::S3Server;
use nvidia_installer::bundle::pack::{self, BundleInfo};

/// The stand-in's driver version (its MODULE_VERSION, so install sees it as loaded).
const STAND_IN: &str = "0.0.1";
/// One guest at a time: the emulation is CPU-bound.
static ONE_GUEST: Mutex<()> = Mutex::new(());

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The statically linked installer, built by scripts/test before the tests run.
fn static_installer() -> PathBuf {
    let path = std::env::var_os("NVIDIA_INSTALLER_STATIC").map(PathBuf::from).unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), PathBuf::from);
        target.join("x86_64-unknown-linux-gnu/debug/nvidia-installer")
    });
    assert!(
        path.is_file(),
        "{} missing: scripts/test builds it (RUSTFLAGS='-C target-feature=+crt-static' cargo build -p nvidia-installer --target x86_64-unknown-linux-gnu)",
        path.display()
    );
    let output = Command::new("ldd").arg(&path).output().expect("ldd");
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("not a dynamic executable") || text.contains("statically linked"),
        "{}: {text}",
        path.display()
    );
    // Built from the sources under test, not left over from an earlier build.
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).expect("binary mtime");
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("installer sources").flatten() {
            if entry.path().is_dir() {
                dirs.push(entry.path());
                continue;
            }
            let changed = entry.metadata().and_then(|m| m.modified()).expect("source mtime");
            assert!(
                changed <= built,
                "{} is older than {}: rebuild it (scripts/test does)",
                path.display(),
                entry.path().display()
            );
        }
    }
    path
}

/// The kernel image and its modules, unpacked by scripts/test-deps.
struct Guest {
    release: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
    headers: PathBuf,
}

impl Guest {
    fn new(release: &str) -> Self {
        let base = workspace().join(".cache/kernels").join(release);
        let guest = Self {
            release: release.to_owned(),
            vmlinuz: base.join(format!("boot/vmlinuz-{release}")),
            modules: base.join(format!("lib/modules/{release}")),
            headers: PathBuf::from(format!("/usr/src/linux-headers-{release}")),
        };
        for path in [&guest.vmlinuz, &guest.modules.join("modules.dep"), &guest.headers] {
            assert!(path.exists(), "{} missing: run scripts/test-deps", path.display());
        }
        guest
    }
}

fn run(command: &mut Command) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The real open modules for this kernel: the bundle the compile tests left, else built here.
fn real_bundle(guest: &Guest, work: &Path) -> PathBuf {
    let kept = real_bundle_path(&guest.release);
    if kept.is_file() {
        return kept;
    }
    let out = work.join("real.tar.zst");
    let patches = guest.release.starts_with("6.12.").then(patches_612);
    let output = compile_real(&guest.headers, patches.as_deref(), &out);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    keep_real_bundle(&out, &guest.release);
    out
}

/// The stand-in driver: `tests/fixtures/kmod` built against the guest's headers, packed as a bundle.
fn stand_in_bundle(guest: &Guest, work: &Path) -> PathBuf {
    stand_in_bundle_of(guest, work, STAND_IN, None)
}

/// The stand-in as driver `version`, its modules signed with `signing` (key, certificate) when given.
fn stand_in_bundle_of(guest: &Guest, work: &Path, version: &str, signing: Option<(&Path, &Path)>) -> PathBuf {
    stand_in_bundle_with(guest, work, version, signing, true)
}

/// [`stand_in_bundle_of`], with its firmware or without (then its nvidia.ko fails to load, as the
/// real one does without its GSP firmware).
fn stand_in_bundle_with(
    guest: &Guest,
    work: &Path,
    version: &str,
    signing: Option<(&Path, &Path)>,
    firmware: bool,
) -> PathBuf {
    let work = &work.join(format!("stand-in-{version}"));
    let src = work.join("kmod");
    std::fs::create_dir_all(&src).expect("kmod dir");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kmod");
    for entry in std::fs::read_dir(&fixtures).expect("kmod fixtures").flatten() {
        if entry.path().is_file() {
            std::fs::copy(entry.path(), src.join(entry.file_name())).expect("copy kmod source");
        }
    }
    run(Command::new("make")
        .arg("-C")
        .arg(&guest.headers)
        .arg(format!("M={}", src.display()))
        .arg(format!("NV_TEST_VERSION={version}"))
        .arg("modules"));
    if let Some((key, cert)) = signing {
        for module in ["nvidia", "nvidia-uvm", "nvidia-modeset"] {
            run(Command::new(guest.headers.join("scripts/sign-file"))
                .arg("sha256")
                .arg(key)
                .arg(cert)
                .arg(src.join(format!("{module}.ko"))));
        }
    }

    let dir = work.join("stand-in");
    for sub in ["bin", "lib", "modules", &format!("firmware/nvidia/{version}")] {
        std::fs::create_dir_all(dir.join(sub)).expect("bundle dir");
    }
    // The firmware the stand-in nvidia.ko requests when it loads, as the real one its GSP firmware.
    if firmware {
        std::fs::write(dir.join(format!("firmware/nvidia/{version}/gsp_test.bin")), b"stand-in GSP firmware")
            .expect("firmware");
    }
    for module in ["nvidia", "nvidia-uvm", "nvidia-modeset"] {
        std::fs::copy(src.join(format!("{module}.ko")), dir.join(format!("modules/{module}.ko"))).expect("module");
    }
    let smi = dir.join("bin/nvidia-smi");
    std::fs::write(
        &smi,
        "#!/bin/sh\n[ -c /dev/nvidiactl ] && [ -c /dev/nvidia0 ] || { echo 'no /dev/nvidiactl or /dev/nvidia0' >&2; exit 9; }\necho \"NVIDIA-SMI stand-in: driver $(cat /sys/module/nvidia/version), $(ls /proc/driver/nvidia/gpus | wc -l) GPU\"\n",
    )
    .expect("smi");
    std::fs::set_permissions(&smi, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    std::fs::write(dir.join(format!("lib/libnvidia-ml.so.{version}")), b"stand-in").expect("lib");
    std::os::unix::fs::symlink(format!("libnvidia-ml.so.{version}"), dir.join("lib/libnvidia-ml.so.1")).expect("link");
    let info = BundleInfo {
        driver_version: version.to_owned(),
        kernel_release: guest.release.clone(),
        flavor: "open".to_owned(),
        gardenlinux_version: Some(GARDENLINUX.to_owned()),
    };
    let manifest = pack::describe(&dir, &info).expect("describe the stand-in");
    let out = work.join("stand-in.tar.zst");
    pack::pack(&dir, &manifest, &out, 3).expect("pack the stand-in");
    out
}

/// The in-tree modules `name` needs, itself included, as `modules.dep` lists them.
fn in_tree_closure(modules: &Path, name: &str) -> Vec<String> {
    let dep = std::fs::read_to_string(modules.join("modules.dep")).expect("modules.dep");
    let module_of =
        |path: &str| path.rsplit('/').next().unwrap_or(path).split(".ko").next().unwrap_or(path).replace('-', "_");
    dep.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(path, _)| module_of(path) == name)
        .map(|(path, deps)| std::iter::once(path).chain(deps.split_whitespace()).map(str::to_owned).collect())
        .unwrap_or_default()
}

/// What every guest's init does first: mount the pseudo filesystems, and define `step` (runs a
/// command between markers, with the kernel's messages), `state` and `install`.
const PREAMBLE: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
echo 1 > /proc/sys/kernel/printk
dmesg -c > /dev/null
echo
step() { name=$1; shift; echo "@@NVT BEGIN $name"; "$@" 2>&1; rc=$?; dmesg -c | sed 's/^/[kmsg] /'; echo "@@NVT END $name rc=$rc"; }
state() {
  echo "--- /proc/modules"; cut -d' ' -f1 /proc/modules
  echo "--- /proc/devices"; sed -n '/^Character/,/^$/p' /proc/devices | grep nvidia
  echo "--- /dev"; for d in /dev/nvidia*; do [ -c "$d" ] && echo "$d $(stat -c '%t %T' "$d")"; done
  echo "--- ready"; cat /opt/nvidia-installer/ready 2>/dev/null && echo
  echo "--- firmware path"; cat /sys/module/firmware_class/parameters/path; echo
  true
}
install() { nvidia-installer install --bucket drivers --gardenlinux-version @GL@ --driver-version "$1"; }
export RUST_LOG=info NO_COLOR=1
"#;

/// The steps of the main boot.
const INIT: &str = r#"step bare insmod /opt/nvidia-installer/cache/@KERNEL@/@STAND_IN@/modules/nvidia.ko
step real install @REAL@
step real-after state
step stand-in install @STAND_IN@
step stand-in-after state
step stand-in-again install @STAND_IN@
step wait nvidia-installer wait --timeout 5s --driver-version @STAND_IN@
step other-version install @REAL@
step other-after state
"#;

/// Boot the guest with everything in its initramfs and return each step's exit code and output.
fn boot(guest: &Guest, work: &Path, bundles: &[(&str, &Path)]) -> BTreeMap<String, (i32, String)> {
    boot_with(guest, work, bundles, INIT, "")
}

/// [`boot`] with other steps (after [`PREAMBLE`]) and more kernel parameters.
fn boot_with(
    guest: &Guest,
    work: &Path,
    bundles: &[(&str, &Path)],
    script: &str,
    parameters: &str,
) -> BTreeMap<String, (i32, String)> {
    boot_from(guest, work, bundles, None, script, parameters).0
}

/// [`boot_with`], the driver root restored first from `disk` (a tar of `/opt/nvidia-installer`
/// that an earlier boot wrote, as a node's disk keeps it across a reboot).
fn boot_from(
    guest: &Guest,
    work: &Path,
    bundles: &[(&str, &Path)],
    disk: Option<&Path>,
    script: &str,
    parameters: &str,
) -> (BTreeMap<String, (i32, String)>, String) {
    let root = work.join("initramfs");
    let _ = std::fs::remove_dir_all(&root);
    for dir in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(dir)).expect("initramfs dir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox (busybox-static)");
    for applet in run(Command::new("/bin/busybox").arg("--list")).lines() {
        let link = root.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link).expect("applet link");
        }
    }
    run(Command::new("objcopy").arg("--strip-debug").arg(static_installer()).arg(root.join("bin/nvidia-installer")));
    let init = format!("{PREAMBLE}{script}echo \"@@NVT DONE\"\npoweroff -f\n")
        .replace("@GL@", GARDENLINUX)
        .replace("@REAL@", DRIVER)
        .replace("@STAND_IN@", STAND_IN)
        .replace("@KERNEL@", &guest.release);
    std::fs::write(root.join("init"), init).expect("init");
    std::fs::set_permissions(root.join("init"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");

    // The kernel's own modules.dep and the in-tree modules the real driver depends on.
    let modules = root.join(format!("lib/modules/{}", guest.release));
    std::fs::create_dir_all(&modules).expect("modules dir");
    std::fs::copy(guest.modules.join("modules.dep"), modules.join("modules.dep")).expect("modules.dep");
    for path in in_tree_closure(&guest.modules, "drm") {
        let to = modules.join(&path);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("module dir");
        std::fs::copy(guest.modules.join(&path), to).expect("in-tree module");
    }

    // The host cache, filled by the real `stage` from the bucket.
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let s3 = runtime.block_on(nvidia_installer::s3::Bucket::connect(&options(&server))).expect("client");
    for (driver, bundle) in bundles {
        runtime
            .block_on(nvidia_installer::compiler::publish::publish(
                &s3,
                bundle,
                GARDENLINUX,
                false,
                None,
                &Default::default(),
            ))
            .expect("publish");
        run(Command::new(env!("CARGO_BIN_EXE_nvidia-installer"))
            .args(["stage", "--bucket", BUCKET, "--gardenlinux-version", GARDENLINUX, "--driver-version", driver])
            .args(["--kernel-release", &guest.release])
            .arg("--host-root")
            .arg(&root)
            .envs(server.env()));
    }

    if let Some(disk) = disk {
        run(Command::new("tar").arg("-xf").arg(disk).arg("-C").arg(&root));
    }
    let cpio = work.join("initramfs.cpio");
    let file = std::fs::File::create(&cpio).expect("cpio");
    run(Command::new("sh")
        .arg("-c")
        .arg("find . | sort | cpio -o -H newc -R 0:0 --quiet")
        .current_dir(&root)
        .stdout(file));

    let output = Command::new("timeout")
        .args(["900", "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "1"])
        .args(["-nographic", "-no-reboot", "-nic", "none", "-kernel"])
        .arg(&guest.vmlinuz)
        .arg("-initrd")
        .arg(&cpio)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet {parameters}"))
        .output()
        .expect("qemu-system-x86_64 (qemu-system-x86)");
    let console = String::from_utf8_lossy(&output.stdout).replace('\r', "");
    assert!(console.contains("@@NVT DONE"), "the guest did not finish ({}):\n{console}", output.status);
    (steps(&console), console)
}

fn steps(console: &str) -> BTreeMap<String, (i32, String)> {
    let mut steps = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in console.lines() {
        if let Some(name) = line.split("@@NVT BEGIN ").nth(1) {
            current = Some((name.trim().to_owned(), String::new()));
        } else if let Some(end) = line.split("@@NVT END ").nth(1) {
            let (name, rc) = end.rsplit_once(" rc=").expect("END line");
            let (_, text) = current.take().expect("END without BEGIN");
            steps.insert(name.to_owned(), (rc.trim().parse().expect("rc"), text));
        } else if let Some((_, text)) = current.as_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    steps
}

/// Lines of one section of the `state` step.
fn section<'a>(state: &'a str, name: &str) -> Vec<&'a str> {
    state
        .split(&format!("--- {name}\n"))
        .nth(1)
        .map(|rest| rest.lines().take_while(|l| !l.starts_with("--- ")).filter(|l| !l.trim().is_empty()).collect())
        .unwrap_or_default()
}

/// The module names in the order the installer logged loading them.
fn loads(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("loading module"))
        .filter_map(|l| l.split("module=").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap_or_default().trim_matches('"').to_owned())
        .collect()
}

fn boot_and_check(release: &str) {
    let guest = Guest::new(release);
    let work = tempfile::tempdir().expect("work");
    let real = real_bundle(&guest, work.path());
    let stand_in = stand_in_bundle(&guest, work.path());
    let real_manifest = pack::read_inner_manifest(&real).expect("real bundle");
    let nvidia = real_manifest.modules.iter().find(|m| m.name == "nvidia").expect("nvidia.ko");
    let needs_drm = nvidia.depends.iter().any(|d| d == "drm");
    // As seen on these kernels: Debian's 6.1 build of nvidia.ko needs the in-tree drm, the 6.12
    // cloud build does not.
    assert_eq!(needs_drm, release.starts_with("6.1."), "nvidia.ko depends on {:?} for {release}", nvidia.depends);

    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let steps = boot(&guest, work.path(), &[(DRIVER, &real), (STAND_IN, &stand_in)]);
    let step = |name: &str| steps.get(name).unwrap_or_else(|| panic!("no step {name} in {steps:#?}"));

    // Without the installer, the stand-in's nvidia.ko finds no firmware and does not load: the
    // kernel looks in /lib/firmware, which does not have it.
    let (rc, log) = step("bare");
    assert_ne!(*rc, 0, "{log}");
    assert!(log.contains(&format!("firmware nvidia/{STAND_IN}/gsp_test.bin not found")), "{log}");

    // The real driver on a machine with no GPU: in-tree dependencies loaded by the installer,
    // a clear error, nothing left loaded, no marker.
    let (rc, log) = step("real");
    assert_ne!(*rc, 0, "{log}");
    assert!(log.contains("the kernel found no NVIDIA GPU for it (No such device"), "{log}");
    assert!(log.contains("NVRM: No NVIDIA GPU found"), "the kernel's own words are in dmesg: {log}");
    if needs_drm {
        assert_eq!(loads(log), vec!["drm", "nvidia"], "{log}");
        assert!(log.contains("module=drm") && log.contains("unloaded after the failure"), "{log}");
    } else {
        assert_eq!(loads(log), vec!["nvidia"], "{log}");
    }
    let (_, after) = step("real-after");
    assert!(section(after, "/proc/modules").is_empty(), "modules left loaded:\n{after}");
    assert!(section(after, "ready").is_empty(), "a ready marker after a failure:\n{after}");

    // The stand-in: loaded in dependency order, device nodes from /proc/devices, ready.
    let (rc, log) = step("stand-in");
    assert_eq!(*rc, 0, "{log}");
    assert_eq!(loads(log), vec!["nvidia", "nvidia-uvm", "nvidia-modeset"], "{log}");
    // With it, the firmware is found where the installer made it findable.
    assert!(log.contains("GPU firmware findable by the kernel"), "{log}");
    assert!(log.contains(&format!("firmware nvidia/{STAND_IN}/gsp_test.bin, 21 bytes")), "{log}");
    assert!(log.contains("NVIDIA-SMI stand-in: driver 0.0.1, 1 GPU"), "{log}");
    let (_, after) = step("stand-in-after");
    let mut loaded = section(after, "/proc/modules");
    loaded.sort_unstable();
    assert_eq!(loaded, vec!["nvidia", "nvidia_modeset", "nvidia_uvm"], "{after}");
    let majors: BTreeMap<&str, u64> = section(after, "/proc/devices")
        .into_iter()
        .filter_map(|l| l.trim().split_once(' ').map(|(m, n)| (n, m.parse().expect("major"))))
        .collect();
    let frontend = majors["nvidia-frontend"];
    let uvm = majors["nvidia-uvm"];
    // `stat -c '%t %T'` prints major and minor in hex.
    let nodes: BTreeMap<&str, (u64, u64)> = section(after, "/dev")
        .into_iter()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (path, major, minor) = (words.next()?, words.next()?, words.next()?);
            Some((path, (u64::from_str_radix(major, 16).ok()?, u64::from_str_radix(minor, 16).ok()?)))
        })
        .collect();
    let expected: BTreeMap<&str, (u64, u64)> = BTreeMap::from([
        ("/dev/nvidia0", (frontend, 0)),
        ("/dev/nvidiactl", (frontend, 255)),
        ("/dev/nvidia-modeset", (frontend, 254)),
        ("/dev/nvidia-uvm", (uvm, 0)),
        ("/dev/nvidia-uvm-tools", (uvm, 1)),
    ]);
    assert_eq!(nodes, expected, "{after}");
    assert_eq!(section(after, "firmware path"), vec!["/opt/nvidia-installer/firmware"], "{after}");
    let marker = section(after, "ready").join("\n");
    assert!(marker.contains("\"driverVersion\": \"0.0.1\""), "{after}");

    // Again: already loaded, nothing loaded twice.
    let (rc, log) = step("stand-in-again");
    assert_eq!(*rc, 0, "{log}");
    assert!(loads(log).is_empty(), "{log}");
    assert_eq!(log.matches("already loaded").count(), 3, "{log}");
    let (rc, log) = step("wait");
    assert_eq!(*rc, 0, "{log}");

    // Another version over the loaded one: refused, the loaded driver keeps serving.
    let (rc, log) = step("other-version");
    assert_ne!(*rc, 0, "{log}");
    assert!(
        log.contains(&format!("NVIDIA driver {STAND_IN} is loaded on this node but {DRIVER} is to be installed")),
        "{log}"
    );
    assert!(loads(log).is_empty(), "{log}");
    let (_, after) = step("other-after");
    assert_eq!(section(after, "/proc/modules").len(), 3, "{after}");
}

/// The steps on a kernel that enforces module signatures.
const ENFORCING_INIT: &str = r#"step enforced cat /sys/module/module/parameters/sig_enforce
step unsigned install @STAND_IN@
step untrusted install @SIGNED@
step modules cut -d' ' -f1 /proc/modules
"#;

/// A kernel booted with `module.sig_enforce=1`: the unsigned stand-in is refused by the installer
/// before the kernel sees it, the stand-in signed with a key the kernel does not trust is refused by
/// the kernel, and both errors say why and what to do.
fn enforced_signatures(release: &str) {
    let guest = Guest::new(release);
    let work = tempfile::tempdir().expect("work");
    let unsigned = stand_in_bundle(&guest, work.path());
    let (key, cert) = module_signing_key(work.path());
    let signed = stand_in_bundle_of(&guest, work.path(), "0.0.2", Some((&key, &cert)));
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let enforcing = ENFORCING_INIT.replace("@SIGNED@", "0.0.2");
    let steps = boot_with(
        &guest,
        work.path(),
        &[(STAND_IN, &unsigned), ("0.0.2", &signed)],
        &enforcing,
        "module.sig_enforce=1",
    );
    let step = |name: &str| steps.get(name).unwrap_or_else(|| panic!("no step {name} in {steps:#?}"));
    assert_eq!(step("enforced").1.trim(), "Y");
    let (rc, log) = step("unsigned");
    assert_ne!(*rc, 0, "{log}");
    assert!(log.contains("the kernel requires signed modules") && log.contains("this one is unsigned"), "{log}");
    assert!(loads(log).is_empty(), "the installer refused before loading: {log}");
    let (rc, log) = step("untrusted");
    assert_ne!(*rc, 0, "{log}");
    assert!(log.contains("rejected this one") && log.contains("enroll the signing certificate"), "{log}");
    assert!(log.contains("Loading of module with unavailable key is rejected"), "the kernel's own words: {log}");
    assert!(step("modules").1.trim().is_empty(), "nothing left loaded: {}", step("modules").1);
}

/// The steps of the live switch: A loaded; a process holding /dev/nvidia0 blocks the switch to B
/// and is named; once it is gone, B replaces A without a reboot; a B that cannot load (no
/// firmware) is undone and the previous driver loaded again.
const SWITCH_INIT: &str = r#"switch() { nvidia-installer install --bucket drivers --gardenlinux-version @GL@ --switch --driver-version "$@"; }
version() { cat /sys/module/nvidia/version; }
step a install 0.0.1
sh -c 'exec 3</dev/nvidia0; exec sleep 600' &
holder=$!
sleep 1
step held switch 0.0.2 --unload-wait 3s
step held-version version
kill $holder
wait $holder
step b switch 0.0.2
step b-after state
step b-version version
step broken switch 0.0.3
step broken-after state
step broken-version version
"#;

/// Live switches on a real kernel: no reboot, the old driver unloaded only when nothing holds it,
/// and a new driver that fails leaves the old one loaded and serving.
fn live_switch(release: &str) {
    let guest = Guest::new(release);
    let work = tempfile::tempdir().expect("work");
    let a = stand_in_bundle_with(&guest, work.path(), "0.0.1", None, true);
    let b = stand_in_bundle_with(&guest, work.path(), "0.0.2", None, true);
    let broken = stand_in_bundle_with(&guest, work.path(), "0.0.3", None, false);
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let steps = boot_with(&guest, work.path(), &[("0.0.1", &a), ("0.0.2", &b), ("0.0.3", &broken)], SWITCH_INIT, "");
    let step = |name: &str| steps.get(name).unwrap_or_else(|| panic!("no step {name} in {steps:#?}"));
    let (rc, log) = step("a");
    assert_eq!(*rc, 0, "{log}");

    // Held: nothing unloaded, the holder named, A still serving, a non-zero exit for the operator.
    let (rc, log) = step("held");
    assert_ne!(*rc, 0, "{log}");
    assert!(log.contains("has /dev/nvidia0 open") && log.contains("(sleep)"), "the holder is named: {log}");
    assert!(log.contains("driver 0.0.2 was not installed; driver 0.0.1 is loaded and serving"), "{log}");
    assert!(!log.contains("unloaded module="), "nothing unloaded: {log}");
    assert_eq!(step("held-version").1.trim(), "0.0.1");

    // Released: A unloaded (users first), B loaded, no reboot.
    let (rc, log) = step("b");
    assert_eq!(*rc, 0, "{log}");
    assert!(log.contains("unloading the old driver"), "{log}");
    assert_eq!(loads(log), vec!["nvidia", "nvidia-uvm", "nvidia-modeset"], "{log}");
    assert!(log.contains("NVIDIA-SMI stand-in: driver 0.0.2"), "{log}");
    assert_eq!(step("b-version").1.trim(), "0.0.2");
    let (_, after) = step("b-after");
    assert!(section(after, "ready").join("\n").contains("\"driverVersion\": \"0.0.2\""), "{after}");

    // Broken: B unloaded, the new nvidia.ko fails (its firmware is missing), B loaded again.
    let (rc, log) = step("broken");
    assert_ne!(*rc, 0, "{log}");
    assert!(log.contains("firmware nvidia/0.0.3/gsp_test.bin not found"), "the kernel's own words: {log}");
    assert!(
        log.contains("driver 0.0.3 failed") && log.contains("driver 0.0.2 is loaded again from the cache"),
        "{log}"
    );
    assert_eq!(step("broken-version").1.trim(), "0.0.2");
    let (_, after) = step("broken-after");
    let mut loaded = section(after, "/proc/modules");
    loaded.sort_unstable();
    assert_eq!(loaded, vec!["nvidia", "nvidia_modeset", "nvidia_uvm"], "{after}");
    assert!(
        section(after, "ready").join("\n").contains("\"driverVersion\": \"0.0.2\""),
        "the node serves 0.0.2: {after}"
    );
}

/// The first boot installs, then writes the driver root out (base64 of a tar, between markers).
const FIRST_BOOT: &str = r#"step install install @STAND_IN@
step boot-id cat /proc/sys/kernel/random/boot_id
echo "@@NVT DISK BEGIN"; tar -cf - -C / opt/nvidia-installer | base64; echo "@@NVT DISK END"
"#;

/// The second boot, from the same disk: the earlier boot's ready marker does not count, and the
/// install comes from the cache. The guest has no network: a request to the bucket would fail.
const SECOND_BOOT: &str = r#"step boot-id cat /proc/sys/kernel/random/boot_id
step stale-wait nvidia-installer wait --timeout 2s --driver-version @STAND_IN@
step install install @STAND_IN@
step wait nvidia-installer wait --timeout 5s --driver-version @STAND_IN@
"#;

/// A node that reboots comes back from its cache: no download, and only a marker of this boot
/// lets pods start.
fn reboot_from_cache(release: &str) {
    let guest = Guest::new(release);
    let work = tempfile::tempdir().expect("work");
    let stand_in = stand_in_bundle(&guest, work.path());
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let (first, console) = boot_from(&guest, work.path(), &[(STAND_IN, &stand_in)], None, FIRST_BOOT, "");
    assert_eq!(first["install"].0, 0, "{}", first["install"].1);
    let encoded: String = console
        .split("@@NVT DISK BEGIN")
        .nth(1)
        .and_then(|rest| rest.split("@@NVT DISK END").next())
        .expect("the disk's contents")
        .lines()
        .map(str::trim)
        .collect();
    let disk = work.path().join("disk.tar");
    let decoded = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &encoded).expect("base64");
    std::fs::write(&disk, decoded).expect("disk");

    let (second, _) = boot_from(&guest, work.path(), &[], Some(&disk), SECOND_BOOT, "");
    assert_ne!(first["boot-id"].1.trim(), second["boot-id"].1.trim(), "a new boot");
    let (rc, log) = &second["stale-wait"];
    assert_eq!(*rc, 124, "the earlier boot's marker does not satisfy wait: {log}");
    assert!(log.contains("from before the node restarted"), "{log}");
    let (rc, log) = &second["install"];
    assert_eq!(*rc, 0, "{log}");
    assert!(log.contains("cache hit"), "{log}");
    assert!(!log.contains("downloading"), "nothing downloaded: {log}");
    assert_eq!(loads(log), vec!["nvidia", "nvidia-uvm", "nvidia-modeset"], "{log}");
    assert_eq!(second["wait"].0, 0, "{}", second["wait"].1);
}

#[test]
#[ignore = "slow: boots Debian's 6.1 kernel in QEMU twice (scripts/test-deps installs QEMU and the kernel; scripts/test builds the static installer)"]
fn a_rebooted_node_installs_from_its_cache_on_a_real_debian_6_1_kernel() {
    reboot_from_cache("6.1.0-47-amd64");
}

#[test]
#[ignore = "slow: boots Debian's 6.1 kernel in QEMU (scripts/test-deps installs QEMU and the kernel; scripts/test builds the static installer)"]
fn live_switch_on_a_real_debian_6_1_kernel() {
    live_switch("6.1.0-47-amd64");
}

#[test]
#[ignore = "slow: boots Debian's 6.1 kernel in QEMU with module.sig_enforce=1 (scripts/test-deps installs QEMU and the kernel; scripts/test builds the static installer)"]
fn module_signatures_on_an_enforcing_debian_6_1_kernel() {
    enforced_signatures("6.1.0-47-amd64");
}

#[test]
#[ignore = "slow: boots Debian's 6.1 kernel in QEMU (scripts/test-deps installs QEMU and the kernel; scripts/test builds the static installer)"]
fn install_on_a_real_debian_6_1_kernel() {
    boot_and_check("6.1.0-47-amd64");
}

#[test]
#[ignore = "slow: boots Debian's 6.12 cloud kernel in QEMU (scripts/test-deps installs QEMU and the kernel; scripts/test builds the static installer)"]
fn install_on_a_real_debian_6_12_cloud_kernel() {
    let headers = cloud_612_headers().expect("linux-headers-6.12.*-cloud-amd64 under /usr/src: run scripts/test-deps");
    let release =
        headers.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("linux-headers-")).expect("release");
    boot_and_check(release);
}
