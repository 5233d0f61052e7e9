//! The README's main command: `local-flow` runs the whole flow on this machine and says so; a
//! step that fails stops it with a non-zero exit and the step's error.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where cargo put the workspace's binaries (beside this test's directory).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    exe.parent().and_then(Path::parent).expect("target dir").to_owned()
}

#[test]
fn the_main_command_runs_every_step_and_performs_no_kernel_step() {
    let output = Command::new(env!("CARGO_BIN_EXE_local-flow"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .env_remove("CARGO")
        .output()
        .expect("local-flow");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let steps: Vec<&str> = stdout.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(steps.len(), 11, "{stdout}");
    assert!(steps.iter().all(|l| l.contains("] ok ")), "{stdout}");
    for expected in [
        "nvidia-installer publish",
        "verified bundle already staged: 0 S3 requests",
        "install --dry-run (kernel steps NOT performed)",
        "1. finit_module ",
        "mknod /dev/nvidiactl c <major of \"nvidia-frontend\" in /proc/devices> 255",
        "allowed, uid echoed, JSONPatch with",
        "init container nvidia-driver-wait: nvidia-installer wait --host-root /host",
        "container metrics-sidecar: mounts none",
        "still waiting after 2 s, as the pod would: driver 535.261.03 is staged",
        "/usr/local/nvidia/lib64/libnvidia-ml.so.1: ",
        "All 11 steps passed",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing from:\n{stdout}");
    }
}

#[test]
fn a_failing_step_stops_the_flow_with_its_error() {
    // A driver directory whose modules were built for another kernel: pack refuses it.
    let dir = tempfile::tempdir().expect("dir");
    for sub in ["bin", "lib", "modules"] {
        std::fs::create_dir_all(dir.path().join(sub)).expect("dir");
    }
    std::fs::write(dir.path().join("bin/nvidia-smi"), "#!/bin/sh\n").expect("smi");
    let module = integration_tests::fixtures::elf_module(&[
        ("name", "nvidia"),
        ("vermagic", "6.1.0-47-amd64 SMP preempt mod_unload modversions "),
    ]);
    std::fs::write(dir.path().join("modules/nvidia.ko"), module).expect("module");
    let output = Command::new(env!("CARGO_BIN_EXE_local-flow"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .args(["--kernel-release", "6.12.117+deb12-cloud-amd64", "--driver-dir"])
        .arg(dir.path())
        .env_remove("CARGO")
        .output()
        .expect("local-flow");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("[ 3] ERR nvidia-installer pack"), "{stdout}");
    assert!(stdout.contains("FAILED at step 3") && stdout.contains("6.1.0-47-amd64"), "{stdout}");
    assert!(!stdout.contains("[ 4]"), "the flow went on after a failed step:\n{stdout}");
}
